"""Judging while the policy model generates.

A population's answers come out of ``generate`` block by block. ``JudgeAhead`` judges each block in
one background thread while the next block decodes. The verdicts land in the cache, so the judge call
that follows the generation (with its re-asking of missing verdicts) finds them there and only waits
for what is still in flight. Verdicts are the same either way: a cached verdict is the value the same
query would get.

Only judges that never run the policy model may judge ahead: the offline judge scores fluency with
the very model being steered, and the local judge may share it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from persona_steering.cache import Cache
from persona_steering.judges.base import Judge, Query, Verdict

__all__ = ["JudgeAhead", "may_judge_ahead"]


def may_judge_ahead(mode: str, judge: Judge, device_type: str) -> bool:
    """Whether ``judge.while_generating`` (``mode``) lets ``judge`` judge a block while the next one
    generates on a policy model on ``device_type``: never a judge that runs the policy model, and on
    ``auto`` not a CPU judge beside a CPU policy (they would compete for the same cores)."""
    if mode == "never" or judge.uses_policy_model:
        return False
    return not (mode == "auto" and judge.computes_on_cpu and device_type == "cpu")


class JudgeAhead:
    """A background judge for blocks of queries; a context manager that waits for them on exit.

    Args:
        cache: where verdicts are stored (judging ahead needs it: the result is the warm cache).
        enabled: the configuration's switch (``judge.while_generating``) and any caller condition.
    """

    def __init__(self, cache: Cache | None, enabled: bool) -> None:
        self.cache = cache
        self.enabled = enabled and cache is not None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[list[Verdict]]] = []

    def accepts(self, judge: Judge) -> bool:
        """Whether ``judge``'s queries are judged ahead (never a judge that runs the policy model)."""
        return self.enabled and not judge.uses_policy_model

    def submit(self, judge: Judge, queries: list[Query]) -> None:
        """Judge ``queries`` in the background, if ``judge`` may; else do nothing (judged later)."""
        if not queries or not self.accepts(judge):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge-ahead")
        self._pending.append(self._pool.submit(judge.judge, queries, self.cache))

    def __enter__(self) -> JudgeAhead:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Wait for the blocks in flight. On success a judge that failed outright (a dead endpoint)
        raises here; after another error, blocks not yet started are dropped."""
        if self._pool is None:
            return
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)
        if kind is None:
            for future in self._pending:
                future.result()
