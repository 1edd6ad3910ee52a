"""Add a per-row vector to the residual stream at one layer, on response, prompt or all tokens.

Positions, precisely (one steering context per generation call):
- The first forward through the hooked block is the prompt (prefill); every later one is a
  KV-cached decode step that carries one generated token per row.
- ``prompt``: every real (non-padding) prompt token, the last one included.
- ``response``: every position whose output predicts a response token: the last prompt token
  (it predicts the first response token) and each generated token fed back during decoding.
- ``all``: both. Left padding is never steered.

What positions mean lives here alone: the hook (``steer``), and the two questions a decoder asks
of them, ``steers_prefix`` (may a batch compute its prompts' shared prefix once, unsteered?) and
``steers_decode`` (are the generated tokens fed back steered?). ``SteeringSpec`` is what ``generate``
takes: the layer, one vector per row, and the positions, with the cache-key part of each row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from persona_steering.cache import bytes_digest
from persona_steering.config import POSITIONS
from persona_steering.layers import LayerError, decoder_blocks, normalize_layer, retuple, untuple


def vector_digest(vector: torch.Tensor) -> str:
    """A steering vector's identity in cache keys (its float32 bytes)."""
    return bytes_digest(vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), 32)


def steers_prefix(positions: str) -> bool:
    """Whether any prompt token before the last is steered. When not, a batch computes the shared
    prompt prefix once, unsteered, and runs only the last prompt token per row, steered."""
    return positions != "response"


def steers_decode(positions: str) -> bool:
    """Whether each generated token, fed back during decoding, is steered."""
    return positions != "prompt"


@dataclass(frozen=True)
class SteeringSpec:
    """How a batch is steered: row ``b`` gets ``deltas[b]`` at hidden_states row ``layer`` on ``positions``.

    An all-zero row is unsteered. ``TraitBasis.spec`` builds one from trait weights (the layer comes
    from the basis, normalised once there).
    """

    layer: int
    deltas: torch.Tensor  # [rows, hidden]
    positions: str = "response"

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.deltas.ndim != 2:
            raise ValueError(f"steering deltas must be [rows, hidden], got shape {tuple(self.deltas.shape)}")

    def __len__(self) -> int:
        return int(self.deltas.shape[0])

    def rows(self, idx: Sequence[int]) -> SteeringSpec:
        """The spec of these rows, in this order."""
        return replace(self, deltas=self.deltas[list(idx)])

    def repeat(self, n: int) -> SteeringSpec:
        """Each row ``n`` times in a row (a population's candidate-major rows)."""
        return replace(self, deltas=self.deltas.repeat_interleave(n, dim=0))

    def row_key(self, i: int) -> dict[str, Any] | None:
        """What row ``i``'s steering adds to its answer's cache key; None when the row is unsteered."""
        if not bool(self.deltas[i].abs().max() > 0):
            return None
        return {"layer": self.layer, "positions": self.positions, "vector": vector_digest(self.deltas[i])}

    @property
    def steers_prefix(self) -> bool:
        return steers_prefix(self.positions)

    def apply(
        self, model: torch.nn.Module, attention_mask: torch.Tensor | None = None
    ) -> AbstractContextManager[SteeredRows]:
        """The hook, for one generation call over these rows (see ``steer``)."""
        return steer(model, self.layer, self.deltas, self.positions, attention_mask=attention_mask)


@contextmanager
def steer(
    model: torch.nn.Module,
    layer: int,
    deltas: torch.Tensor,
    positions: str = "response",
    attention_mask: torch.Tensor | None = None,
) -> Iterator[SteeredRows]:
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
    rows = SteeredRows(deltas)
    calls = 0

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        nonlocal calls
        hidden = untuple(output)  # [batch, seq, hidden]
        if hidden.shape[0] != rows.deltas.shape[0]:
            raise LayerError(f"batch has {hidden.shape[0]} rows but {rows.deltas.shape[0]} steering vectors")
        mask = _position_mask(hidden, positions, attention_mask, prefill=calls == 0)  # [batch, seq, 1]
        calls += 1
        delta = rows.deltas.to(device=hidden.device, dtype=hidden.dtype)[:, None, :]
        return retuple(output, hidden + mask * delta)

    # prepend: run before any other hook on the block (transformers records output_hidden_states
    # with its own forward hooks), so everything downstream, recorders included, sees the steered state.
    handle = blocks[row - 1].register_forward_hook(hook, prepend=True)
    try:
        yield rows
    finally:
        handle.remove()


class SteeredRows:
    """The rows a ``steer`` block is steering; a decoder whose finished rows leave the batch calls
    ``keep`` with the rows that stay, in the same step as it drops them from its KV cache."""

    def __init__(self, deltas: torch.Tensor) -> None:
        self.deltas = deltas  # [rows, hidden]

    def keep(self, index: torch.Tensor) -> None:
        self.deltas = self.deltas[index.to(self.deltas.device)]


def _position_mask(
    hidden: torch.Tensor, positions: str, attention_mask: torch.Tensor | None, prefill: bool
) -> torch.Tensor:
    batch, seq, _ = hidden.shape
    if not prefill:
        value = 1.0 if steers_decode(positions) else 0.0
        return torch.full((batch, seq, 1), value, device=hidden.device, dtype=hidden.dtype)
    if attention_mask is not None and attention_mask.shape == (batch, seq):
        real = attention_mask.to(device=hidden.device, dtype=hidden.dtype)
    else:
        real = torch.ones(batch, seq, device=hidden.device, dtype=hidden.dtype)
    if not steers_prefix(positions):
        last = torch.zeros_like(real)
        last[:, -1] = 1.0  # left padding: the last column is each row's last prompt token
        real = last
    return real[:, :, None]
