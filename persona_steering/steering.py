"""Add a per-row vector to the residual stream at one layer, on response, prompt or all tokens.

Positions, precisely (one steering context per generation call):
- The first forward through the hooked block is the prompt (prefill); every later one is a
  KV-cached decode step that carries one generated token per row.
- ``prompt``: every real (non-padding) prompt token, the last one included.
- ``response``: every position whose output predicts a response token: the last prompt token
  (it predicts the first response token) and each generated token fed back during decoding.
- ``all``: both. Left padding is never steered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from persona_steering.layers import LayerError, decoder_blocks, normalize_layer, retuple, untuple

POSITIONS = ("response", "prompt", "all")


@contextmanager
def steer(
    model: torch.nn.Module,
    layer: int,
    deltas: torch.Tensor,
    positions: str = "response",
    attention_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Within the block, add ``deltas[b]`` to row ``b``'s hidden states at ``layer``.

    Args:
        model: a HF causal LM (the unwrapped module).
        layer: hidden_states row 1..L (the output of block layer-1); negatives count from the end.
        deltas: [batch, hidden] float tensor, one vector per row (zeros leave a row untouched).
        positions: response, prompt or all (see the module docstring).
        attention_mask: [batch, prompt_len] mask of the prompt batch, 0 on left padding.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    blocks = decoder_blocks(model)
    row = normalize_layer(layer, len(blocks))
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if deltas.ndim != 2 or (hidden_size is not None and deltas.shape[1] != hidden_size):
        raise LayerError(
            f"steering vectors have shape {tuple(deltas.shape)}, expected [batch, {hidden_size}]: "
            "were they extracted from another model?"
        )
    calls = 0

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        nonlocal calls
        hidden = untuple(output)  # [batch, seq, hidden]
        if hidden.shape[0] != deltas.shape[0]:
            raise LayerError(f"batch has {hidden.shape[0]} rows but {deltas.shape[0]} steering vectors")
        mask = _position_mask(hidden, positions, attention_mask, prefill=calls == 0)  # [batch, seq, 1]
        calls += 1
        delta = deltas.to(device=hidden.device, dtype=hidden.dtype)[:, None, :]
        return retuple(output, hidden + mask * delta)

    # prepend: run before any other hook on the block (transformers records output_hidden_states
    # with its own forward hooks), so everything downstream, recorders included, sees the steered state.
    handle = blocks[row - 1].register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _position_mask(
    hidden: torch.Tensor, positions: str, attention_mask: torch.Tensor | None, prefill: bool
) -> torch.Tensor:
    batch, seq, _ = hidden.shape
    if not prefill:
        value = 0.0 if positions == "prompt" else 1.0
        return torch.full((batch, seq, 1), value, device=hidden.device, dtype=hidden.dtype)
    if attention_mask is not None and attention_mask.shape == (batch, seq):
        real = attention_mask.to(device=hidden.device, dtype=hidden.dtype)
    else:
        real = torch.ones(batch, seq, device=hidden.device, dtype=hidden.dtype)
    if positions == "response":
        last = torch.zeros_like(real)
        last[:, -1] = 1.0  # left padding: the last column is each row's last prompt token
        real = last
    return real[:, :, None]
