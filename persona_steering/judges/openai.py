"""LLM-as-judge over any OpenAI-compatible chat endpoint: tenacity retries, logprob-weighted scores."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import openai
from dotenv import dotenv_values
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from persona_steering.config import JudgeConfig
from persona_steering.judges.base import (
    Judge,
    JudgeError,
    Kind,
    Query,
    Verdict,
    combine_fit,
    parse_score,
    render,
    render_fit,
    weighted_score,
)

log = logging.getLogger("persona_steering.judges")

MAX_TOKENS = 5
"""Room for "100" under any tokenizer; a longer reply is cut and checked for a truncated number."""
TOP_LOGPROBS = 20
"""The most the OpenAI API returns per position."""
MAX_RETRY_AFTER = 60.0
"""Cap on a server's Retry-After, so one bad header cannot stall a run for hours."""
MAX_BACKOFF = 30.0
"""Cap on the random exponential backoff between attempts."""


class UnreadableReply(Exception):
    """A 200 whose body is not a chat completion (not JSON, not UTF-8, an HTML page): transient."""


class OpenAIJudge(Judge):
    """Scores queries with one chat completion each, ``cfg.concurrency`` calls in flight.

    With ``cfg.use_logprobs`` the score is the probability-weighted mean over the first generated
    token's top logprobs; servers without logprobs fall back to the reply's text. Retryable
    failures (429 other than quota, 5xx, timeouts, dropped connections, unreadable 200 bodies) are
    retried by tenacity within ``cfg.max_attempts`` and ``cfg.max_retry_seconds``; a query that
    still fails gets ``Verdict(None, ...)``. Failures that every call would repeat (401, 403, 404,
    quota) raise ``JudgeError``, and so do ``cfg.max_consecutive_failures`` failed requests in a
    row across all threads (a dead endpoint). A Retry-After pauses every thread, not just the one
    that got it.

    Attributes:
        attempts: HTTP requests sent by this instance, retries included (thread-safe counter).
    """

    backend = "openai"

    def __init__(self, cfg: JudgeConfig, *, env_file: str | Path = ".env", backoff: float = 0.5) -> None:
        """Read the key and build the client and the retry policy.

        Args:
            cfg: model, endpoint, key variable, timeouts, retry budget and concurrency.
            env_file: a dotenv file read for the key when the environment lacks it (never loaded
                into ``os.environ``).
            backoff: first window in seconds of the random exponential backoff; doubles per attempt.
        """
        self.cfg = cfg
        self._key = _read_key(cfg.api_key_env, Path(env_file))
        # The SDK's own retries would retry quota errors and ignore our time budget: off.
        self._client = openai.OpenAI(
            api_key=self._key, base_url=cfg.base_url, timeout=cfg.timeout, max_retries=0
        )
        self._retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=_wait_retry_after(wait_random_exponential(multiplier=backoff, max=MAX_BACKOFF)),
            # stop_before_delay also refuses a sleep that would end past the budget.
            stop=stop_after_attempt(cfg.max_attempts) | stop_before_delay(cfg.max_retry_seconds),
            before_sleep=self._log_retry,
            reraise=True,
        )
        self._logprobs_supported = cfg.use_logprobs
        self._lock = threading.Lock()
        self._health = _Health(cfg.max_consecutive_failures)
        self.attempts = 0

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.cfg.model,
            "base_url": str(self._client.base_url),
            # Weighted and text scores differ for the same query: keep them apart in the cache. This
            # is how the next calls are scored; a verdict is stored under how it was (scored_by).
            "scoring": "logprobs" if self._logprobs_supported else "text",
        }

    def scored_by(self, verdict: Verdict) -> dict[str, Any]:
        return {**self.identity(), "scoring": verdict.meta.get("source", "text")}

    def _judge(self, queries: list[Query]) -> list[Verdict]:
        out: dict[int, Verdict] = {}
        self._judge_each(queries, out.__setitem__)
        return [out[i] for i in range(len(queries))]

    def _judge_each(self, queries: list[Query], done: Callable[[int, Verdict], None]) -> None:
        if not queries:
            return
        self._health.reset()
        workers = min(self.cfg.concurrency, len(queries))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        futures = {pool.submit(self._judge_one, q): i for i, q in enumerate(queries)}
        try:
            # Per-call failures come back as verdicts; an exception here is a JudgeError (or a bug,
            # or an interrupt), and every other call would fail the same way: stop them all at once.
            for future in as_completed(futures):
                done(futures[future], future.result())
        except BaseException:
            self._health.stop("the judge stopped")
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _judge_one(self, query: Query) -> Verdict:
        if query.kind == "persona_fit":
            # Six single-digit calls (three parts, both answer orders); any failure fails the verdict.
            scores, sources = {}, set()
            for label, prompt in render_fit(query).items():
                verdict = self._judge_prompt(prompt, query.kind)
                if verdict.score is None:
                    return Verdict(None, f"{label[0]}, order {label[1]}: {verdict.detail}", verdict.meta)
                scores[label] = verdict.score
                sources.add(verdict.meta.get("source"))
            fit = combine_fit(dict(scores))
            # Weighted only if all six were: one text-scored part makes it a text-scored verdict.
            source = "logprobs" if sources == {"logprobs"} else "text"
            return Verdict(fit.score, fit.detail, {**fit.meta, "source": source})
        return self._judge_prompt(render(query), query.kind)

    def _judge_prompt(self, prompt: str, kind: Kind) -> Verdict:
        tally = _Tally()
        try:
            response, asked_logprobs = self._ask(prompt, tally)
        except (openai.OpenAIError, UnreadableReply) as exc:
            fatal = self._fatal_reason(exc)
            if fatal is not None:
                raise JudgeError(fatal) from None
            log.warning("judge call gave up after %d attempt(s): %s", tally.n, _describe(exc))
            return Verdict(None, f"{type(exc).__name__}: {self._short(exc)}", {"attempts": tally.n})
        return _verdict(response, kind, asked_logprobs, tally.n)

    def _ask(self, prompt: str, tally: _Tally) -> tuple[Any, bool]:
        """(response, whether logprobs were asked for); falls back to plain text on a 400."""
        if self._logprobs_supported:
            try:
                return self._complete(prompt, True, tally), True
            except openai.BadRequestError:
                pass  # maybe this server rejects logprobs: try once without them
            response = self._complete(prompt, False, tally)
            # Only a plain request that passes proves the 400 was about logprobs.
            if self._logprobs_supported:
                self._logprobs_supported = False
                log.warning("judge endpoint rejects logprobs requests; scoring from reply text from now on")
            return response, False
        return self._complete(prompt, False, tally), False

    def _complete(self, prompt: str, logprobs: bool, tally: _Tally) -> Any:
        """One chat completion, retried as the policy says; raises the last error when it gives up."""
        kwargs: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
        }
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=TOP_LOGPROBS)

        def call() -> Any:
            self._health.wait()
            tally.n += 1
            with self._lock:
                self.attempts += 1
            try:
                try:
                    response = _readable(self._client.chat.completions.create(**kwargs))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise UnreadableReply(f"a 200 reply that cannot be read: {type(exc).__name__}") from None
            except Exception as exc:
                if _retryable(exc):
                    self._health.failed(exc, f"judge endpoint {self._client.base_url}")
                raise
            self._health.succeeded()
            return response

        # A copy per call: retry statistics are per call, and calls run on many threads.
        return self._retrying.copy()(call)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        # Class and status only: server messages may quote the key back.
        log.warning(
            "judge request failed with %s (attempt %d of %d); retrying in %.2f s",
            _describe(exc),
            state.attempt_number,
            self.cfg.max_attempts,
            sleep,
        )

    def _fatal_reason(self, exc: BaseException) -> str | None:
        """A message for failures that every call would repeat, else None."""
        where = f"judge endpoint {self._client.base_url}"
        if isinstance(exc, openai.RateLimitError) and exc.code == "insufficient_quota":
            return f"{where}: quota exhausted for the key in {self.cfg.api_key_env} ({self._short(exc)})"
        if isinstance(exc, openai.AuthenticationError):
            return (
                f"{where} rejected the API key from {self.cfg.api_key_env} (401): {self._short(exc)}; "
                f"check the key in the environment or .env"
            )
        if isinstance(exc, openai.PermissionDeniedError):
            return f"{where} denied access (403) for model {self.cfg.model!r}: {self._short(exc)}"
        if isinstance(exc, openai.NotFoundError):
            return (
                f"{where} has no model {self.cfg.model!r} or no chat completions (404): "
                f"{self._short(exc)}; check judge.model and judge.base_url"
            )
        return None

    def _short(self, exc: BaseException, limit: int = 200) -> str:
        """The exception's message, key removed, on one line, at most ``limit`` characters."""
        text = " ".join(str(exc).split()).replace(self._key, "***")
        return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Tally:
    """HTTP requests sent for one query (logprobs fallback and retries included)."""

    n: int = 0


