"""LLM-as-judge on a local Hugging Face causal LM: expected score under the model's likelihoods.

Each query's judge prompt goes through the model's chat template; every candidate score
(1..5, or 0, 10, ..., 100) is scored by log p(candidate tokens, end of turn | prompt), the
candidates are softmaxed against each other, and the verdict is the expected value. Nothing is
sampled, so verdicts are deterministic, and a number split into digit tokens is scored as a whole.

Cost: the prompts of a chunk run once, with a KV cache; the candidates then run as short
continuations of that cache (rows = queries x candidates, a few tokens each), instead of
repeating a several-hundred-token prompt once per candidate.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from persona_steering.generation import kv_cache
from persona_steering.judges.base import (
    SCALES,
    Judge,
    Kind,
    Query,
    Verdict,
    combine_fit,
    precision_key,
    render,
    render_fit,
)
from persona_steering.runtime import Runtime

log = logging.getLogger("persona_steering.judges")


def candidates(kind: Kind) -> list[int]:
    """Scores the judge chooses between: every value on a 1..5 scale, every tenth on 0..100."""
    low, high = SCALES[kind]
    step = 1 if high - low <= 10 else 10
    return list(range(low, high + 1, step))


class LocalJudge(Judge):
    """Judges with the model in ``runtime``, ``batch_size`` queries per pair of forward passes."""

    backend = "local"
    uses_policy_model = True  # it may be the policy model itself (judge.model: same)

    def __init__(self, runtime: Runtime, batch_size: int = 8) -> None:
        """Wrap a loaded runtime; the model is put in eval mode.

        Args:
            runtime: the loaded judge model and tokenizer (may be the policy model itself).
            batch_size: queries per chunk; each chunk also runs batch_size x candidates short rows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.runtime = runtime
        self.batch_size = batch_size
        runtime.model.eval()  # dropout off: verdicts must not depend on chance
        tok = runtime.tokenizer
        self._has_template = bool(getattr(tok, "chat_template", None))
        if not self._has_template:
            log.warning("judge tokenizer %s has no chat template: prompting with raw text", runtime.model_id)
        # Candidates end with the end-of-turn token, so "10" cannot borrow the mass of "100".
        self._end = [tok.eos_token_id] if tok.eos_token_id is not None else []
        # Only the last position's logits are needed from the prompt pass (not [n, seq, vocab]).
        forward_params = inspect.signature(runtime.model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._pad = int(pad) if pad is not None else 0

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.runtime.model_id,
            "fingerprint": self.runtime.fingerprint,
            **precision_key(self.runtime),
        }

    def _judge(self, queries: list[Query]) -> list[Verdict]:
        # A persona-fit query is six 1-5 prompts (three parts, both answer orders), combined after.
        texts: list[tuple[int, tuple[str, int] | None, str, Kind]] = []  # (query, part, prompt, kind)
        for i, q in enumerate(queries):
            if q.kind == "persona_fit":
                texts += [(i, label, prompt, q.kind) for label, prompt in render_fit(q).items()]
            else:
                texts.append((i, None, render(q), q.kind))
        scored: list[Verdict | None] = [None] * len(texts)
        # Chunks share one candidate set, so group prompts by kind first.
        for kind in dict.fromkeys(t[3] for t in texts):
            index = [j for j, t in enumerate(texts) if t[3] == kind]
            for start in range(0, len(index), self.batch_size):
                rows = index[start : start + self.batch_size]
                for j, verdict in zip(
                    rows, self._judge_chunk([texts[j][2] for j in rows], kind), strict=True
                ):
                    scored[j] = verdict
        parts: dict[int, dict[tuple[str, int], float | None]] = {}
        out: list[Verdict | None] = [None] * len(queries)
        for (i, label, _, _), maybe in zip(texts, scored, strict=True):
            assert maybe is not None
            if label is None:
                out[i] = maybe
            else:
                parts.setdefault(i, {})[label] = maybe.score
        for i, scores in parts.items():
            out[i] = combine_fit(scores)
        return [v for v in out if v is not None]

    def _judge_chunk(self, texts: list[str], kind: Kind) -> list[Verdict]:
        values = candidates(kind)
        chats = [self._chat(t) for t in texts]
        prompts = [self._ids(chat) for chat in chats]
        conts = [
            [self._continuation(ch, p, str(v)) for v in values] for ch, p in zip(chats, prompts, strict=True)
        ]
        logp = self.candidate_logprobs(prompts, conts)  # [queries, candidates]
        probs = logp.softmax(-1)
        expected = probs @ torch.tensor(values, dtype=probs.dtype)
        verdicts = []
        for row, score in zip(probs, expected.tolist(), strict=True):
            best = int(row.argmax())
            detail = f"expected score over candidates; most likely {values[best]} (p={float(row[best]):.2f})"
            verdicts.append(Verdict(float(score), detail, {"p_max": float(row[best])}))
        return verdicts

    def candidate_logprobs(self, prompts: list[list[int]], conts: list[list[list[int]]]) -> torch.Tensor:
        """log p(continuation | prompt) for every prompt and each of its continuations.

        Args:
            prompts: token ids per prompt.
            conts: per prompt, the same number C of non-empty continuations (token ids).

        Returns:
            Float32 tensor ``[len(prompts), C]`` on the CPU.
        """
        model, device = self.runtime.model, self.runtime.device
        n, c = len(prompts), len(conts[0])
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        flat = [cont for row in conts for cont in row]
        k = max(len(t) for t in flat)
        cont_ids = torch.full((n * c, k), self._pad, dtype=torch.long)
        cont_mask = torch.zeros((n * c, k), dtype=torch.long)
        for j, t in enumerate(flat):  # right padding: a continuation never attends to later pads
            cont_ids[j, : len(t)] = torch.tensor(t)
            cont_mask[j, : len(t)] = 1
        with torch.inference_mode(), self.runtime.autocast():
            first = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                use_cache=True,
                **self._keep_last,
            )
            lp_first = first.logits[:, -1].float().log_softmax(-1).cpu()  # [n, vocab]
            lp_next = None
            if k > 1:
                past = kv_cache(model, first)
                next(iter(past.values())).reorder_cache(torch.arange(n, device=device).repeat_interleave(c))
                lengths = mask.sum(-1).repeat_interleave(c)  # [n * c]
                second = model(
                    input_ids=cont_ids.to(device),
                    attention_mask=torch.cat([mask.repeat_interleave(c, 0), cont_mask], -1).to(device),
                    position_ids=(lengths[:, None] + torch.arange(k)).to(device),
                    use_cache=True,
                    **past,
                )
                lp_next = second.logits.float().log_softmax(-1).cpu()  # [n * c, k, vocab]
        out = torch.empty(n * c)
        for j, t in enumerate(flat):
            total = lp_first[j // c, t[0]]
            for step in range(1, len(t)):
                assert lp_next is not None
                total = total + lp_next[j, step - 1, t[step]]
            out[j] = total
        return out.view(n, c)

    def _chat(self, text: str) -> str:
        """The judge prompt as the model sees it: through the chat template when there is one."""
        if not self._has_template:
            return text
        return str(
            self.runtime.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        )

    def _ids(self, text: str) -> list[int]:
        # A chat template writes any BOS into the text itself; raw text needs the tokenizer's.
        return list(self.runtime.tokenizer(text, add_special_tokens=not self._has_template)["input_ids"])

    def _continuation(self, chat: str, prompt: list[int], answer: str) -> list[int]:
        """Token ids of ``answer`` as the model would write it right after ``chat``, plus end of turn."""
        # Tokenised in context where that keeps the prompt's tokens: "85" after "\n" may differ from
        # "85" alone (SentencePiece adds a leading space to a lone word).
        full = self._ids(chat + answer)
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            ids = full[len(prompt) :]
        else:
            ids = list(self.runtime.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return ids + self._end
