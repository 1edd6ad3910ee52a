"""Find the decoder blocks of any HF causal LM; one layer convention; untuple block outputs.

Convention used everywhere: a *layer* is a row of HF ``hidden_states``. Row 0 is the embedding
output (the input of block 0); row ``i`` (1..L) is the output of decoder block ``i - 1``. Rows are
what vector files store and what steering adds to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, SmolLM, Phi-3
    "model.language_model.layers",  # multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "transformer.blocks",  # MPT
    "layers",
)


class LayerError(ValueError):
    """A layer index or model structure problem, with what to do about it."""


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks, found by the attribute paths common HF models use."""
    for path in _BLOCK_PATHS:
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList) and len(node) > 0:
            return node
    raise LayerError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for "
        f"{', '.join(_BLOCK_PATHS)}; add its attribute path to _BLOCK_PATHS in persona_steering/layers.py"
    )


def normalize_layer(layer: int, num_layers: int, allow_embeddings: bool = False) -> int:
    """A hidden_states row in 1..num_layers (0 too if allowed); negatives count from the end."""
    row = layer + num_layers + 1 if layer < 0 else layer
    low = 0 if allow_embeddings else 1
    if not low <= row <= num_layers:
        raise LayerError(
            f"layer {layer} is out of range: this model has hidden_states rows {low}..{num_layers} "
            f"(row i is the output of decoder block i-1)"
        )
    return row


def untuple(output: Any) -> torch.Tensor:
    """The hidden states of a block output: a tensor in transformers 5, a tuple's first item before."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LayerError(f"unexpected decoder block output of type {type(output).__name__}")


def retuple(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden``, in the same shape of container."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:]) if isinstance(output, tuple) else [hidden, *output[1:]]


@contextmanager
def capture_layers(
    model: torch.nn.Module, reduce: Callable[[torch.Tensor], Any] | None = None
) -> Iterator[list[torch.Tensor]]:
    """Collect hidden_states rows 0..L (block 0's input, then every block's output) in one forward.

    With ``reduce``, each row is passed to it as soon as it is computed and not kept.
    """
    blocks = decoder_blocks(model)
    states: list[torch.Tensor] = []
    keep = reduce or states.append

    def pre_hook(_m: torch.nn.Module, args: Any) -> None:
        if args:
            keep(args[0])

    handles = [blocks[0].register_forward_pre_hook(pre_hook)]
    try:
        for block in blocks:
            handles.append(block.register_forward_hook(lambda _m, _a, output: keep(untuple(output))))
        yield states
    finally:
        for h in handles:
            h.remove()
