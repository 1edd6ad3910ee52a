"""Continuous batching: one decode loop, in one thread, for every request the server has in flight.

Each row carries its own steering vector (and layer), sampling settings and generator. A request
is prefilled alone, then its rows join the shared KV-cached batch at the next step boundary; a
row that finishes, or whose client went away, leaves the batch at once. The batch cache is kept
left-padded: joining pads the shorter side on the left, leaving drops rows and the columns no row
needs any more. Greedy float32 answers therefore do not depend on the neighbours (tested).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from persona_steering.generation import (
    drop_rows,
    droppable,
    eos_ids,
    kv_cache,
    last_logits_only,
    penalise_repeats,
    shared_prefix,
)
from persona_steering.runtime import Runtime
from persona_steering.steering import steer, steers_decode, steers_prefix

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at serve.max_queue; the client should retry later."""


class CacheLayoutError(RuntimeError):
    """The model's KV cache is not the plain growing kind the batch can pad, join and drop rows of."""


@dataclass(frozen=True)
class Steering:
    """What a row adds to the residual stream: ``delta`` [hidden] at hidden_states row ``layer``."""

    delta: torch.Tensor | None = None
    layer: int | None = None
    positions: str = "response"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Event:
    """A piece of answer ``index``: new text, and a finish reason on its last event."""

    index: int
    text: str
    finish: str | None = None  # stop, length, or error
    tokens: int = 0  # completion tokens so far


class Job:
    """One request: ``n`` rows from one prompt; its events arrive on ``events`` in the client's loop."""

    def __init__(self, prompt_ids: list[int], steering: Steering, sampling: Sampling, n: int = 1) -> None:
        self.prompt_ids = prompt_ids
        self.steering = steering
        self.sampling = sampling
        self.n = n
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: its rows leave the batch at the next step."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the client's loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    job: Job
    index: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)  # generated token ids
    sent: int = 0  # characters of the answer's text already emitted
    position: int = 0  # position id of the next token fed in


