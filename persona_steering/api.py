"""One OpenAI-compatible chat client: the key, the retry policy, a shared pause and a breaker.

The judge (``judges/openai.py``), the ``openai:`` models of ``evaluate-models`` and ``new-trait``
all call chat completions through ``ChatClient``, so they fail and back off the same way:

- the key comes from the environment, else from a dotenv file (never loaded into ``os.environ``);
  it is never stored in a repr, a log line or an error message;
- transient failures (429 other than spent quota, 408, 409, 5xx, timeouts, dropped connections,
  unreadable 200 bodies) are retried by tenacity within ``max_attempts`` and ``max_retry_seconds``,
  with a random exponential backoff that waits at least the server's Retry-After;
- a Retry-After pauses every thread of the client, not just the one that got it, and
  ``max_consecutive_failures`` failed requests in a row across all threads stop the client (a dead
  endpoint);
- failures that every call would repeat (401, 403, 404, spent quota) raise ``JudgeError`` at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
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
from persona_steering.judges.base import JudgeError

MAX_RETRY_AFTER = 60.0
"""Cap on a server's Retry-After, so one bad header cannot stall a run for hours."""
MAX_BACKOFF = 30.0
"""Cap on the random exponential backoff between attempts."""


class UnreadableReply(Exception):
    """A 200 whose body is not a chat completion (not JSON, not UTF-8, an HTML page): transient."""


FAILURES = (openai.OpenAIError, UnreadableReply)
"""What ``ChatClient.chat`` raises for a call that failed but may work later (retries spent, a 400)."""


@dataclass
class Tally:
    """HTTP requests sent for one logical call (retries and fallbacks included)."""

    n: int = 0