class _wait_retry_after(wait_base):
    """The fallback backoff, but at least the server's Retry-After (capped)."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.fallback(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = _retry_after(exc)
        return wait if hint is None else max(wait, min(hint, MAX_RETRY_AFTER))


class _Health:
    """Shared by every thread of one judge: failed requests in a row, one pause, and a stop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._failures = 0
        self._resume_at = 0.0  # time.monotonic() before which no thread sends a request
        self._stopped: str | None = None

    def reset(self) -> None:
        with self._lock:
            self._stopped, self._failures = None, 0

    def stop(self, reason: str) -> None:
        """Every thread raises JudgeError at its next request (queued work is cancelled)."""
        with self._lock:
            self._stopped = self._stopped or reason

    def wait(self) -> None:
        """Sleep out the shared pause; JudgeError once stopped."""
        while True:
            with self._lock:
                if self._stopped:
                    raise JudgeError(self._stopped)
                left = self._resume_at - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))  # short steps: a stop ends the wait quickly

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def failed(self, exc: BaseException, where: str) -> None:
        """Count a transient failure; honour its Retry-After for every thread; trip the breaker."""
        hint = _retry_after(exc)
        with self._lock:
            self._failures += 1
            if hint is not None:
                until = time.monotonic() + min(hint, MAX_RETRY_AFTER)
                self._resume_at = max(self._resume_at, until)
            if self._failures >= self.limit and not self._stopped:
                self._stopped = (
                    f"{where} failed {self._failures} times in a row (last: {_describe(exc)}); "
                    "stopped (judge.max_consecutive_failures): is the endpoint up?"
                )
            stopped = self._stopped
        if stopped:
            raise JudgeError(stopped) from None