class Scheduler:
    """The decode loop. ``submit`` from any thread; ``start`` runs the loop in a daemon thread."""

    def __init__(self, rt: Runtime, max_queue: int, max_rows: int) -> None:
        self.rt = rt
        self.max_queue = max_queue
        self.max_rows = max_rows
        self.eos = eos_ids(rt)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe across threads
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._extra = last_logits_only(rt.model)
        self._keyword = "past_key_values"
        self.cancelled = 0  # rows freed because their client went away
        self.peak = 0  # most rows decoded together so far
        self._reset()

    def _reset(self) -> None:
        self.rows: list[_Row] = []
        self._cache: Any = None  # the batch's KV cache, left-padded
        self._mask: torch.Tensor | None = None  # [rows, cache_len]
        self._next: list[int] = []  # token each row feeds in next

    # -- public --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.rt.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFull when serve.max_queue requests already wait."""
        if job.n > self.max_rows:
            raise ValueError(f"n={job.n} is more than the server's serve.max_rows={self.max_rows}")
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (serve.max_queue)")
            self._waiting.append(job)
            self._wake.notify()

    @property
    def load(self) -> dict[str, int]:
        return {"rows": len(self.rows), "waiting": len(self._waiting)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="persona-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self.rows:
                        self._wake.wait()
                    if self._stopping:
                        return
                    joining = self._admit()
                if joining:
                    self._guarded(lambda: self._prefill(joining), joining, reset=False)
                if self.rows:
                    self._guarded(
                        self._step, list({id(r.job): r.job for r in self.rows}.values()), reset=True
                    )

    def _guarded(self, work: Any, jobs: list[Job], reset: bool) -> None:
        """The server never dies on one request: a failing forward ends the requests it touched
        (a failed step ends the whole batch, whose cache may be half updated)."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - reported to the clients, logged, and the loop goes on
            log.exception("decode failed")
            for job in jobs:
                for i in range(job.n):
                    job.emit(Event(i, f"{type(exc).__name__}: {exc}", finish="error"))
                job.cancel()
            if reset:
                self._reset()
            else:
                self._drop([r for r in self.rows if r.job.cancelled.is_set()])

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit in the free rows, oldest first (called with the lock held)."""
        joining, free = [], self.max_rows - len(self.rows)
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                continue
            if job.n > free:
                break
            joining.append(self._waiting.popleft())
            free -= job.n
        return joining

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill the joining jobs together, pick each row's first token, join the rows to the batch.

        Rows steered on response positions only (and unsteered rows) take ``generate``'s path: the
        prompt but its last token runs unsteered once per distinct prompt, then the last token runs
        per row, steered; rows that steer the prompt run their whole prompt steered.
        """
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        shared = [j for j in jobs if j.steering.delta is None or not steers_prefix(j.steering.positions)]
        for group in (shared, [j for j in jobs if j not in shared]):
            if group:
                self._prefill_group(group, share_prefix=group is shared)

    def _prefill_group(self, jobs: list[Job], share_prefix: bool) -> None:
        model, device = self.rt.model, self.rt.device
        rows = [
            _Row(j, i, _generator(j.sampling, i), position=len(j.prompt_ids))
            for j in jobs
            for i in range(j.n)
        ]
        width = max(len(r.job.prompt_ids) for r in rows)
        pad = int(self.rt.tokenizer.pad_token_id or 0)
        ids = torch.tensor([[pad] * (width - r.position) + r.job.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - r.position) + [1] * r.position for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [rows, width]
        past: dict[str, Any] = {}
        if share_prefix and width > 1:
            with self.rt.autocast():
                past = shared_prefix(self.rt, ids[:, :-1], mask[:, :-1], positions[:, :-1])
            ids, positions = ids[:, -1:], positions[:, -1:]
        with contextlib.ExitStack() as stack, self.rt.autocast():
            for (layer, where), deltas in _deltas(rows, lambda s: s.positions).items():
                stack.enter_context(steer(model, layer, deltas, where, attention_mask=mask))
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **self._extra,
                **past,
            )
        found = kv_cache(model, out)
        self._keyword = next(iter(found))  # the forward's name for a cache to continue
        cache = found[self._keyword]
        _check_layout(cache)
        self._join(rows, self._advance(rows, out.logits[:, -1, :].float()), cache, mask)

    def _step(self) -> None:
        """One decode step for every row in the batch."""
        gone = [r for r in self.rows if r.job.cancelled.is_set()]
        self.cancelled += len(gone)
        self._drop(gone)
        if not self.rows:
            return
        model, device = self.rt.model, self.rt.device
        assert self._mask is not None
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        tokens = torch.tensor(self._next, device=device)[:, None]  # [rows, 1]
        positions = torch.tensor([r.position for r in self.rows], device=device)[:, None]  # [rows, 1]
        with contextlib.ExitStack() as stack, self.rt.autocast():
            # one token per row: steered unless the row steers its prompt only
            for (layer, _), deltas in _deltas(
                self.rows, lambda s: "response" if steers_decode(s.positions) else None
            ).items():
                stack.enter_context(steer(model, layer, deltas, "response"))
            out = model(
                input_ids=tokens,
                attention_mask=self._mask,
                position_ids=positions,
                use_cache=True,
                **self._extra,
                **{self._keyword: self._cache},
            )
        for r in self.rows:
            r.position += 1
        self._cache = next(iter(kv_cache(model, out).values()))
        nxt = self._advance(self.rows, out.logits[:, -1, :].float())
        self._next = [0 if t is None else t for t in nxt]
        self._drop([r for r, t in zip(self.rows, nxt, strict=True) if t is None])

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[int | None]:
        """Pick each row's next token from ``logits`` [rows, vocab] and emit its text; returns the
        token each row feeds in next, None for a row that is done."""
        nxt: list[int | None] = []
        for b, r in enumerate(rows):
            sampling = r.job.sampling
            row_logits = logits[b : b + 1]  # [1, vocab]
            if sampling.repetition_penalty != 1.0 and r.ids:
                seen = torch.zeros_like(row_logits, dtype=torch.bool)
                seen[0, r.ids] = True
                row_logits = penalise_repeats(row_logits, seen, sampling.repetition_penalty)
            token = _pick(row_logits[0], sampling, r.generator)
            finish = None
            if token in self.eos:
                finish = "stop"
            else:
                r.ids.append(token)
                if len(r.ids) >= sampling.max_tokens:
                    finish = "length"
            finish = self._emit_text(r, finish)
            nxt.append(token if finish is None else None)
        return nxt

    def _emit_text(self, r: _Row, finish: str | None) -> str | None:
        """Emit the text the row's tokens now add, held back where a stop string may be starting."""
        with self.tokenizer_lock:
            text = self.rt.tokenizer.decode(r.ids, skip_special_tokens=True)
        stops = r.job.sampling.stop
        hit = min((text.find(s) for s in stops if s and s in text), default=-1)
        if hit >= 0:
            text, finish = text[:hit], "stop"
        end = len(text)
        if finish is None:
            end = _safe_end(text, stops)
        if end > r.sent or finish is not None:
            r.job.emit(Event(r.index, text[r.sent : max(end, r.sent)], finish, len(r.ids)))
            r.sent = max(end, r.sent)
        return finish

    # -- the batch cache -----------------------------------------------------------------------

    def _join(self, rows: list[_Row], first: list[int | None], cache: Any, mask: torch.Tensor) -> None:
        """Add the prefilled ``rows`` that go on (``first`` token not None) to the batch; ``cache``
        and ``mask`` [rows, prompt_len] hold one row per entry of ``rows``."""
        index = [i for i, t in enumerate(first) if t is not None]
        if not index:
            return
        if len(index) < len(rows):
            cache.batch_select_indices(torch.tensor(index, device=mask.device))
        mask = mask[torch.tensor(index, device=mask.device)]
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.rows.extend(rows[i] for i in index)
        self.peak = max(self.peak, len(self.rows))
        self._next.extend(int(first[i]) for i in index)  # type: ignore[arg-type]

    def _drop(self, leaving: list[_Row]) -> None:
        """Remove rows from the batch, and the left columns no remaining row attends to."""
        if not leaving:
            return
        gone = {id(r) for r in leaving}
        index = [b for b, r in enumerate(self.rows) if id(r) not in gone]
        if not index:
            self._reset()
            return
        assert self._mask is not None
        self._mask = drop_rows(self._cache, self._mask, torch.tensor(index, device=self._mask.device))
        self.rows = [self.rows[b] for b in index]
        self._next = [self._next[b] for b in index]


def _deltas(rows: list[_Row], where: Any) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, positions): [rows, hidden]}: each row's vector in its group, zero in the others.
    ``where(steering)`` gives the positions a row steers now (None: nothing)."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for b, r in enumerate(rows):
        s = r.job.steering
        positions = where(s)
        if s.delta is None or s.layer is None or positions is None:
            continue
        key = (s.layer, positions)
        if key not in out:
            out[key] = torch.zeros(len(rows), s.delta.shape[-1])
        out[key][b] = s.delta
    return out


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` with zeros on the left of ``dim`` up to ``width`` (cache: [rows, heads, len, dim])."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _check_layout(cache: Any) -> None:
    if not droppable(cache):
        layers = getattr(cache, "layers", None)
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise CacheLayoutError(
            f"serve batches models whose KV cache is a plain DynamicCache; this model uses {', '.join(kinds)}"
        )


def _generator(sampling: Sampling, index: int) -> torch.Generator | None:
    """Answer ``index``'s own generator: the same seed gives the same answer, whatever the batch."""
    if sampling.temperature <= 0:
        return None
    return torch.Generator().manual_seed(sampling.seed * 1000003 + index)


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Next token from one row's logits [vocab]: argmax, or a seeded nucleus sample."""
    if generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < sampling.top_p)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent: not a trailing partial character, nor the start of a stop."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
