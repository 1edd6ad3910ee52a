"""Steering vectors as llama.cpp control vectors (GGUF): export an optimised persona, import any file.

File layout (the one llama.cpp reads and repeng writes): architecture ``controlvector``, string
``controlvector.model_hint`` (the model type, e.g. "llama"), uint32 ``controlvector.layer_count``
(the number of direction tensors) and one F32 tensor ``direction.<N>`` of length hidden_size per
steered block.

Layer indices: llama.cpp adds ``direction.N`` to the output of decoder block N, i.e. HF
``model.layers[N]``, which is our hidden_states row N + 1 (see ``layers.py``). Our steering layer L is
a row, so it is written as ``direction.{L-1}``, and read back as row N + 1. llama.cpp refuses
``direction.0``, so row 1 (the output of block 0) cannot be exported.

Positions: llama.cpp adds the vector at every position, prompt and response alike (our
``positions="all"``). A persona optimised with ``steering.positions=response`` therefore acts a
little more strongly in llama.cpp, since the prompt is steered too.

Running it::

    llama-cli -m model.gguf --control-vector runs/export/<persona>.gguf
    llama-cli -m model.gguf --control-vector-scaled runs/export/<persona>.gguf 0.8
    llama-cli -m model.gguf --control-vector file.gguf --control-vector-layer-range START END

``--control-vector-scaled FILE SCALE`` multiplies the vector; ``--control-vector-layer-range`` keeps
only directions whose N lies in [START, END].
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_steering.basis import TraitBasis, load_basis
from persona_steering.cache import atomic_write_bytes
from persona_steering.config import Config, ConfigError
from persona_steering.layers import LayerError
from persona_steering.record import PersonaFiles, PersonaRecord
from persona_steering.runtime import ModelLoadError, identify
from persona_steering.store import VectorFileError

ARCH = "controlvector"
DEFAULT_OUT_DIR = "runs/export"


def export_persona(
    cfg: Config,
    persona_id: str | None,
    traits: list[str] | None = None,
    weight: float = 1.0,
    out: str | Path | None = None,
    out_dir: str | Path = DEFAULT_OUT_DIR,
) -> list[Path]:
    """Write the control vector(s) of an optimised persona, or of single traits.

    Without ``traits``: one file holding ``alpha * scale * sum_i w_i u_i`` (``TraitBasis.deltas`` of
    the weights the run serves, ``optimize.select``) at the optimised layer, from
    ``<save_dir>/<persona>_optimization.json``.
    With ``traits``: one file per trait holding ``weight * alpha * scale * u_i``, ``scale`` being the
    whole basis's as in the optimisation. Layer, alpha and the basis's traits come from the
    persona's result when a persona is given, else from ``cfg.steering`` and ``cfg.traits``.

    Args:
        cfg: model (for the vectors' folder and fingerprint), steering and optimize sections.
        persona_id: persona whose optimisation result to export (required without ``traits``).
        traits: export these traits one file each instead of the persona's combination.
        weight: trait weight of each single-trait export.
        out: file path of the combined export (default ``<out_dir>/<persona>.gguf``).
        out_dir: folder for default file names.

    Returns:
        The paths written.
    """
    if traits is None and not persona_id:
        raise ConfigError("export-gguf needs --persona-id ID (or --single-traits R1,R2 for single traits)")
    if traits is not None and out is not None:
        raise ConfigError("--out names one file; with --single-traits use --out-dir (one file per trait)")
    record = (
        PersonaRecord.require(PersonaFiles(Path(cfg.optimize.save_dir), persona_id)) if persona_id else None
    )
    basis = _basis(cfg, record)
    unknown = [t for t in traits or [] if t not in basis.traits]
    if unknown:
        owner = f"persona {persona_id}'s traits" if record else "the configured traits (--traits)"
        raise ConfigError(
            f"--single-traits names {', '.join(unknown)}, not among {owner}: {', '.join(basis.traits)}"
        )
    alpha = record.alpha if record else cfg.steering.alpha
    hint = model_hint(cfg)
    written = []
    if traits is None:
        assert record is not None
        vector = basis.deltas(record.weights(basis.traits), alpha)[0]  # [hidden]
        path = Path(out) if out is not None else Path(out_dir) / f"{record.persona_id}.gguf"
        written.append(write_control_vector(path, {basis.layer: vector}, hint))
    else:
        prefix = f"{persona_id}_" if persona_id else ""
        for trait in traits:
            # One-hot weights through the same basis: the scale stays the whole basis's, as in the
            # optimisation, so weight 1 here is exactly weight 1 there.
            onehot = torch.zeros(len(basis.traits))
            onehot[basis.traits.index(trait)] = weight
            vector = basis.deltas(onehot, alpha)[0]  # [hidden]
            path = Path(out_dir) / f"{prefix}{trait}.gguf"
            written.append(write_control_vector(path, {basis.layer: vector}, hint))
    return written


def describe_control_vector(path: str | Path) -> str:
    """What ``import-gguf`` prints: the model hint and one line per direction."""
    vectors, meta = read_control_vector_file(path)
    lines = [f"{path}: control vector for {meta['model_hint']!r}, {len(vectors)} direction(s)"]
    for row, vec in vectors.items():
        head = " ".join(f"{x:+.4f}" for x in vec[:4].tolist())
        lines.append(
            f"  layer {row} (llama.cpp direction.{row - 1}): [{vec.numel()}] |v| {vec.norm():.4f}  {head}"
        )
    return "\n".join(lines)


def write_control_vector(path: str | Path, vectors: dict[int, torch.Tensor], model_hint: str) -> Path:
    """Write ``{hidden_states row: [hidden] vector}`` as a llama.cpp control-vector GGUF, atomically.

    Args:
        path: the .gguf file to write.
        vectors: steering vectors keyed by our row convention (row L becomes ``direction.{L-1}``).
        model_hint: the model type llama.cpp shows for the file (e.g. "llama").

    Returns:
        ``path``.
    """
    import gguf

    if not vectors:
        raise ValueError("no vectors to write")
    directions = {block_index(row): _as_f32(vec, row) for row, vec in sorted(vectors.items())}
    sizes = {v.shape[0] for v in directions.values()}
    if len(sizes) != 1:
        raise LayerError(f"control vectors must share one hidden size, got {sorted(sizes)}")
    # GGUFWriter writes to a path it opens itself: build the file in a private temp folder, then
    # hand the bytes to the house atomic writer so a reader never sees half a file at ``path``.
    with tempfile.TemporaryDirectory(prefix="gguf-export-") as tmp:
        staged = Path(tmp) / "control.gguf"
        writer = gguf.GGUFWriter(staged, arch=ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for n, vec in directions.items():
            writer.add_tensor(f"direction.{n}", vec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = staged.read_bytes()
    return atomic_write_bytes(path, data)


def read_control_vector(path: str | Path) -> dict[int, torch.Tensor]:
    """Read a llama.cpp control-vector GGUF (ours or repeng's) as ``{hidden_states row: [hidden]}``.

    ``direction.N`` comes back as row N + 1, the row our ``steering.steer`` takes.
    """
    return read_control_vector_file(path)[0]


def read_control_vector_file(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """(vectors keyed by row, metadata: model_hint, layer_count, architecture) of a control vector."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"control vector file {path} not found")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:  # bad magic, truncated file, unknown version
        raise VectorFileError(f"{path} is not a readable GGUF file: {exc}") from None
    meta = {
        key: _field(reader, key)
        for key in ("general.architecture", f"{ARCH}.model_hint", f"{ARCH}.layer_count")
    }
    if meta["general.architecture"] != ARCH:
        raise VectorFileError(
            f"{path} is a GGUF file of architecture {meta['general.architecture']!r}, "
            f"not a control vector ({ARCH!r})"
        )
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            continue  # llama.cpp ignores other tensors too
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorFileError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, expected F32")
        # Copy out of the memory map: the file may be replaced or deleted after we return.
        vectors[int(index) + 1] = torch.from_numpy(
            np.array(tensor.data, dtype=np.float32).reshape(-1)
        )  # [hidden]
    if not vectors:
        raise VectorFileError(f"{path} holds no direction.<N> tensors")
    return dict(sorted(vectors.items())), {
        "architecture": meta["general.architecture"],
        "model_hint": meta[f"{ARCH}.model_hint"],
        "layer_count": meta[f"{ARCH}.layer_count"],
    }


def block_index(row: int) -> int:
    """llama.cpp's ``direction.N`` index for our hidden_states row: N = row - 1, and N must be >= 1."""
    if row < 1:
        raise LayerError(f"layer {row} is not a steerable hidden_states row (rows start at 1)")
    if row == 1:
        raise LayerError(
            "layer 1 (the output of decoder block 0) cannot be exported: llama.cpp refuses direction.0; "
            "steer at layer 2 or later"
        )
    return row - 1


def model_hint(cfg: Config) -> str:
    """The model type llama.cpp and repeng record (e.g. "llama"), read without loading weights."""
    ident = identify(cfg.model)
    try:
        if ident.gguf is not None:
            import gguf

            # The GGUF's own architecture is llama.cpp's name for the model: exactly the hint it wants.
            arch = _field(gguf.GGUFReader(ident.gguf), "general.architecture")
            if isinstance(arch, str):
                return arch
        config = Path(ident.source) / "config.json"
        if config.is_file():
            return str(json.loads(config.read_text())["model_type"])
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(ident.source, **dict(ident.kwargs)).model_type)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the model type of {cfg.model.name!r}: {exc}") from None


def _basis(cfg: Config, record: PersonaRecord | None) -> TraitBasis:
    """The trait basis of the persona's optimisation (or of ``cfg`` without one), checked against it."""
    ident = identify(cfg.model)
    layer = record.layer if record else cfg.steering.layer
    method = (record.vector_method if record else None) or cfg.steering.vector_method
    summary = (record.summary if record else None) or cfg.steering.summary
    names = list(record.traits) if record else cfg.basis_traits
    block_index(layer)  # refuse row 1 before reading any vector file
    basis = load_basis(
        cfg.steering.trait_vector_dir,
        ident.slug,
        names,
        layer,
        method,
        summary,
        fingerprint=ident.fingerprint,
        axis_file=record.files.axis if record and record.files else None,
        kind=(record.basis or "traits") if record else cfg.steering.basis,
    )
    if record is not None:
        record.check_basis(basis)
    return basis


def _as_f32(vec: torch.Tensor, row: int) -> np.ndarray:
    """A finite, 1-D float32 numpy copy of a steering vector."""
    arr = vec.detach().to("cpu", torch.float32).reshape(-1).numpy().copy()  # [hidden]
    if not np.isfinite(arr).all():
        raise VectorFileError(f"the vector for layer {row} is not finite")
    return arr


def _field(reader: Any, key: str) -> Any:
    """A GGUF metadata value, or None when the key is absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def run_export(cfg: Config, log: Callable[[str], None] = print) -> list[Path]:
    """The ``export-gguf`` command: ``export_persona`` with ``cfg.export``; logs each path written."""
    e = cfg.export
    paths = export_persona(cfg, cfg.optimize.persona_id, e.single_traits, e.weight, e.out, e.out_dir)
    for path in paths:
        log(f"wrote {path}")
    return paths