def _readable(response: Any) -> Any:
    """``response`` if it is a chat completion; UnreadableReply for any other 200 body."""
    if not isinstance(getattr(response, "choices", None), list):
        shown = repr(response)[:60] if isinstance(response, str) else type(response).__name__
        raise UnreadableReply(f"a 200 reply that is not a chat completion: {shown}")
    return response


def _retryable(exc: BaseException) -> bool:
    """Transient failures only: a 4xx other than 408/409/429, or spent quota, would fail again."""
    if isinstance(exc, UnreadableReply):
        return True  # a 200 whose body broke in transit, or a proxy's error page
    if isinstance(exc, openai.RateLimitError):
        return exc.code != "insufficient_quota"
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    if isinstance(exc, openai.APIStatusError):
        # The SDK's own policy retries 408 (request timeout) and 409 (lock conflict) too.
        return exc.status_code >= 500 or exc.status_code in (408, 409)
    return False


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After in seconds or a date)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(float(ms) / 1000.0, 0.0)
        if (value := headers.get("retry-after")) is None:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None  # an unreadable header is no hint


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no exception"
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__} ({status})" if status is not None else type(exc).__name__


def _read_key(env_var: str, env_file: Path) -> str:
    """The key from the environment, else from the dotenv file; JudgeError naming the variable."""
    key = os.environ.get(env_var)
    if not key and env_file.is_file():
        key = dotenv_values(env_file).get(env_var)
    if not key:
        raise JudgeError(
            f"the openai judge needs an API key: set the environment variable {env_var} "
            f"or put {env_var}=... in {env_file} (judge.api_key_env names the variable)"
        )
    return key


def _verdict(response: Any, kind: Kind, asked_logprobs: bool, attempts: int) -> Verdict:
    """Turn a completion into a verdict: logprob-weighted when possible, else the reply's number."""
    meta: dict[str, Any] = {"attempts": attempts}
    if not response.choices:
        return Verdict(None, "empty response: no choices", meta)
    choice = response.choices[0]
    text = choice.message.content or ""
    shown = repr(text[:40])
    if asked_logprobs and (probs := _first_token_probs(choice, text, kind)) is not None:
        meta["source"] = "logprobs"
        score = weighted_score(probs, kind)
        if score is None:
            return Verdict(
                None, f"no verdict: valid scores hold < 25% of the first token's mass ({shown})", meta
            )
        return Verdict(score, f"logprobs ({shown})", meta)
    meta["source"] = "text"
    if choice.finish_reason == "length" and re.search(r"\d\s*$", text):
        # Cut off right after digits: "10" may have been "100"; never guess.
        return Verdict(None, f"unparseable: reply cut off at max_tokens ({shown})", meta)
    score = parse_score(text, kind)
    if score is None:
        return Verdict(None, f"unparseable: {shown}", meta)
    return Verdict(score, f"text ({shown})", meta)


def _first_token_probs(choice: Any, text: str, kind: Kind) -> dict[str, float] | None:
    """First-token probabilities, or None when they do not describe the score.

    They do only when the first token is the reply's whole number: with a tokenizer that splits
    "85" into "8" "5", the first position is a distribution over leading digits, not scores.
    """
    content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
    if not content:
        return None
    first = content[0]
    number = re.match(r"\s*(\d+)", text)
    if number is None or first.token.strip() != number.group(1):
        return None
    tops = first.top_logprobs or [first]
    probs: dict[str, float] = {}
    for top in tops:
        probs[top.token] = probs.get(top.token, 0.0) + math.exp(top.logprob)
    return probs
