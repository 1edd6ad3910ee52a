"""LLM-as-judge over an OpenAI-compatible chat endpoint (``api.ChatClient``): logprob-weighted scores."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import openai

from persona_steering.api import FAILURES, ChatClient, Tally, describe
from persona_steering.config import JudgeConfig
from persona_steering.judges.base import (
    Judge,
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


class OpenAIJudge(Judge):
    """Scores queries with one chat completion each, ``cfg.concurrency`` calls in flight.

    With ``cfg.use_logprobs`` the score is the probability-weighted mean over the first generated
    token's top logprobs; servers without logprobs fall back to the reply's text. Calls go through
    ``api.ChatClient``, which retries transient failures, pauses every thread for a Retry-After and
    raises ``JudgeError`` for failures that every call would repeat (401, 403, 404, quota) or after
    ``cfg.max_consecutive_failures`` failed requests in a row (a dead endpoint). A query whose
    retries are spent gets ``Verdict(None, ...)``.
    """

    backend = "openai"

    def __init__(self, cfg: JudgeConfig, *, env_file: str | Path = ".env", backoff: float = 0.5) -> None:
        """Read the key and build the client.

        Args:
            cfg: model, endpoint, key variable, timeouts, retry budget and concurrency.
            env_file: a dotenv file read for the key when the environment lacks it (never loaded
                into ``os.environ``).
            backoff: first window in seconds of the random exponential backoff; doubles per attempt.
        """
        self.cfg = cfg
        self._client = ChatClient(cfg, "the openai judge", env_file=env_file, backoff=backoff, logger=log)
        self._logprobs_supported = cfg.use_logprobs

    @property
    def attempts(self) -> int:
        """HTTP requests sent by this instance, retries included."""
        return self._client.attempts

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.cfg.model,
            "base_url": self._client.endpoint,
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
        self._client.reset()
        workers = min(self.cfg.concurrency, len(queries))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        futures = {pool.submit(self._judge_one, q): i for i, q in enumerate(queries)}
        try:
            # Per-call failures come back as verdicts; an exception here is a JudgeError (or a bug,
            # or an interrupt), and every other call would fail the same way: stop them all at once.
            for future in as_completed(futures):
                done(futures[future], future.result())
        except BaseException:
            self._client.stop("the judge stopped")
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
        tally = Tally()
        try:
            response, asked_logprobs = self._ask(prompt, tally)
        except FAILURES as exc:
            log.warning("judge call gave up after %d attempt(s): %s", tally.n, describe(exc))
            return Verdict(None, f"{type(exc).__name__}: {self._client.short(exc)}", {"attempts": tally.n})
        return _verdict(response, kind, asked_logprobs, tally.n)

    def _ask(self, prompt: str, tally: Tally) -> tuple[Any, bool]:
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

    def _complete(self, prompt: str, logprobs: bool, tally: Tally) -> Any:
        settings: dict[str, Any] = {"temperature": 0, "max_tokens": MAX_TOKENS}
        if logprobs:
            settings.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return self._client.chat([{"role": "user", "content": prompt}], tally, **settings)


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
