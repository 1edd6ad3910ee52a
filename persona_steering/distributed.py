"""Running a stage across processes: who is rank 0, dealing rows, gathering them back in order,
and doing a step (judging, writing) on rank 0 alone. With one process every helper is a no-op.

Rows are dealt round-robin: rank ``r`` of ``w`` takes rows ``r, r + w, r + 2w, ...``. Every rank
must call the collectives here in the same order, so callers decide what to do identically on all
ranks (or take rank 0's decision through ``on_main``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from persona_steering.cache import Cache

if TYPE_CHECKING:
    from lightning.fabric import Fabric

T = TypeVar("T")


def world_size(fabric: Fabric | None) -> int:
    return 1 if fabric is None else int(fabric.world_size)


def rank(fabric: Fabric | None) -> int:
    return 0 if fabric is None else int(fabric.global_rank)


def is_main(fabric: Fabric | None) -> bool:
    return rank(fabric) == 0


def launched_as_main() -> bool:
    """Before Fabric exists: whether this process will be rank 0 (torchrun sets RANK; Fabric's own
    launcher gives the processes it starts LOCAL_RANK, and NODE_RANK on other machines)."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def is_main_process() -> bool:
    """Rank 0 or no process group at all: for code that holds no Fabric (the CLI printing results)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def leave_process_group(finished: bool) -> None:
    """End a command's process group in step: every rank that finished waits for the others, then
    all tear gloo/NCCL down before the interpreter exits. Left to the interpreter's exit, a rank
    whose peer has already closed its sockets can abort in gloo's destructor (SIGABRT, seen on CI)
    although all the work was done. A rank that failed does not wait: its peers may never arrive."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def shard(n: int, fabric: Fabric | None) -> list[int]:
    """This rank's share of rows ``0..n-1``."""
    return list(range(rank(fabric), n, world_size(fabric)))


def gather_objects(fabric: Fabric | None, local: list[T], n: int) -> list[T]:
    """Every rank's share (as dealt by ``shard(n)``) back as one list in the original order, on all ranks."""
    world = world_size(fabric)
    if world == 1:
        return list(local)
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        for j, item in enumerate(part):
            out[r + j * world] = item
    return out


def gather_rows(fabric: Fabric | None, local: torch.Tensor, n: int) -> torch.Tensor:
    """[share, ...] rows of every rank back as [n, ...] in the original order, on all ranks (CPU)."""
    world = world_size(fabric)
    if world == 1:
        return local
    assert fabric is not None
    width = -(-n // world)  # all_gather needs equal shapes: pad every share to the largest
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = fabric.all_gather(padded.to(fabric.device))  # [world, width, ...]
    assert isinstance(gathered, torch.Tensor)
    gathered = gathered.cpu()
    index = torch.arange(n)
    return gathered[index % world, index // world]  # [n, ...]


def all_reduce_sum(fabric: Fabric | None, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (float64 sums stay exact enough for norms)."""
    if world_size(fabric) == 1:
        return tensor
    assert fabric is not None
    summed = fabric.all_reduce(tensor.to(fabric.device), reduce_op="sum")
    assert isinstance(summed, torch.Tensor)
    return summed.cpu()


def check_same(fabric: Fabric | None, value: str, what: str) -> None:
    """Raise on every rank unless every rank holds the same ``value`` (a digest of its state)."""
    world = world_size(fabric)
    if world == 1:
        return
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, value)
    if len(set(parts)) > 1:
        held = ", ".join(f"rank {r}: {v}" for r, v in enumerate(parts))
        raise RuntimeError(f"the processes disagree on {what} ({held}); rerun with one process")


def on_main(fabric: Fabric | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone (judge calls, cache reads), its result broadcast to every rank.

    An exception on rank 0 is raised on every rank, so no rank is left waiting in a collective.
    ``fn`` must not itself use collectives.
    """
    if world_size(fabric) == 1:
        return fn()
    assert fabric is not None
    result: Any = None
    error: BaseException | None = None
    if is_main(fabric):
        try:
            result = fn()
        except Exception as exc:
            error = exc
    sent = error
    if error is not None and not _picklable(error):
        sent = RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    result, sent = fabric.broadcast((result, sent), src=0)
    if error is not None:
        raise error
    if sent is not None:
        raise sent
    return result  # type: ignore[no-any-return]


@contextmanager
def main_cache(fabric: Fabric | None, directory: str | Path) -> Iterator[Cache | None]:
    """The memo store on rank 0; None on the others, which never read or write it."""
    if not is_main(fabric):
        yield None
        return
    with Cache(directory) as cache:
        yield cache


def quiet_unless_main(fabric: Fabric | None, log: Any) -> Any:
    """``log`` on rank 0, a no-op elsewhere: progress lines are printed once."""
    return log if is_main(fabric) else (lambda *_a, **_k: None)


def rank_log(fabric: Fabric | None, message: str) -> None:
    """A rank-tagged line on stderr when there are several processes (silent with one)."""
    if world_size(fabric) > 1:
        print(f"[rank {rank(fabric)}/{world_size(fabric)}] {message}", file=sys.stderr, flush=True)


def _picklable(obj: Any) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True