class ChatClient:
    """Chat completions at one endpoint and model, with the project's retry policy.

    Attributes:
        name: how messages name the caller ("the openai judge", "openai:gpt-4o", "new-trait").
        model: the model asked.
        attempts: HTTP requests sent by this client, retries included (thread-safe counter).
    """

    def __init__(
        self,
        cfg: JudgeConfig,
        name: str,
        *,
        model: str | None = None,
        base_url: str | None = None,
        options: str = "judge.model and judge.base_url",
        env_file: str | Path = ".env",
        backoff: float = 0.5,
        logger: logging.Logger | None = None,
    ) -> None:
        """Read the key and build the SDK client and the retry policy.

        Args:
            cfg: key variable, timeout, retry budget and breaker limit (and the defaults below).
            name: how error and log lines name the caller.
            model: the model to ask; None = ``cfg.model``.
            base_url: the endpoint; None = ``cfg.base_url`` (then the SDK default).
            options: the options a user checks when the model or endpoint does not exist.
            env_file: a dotenv file read for the key when the environment lacks it.
            backoff: first window in seconds of the random exponential backoff; doubles per attempt.
            logger: where retries are logged; None = ``persona_steering.api``.
        """
        self.cfg = cfg
        self.name = name
        self.model = model or cfg.model
        self._options = options
        self._log = logger or logging.getLogger("persona_steering.api")
        self._key = _read_key(name, cfg.api_key_env, Path(env_file))
        # The SDK's own retries would retry quota errors and ignore our time budget: off.
        self._client = openai.OpenAI(
            api_key=self._key, base_url=base_url or cfg.base_url, timeout=cfg.timeout, max_retries=0
        )
        self._retrying = Retrying(
            retry=retry_if_exception(retryable),
            wait=_wait_retry_after(wait_random_exponential(multiplier=backoff, max=MAX_BACKOFF)),
            # stop_before_delay also refuses a sleep that would end past the budget.
            stop=stop_after_attempt(cfg.max_attempts) | stop_before_delay(cfg.max_retry_seconds),
            before_sleep=self._log_retry,
            reraise=True,
        )
        self._health = _Health(cfg.max_consecutive_failures)
        self._lock = threading.Lock()
        self.attempts = 0

    @property
    def endpoint(self) -> str:
        return str(self._client.base_url)

    def chat(self, messages: list[dict[str, str]], tally: Tally | None = None, **settings: Any) -> Any:
        """One chat completion, retried as the policy says.

        Args:
            messages: the chat messages.
            tally: counts the HTTP requests this call sends, also when it fails.
            settings: further request fields (temperature, max_tokens, logprobs...).

        Returns:
            The SDK's chat completion.

        Raises:
            JudgeError: a failure every call would repeat, or the client was stopped.
            One of ``FAILURES``: the last error, once the retries are spent or for a 400.
        """
        tally = tally or Tally()

        def send() -> Any:
            self._health.wait()
            tally.n += 1
            with self._lock:
                self.attempts += 1
            try:
                try:
                    create = self._client.chat.completions.create
                    response = _readable(create(model=self.model, messages=messages, **settings))  # type: ignore[arg-type]
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise UnreadableReply(f"a 200 reply that cannot be read: {type(exc).__name__}") from None
            except Exception as exc:
                if retryable(exc):
                    self._health.failed(exc, f"{self.name} at {self.endpoint}")
                raise
            self._health.succeeded()
            return response

        try:
            # A copy per call: retry statistics are per call, and calls run on many threads.
            return self._retrying.copy()(send)
        except FAILURES as exc:
            fatal = self._fatal_reason(exc)
            if fatal is not None:
                raise JudgeError(fatal) from None
            raise

    def reset(self) -> None:
        """Clear a stop and the failure count: a new batch of calls starts."""
        self._health.reset()

    def stop(self, reason: str) -> None:
        """Every thread raises JudgeError(reason) at its next request."""
        self._health.stop(reason)

    def short(self, exc: BaseException, limit: int = 200) -> str:
        """The exception's message, key removed, on one line, at most ``limit`` characters."""
        text = " ".join(str(exc).split()).replace(self._key, "***")
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _fatal_reason(self, exc: BaseException) -> str | None:
        """A message for failures that every call would repeat, else None."""
        env = self.cfg.api_key_env
        if isinstance(exc, openai.RateLimitError) and exc.code == "insufficient_quota":
            reason = f"quota exhausted for the key in {env}"
        elif isinstance(exc, openai.AuthenticationError):
            reason = f"the API key from {env} was rejected; check the key in the environment or .env"
        elif isinstance(exc, openai.PermissionDeniedError):
            reason = f"access denied for model {self.model!r}"
        elif isinstance(exc, openai.NotFoundError):
            reason = f"no model {self.model!r} or no chat completions; check {self._options}"
        else:
            return None
        return f"{self.name} at {self.endpoint}: {describe(exc)}: {reason} ({self.short(exc)})"

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        # Class and status only: server messages may quote the key back.
        self._log.warning(
            "%s request failed with %s (attempt %d of %d); retrying in %.2f s",
            self.name,
            describe(exc),
            state.attempt_number,
            self.cfg.max_attempts,
            sleep,
        )


def retryable(exc: BaseException) -> bool:
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


def describe(exc: BaseException | None) -> str:
    """Class and HTTP status only: a server's message may quote the key back."""
    if exc is None:
        return "no exception"
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__} ({status})" if status is not None else type(exc).__name__


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
    """Shared by every thread of one client: failed requests in a row, one pause, and a stop."""

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
                    f"{where} failed {self._failures} times in a row (last: {describe(exc)}); "
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


def _read_key(name: str, env_var: str, env_file: Path) -> str:
    """The key from the environment, else from the dotenv file; JudgeError naming the variable."""
    key = os.environ.get(env_var)
    if not key and env_file.is_file():
        key = dotenv_values(env_file).get(env_var)
    if not key:
        raise JudgeError(
            f"{name} needs an API key: set {env_var} in the environment or put {env_var}=... in "
            f"{env_file} (judge.api_key_env names the variable)"
        )
    return key
