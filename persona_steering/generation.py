"""Batched, left-padded, optionally steered generation with a vector per row, memoised per row.

Used by extraction, optimisation and evaluation alike. Greedy by default; with temperature > 0
each row samples from its own generator seeded by the row's key, so a row's answer does not
depend on which other rows share its batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from persona_steering.cache import Cache, digest
from persona_steering.config import GenerationConfig
from persona_steering.distributed import gather_objects, on_main, rank, world_size
from persona_steering.runtime import Runtime
from persona_steering.steering import SteeringSpec

GENERATION_VERSION = 2
"""Part of every generation's cache key: bump it when this module would answer differently."""


@dataclass(frozen=True)
class Request:
    """One answer to produce: a user message under an optional system prompt."""

    user: str
    system: str | None = None


@dataclass(frozen=True)
class Answer:
    text: str
    ids: list[int]  # generated token ids, without the end-of-turn token
    prompt: str  # the chat-templated prompt text the model saw


class Tap(Protocol):
    """What ``generate`` tells an activation recorder (``extraction.Recorder``) about each forward."""

    def hooked(self, model: torch.nn.Module) -> AbstractContextManager[Any]:
        """Hooks on ``model`` while generating."""
        ...

    def prompt(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Before the forward over whole prompts: the request index of each batch row, and the
        [batch, len] attention mask of the left-padded prompts."""
        ...

    def answer(self, rows: torch.Tensor, fed: torch.Tensor) -> None:
        """Before a decode forward: the request index of each batch row, and [batch] whether the
        token it is fed belongs to its answer (not an end token or padding)."""
        ...

    def all_reduce(self, fabric: Any) -> None:
        """After generating: every rank's rows on every rank."""
        ...


def chat_text(tokenizer: Any, request: Request) -> str:
    """The prompt text in the tokenizer's chat template, ready for the assistant's turn.

    A template without a system role (Gemma's raises on one) gets the system text at the start of
    the user turn instead: vectors and the prompt baseline depend on system prompts.
    """
    if not getattr(tokenizer, "chat_template", None):
        system = f"{request.system}\n\n" if request.system else ""
        return f"{system}User: {request.user}\nAssistant:"
    user = {"role": "user", "content": request.user}
    if request.system:
        try:
            return _templated(tokenizer, [{"role": "system", "content": request.system}, user])
        except TemplateError:
            user = {"role": "user", "content": f"{request.system}\n\n{request.user}"}
    return _templated(tokenizer, [user])


def messages_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """A whole conversation (system, user and assistant turns) in the chat template, ready for the
    assistant's next turn; ``chat_text`` is the one-turn case. System turns go into the first user
    turn where the template has no system role, as in ``chat_text``."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        names = {"system": "", "user": "User: ", "assistant": "Assistant: "}
        return "\n".join(f"{names.get(m['role'], '')}{m['content']}" for m in msgs) + "\nAssistant:"
    try:
        return _templated(tokenizer, msgs)
    except TemplateError:
        system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
        rest = [m for m in msgs if m["role"] != "system"]
        if system and rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        return _templated(tokenizer, rest)


def _templated(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def generate(
    rt: Runtime,
    requests: Sequence[Request],
    gen: GenerationConfig,
    *,
    steering: SteeringSpec | None = None,
    cache: Cache | None = None,
    seed: int = 0,
    desc: str | None = None,
    record: Tap | None = None,
    on_answers: Callable[[dict[int, Answer]], None] | None = None,
) -> list[Answer]:
    """Answers for ``requests`` in order; each row steered by its own ``steering`` row if given.

    Args:
        rt: the loaded model.
        requests: what to answer.
        gen: generation settings (``max_batch`` rows per forward, see ``batch_rows``).
        steering: one vector per request, its layer and positions; an all-zero row is unsteered.
        cache: memo store; a warm call does no model work.
        seed: sampling seed (unused when greedy).
        desc: progress bar label; None hides the bar.
        record: told about every forward of the rows it generates (indexed like ``requests``), so
            that their activations are recorded while they are generated, with no second pass. A
            cached row, or a repeat of a row in the same call, is not generated and not reported.
        on_answers: called (in this thread, on every rank) with {request index: answer} as answers
            become known: the cached ones first, then each generated block, every request once. A
            caller can start work on them (``judge_ahead``) while the next block generates.
    """
    if steering is not None and len(steering) != len(requests):
        raise ValueError(f"{len(steering)} steering rows for {len(requests)} requests")
    texts = [chat_text(rt.tokenizer, r) for r in requests]
    keys = [_row_key(rt, texts[i], gen, seed, steering, i) for i in range(len(requests))]
    fabric = getattr(rt, "fabric", None)
    hits, todo = on_main(fabric, lambda: _lookup(keys, cache))  # rank 0 alone reads the cache
    results = {kd: Answer(text=h["text"], ids=h["ids"], prompt=texts[i]) for kd, (h, i) in hits.items()}
    requests_of: dict[str, list[int]] = {}  # row digest -> every request it answers
    for i, key in enumerate(keys):
        requests_of.setdefault(digest(key), []).append(i)

    def tell(kds: Iterable[str]) -> None:
        if on_answers is not None:
            known = {i: results[kd] for kd in kds for i in requests_of[kd]}
            if known:
                on_answers(known)

    tell(hits)
    rows = sorted(todo.items(), key=lambda kv: len(texts[kv[1]]))  # similar lengths share a batch
    # With several processes each block of max_batch rows per rank (fewer where prompt lengths jump,
    # see ``blocks``) is dealt round-robin, decoded, and gathered back to every rank; rank 0 stores
    # the block, so a kill loses one block at most.
    world, me = world_size(fabric), rank(fabric)
    per_rank = gen.max_batch
    if per_rank is None and rows:  # from memory; rank 0's choice, so that every rank deals the same blocks
        longest = max(
            len(ids)
            for ids in rt.tokenizer([texts[i] for _, i in rows], add_special_tokens=False)["input_ids"]
        )
        per_rank = on_main(fabric, lambda: batch_rows(rt, None, longest + gen.max_new_tokens))
    per_rank = per_rank or 1
    bar = tqdm(total=len(rows), desc=desc, disable=desc is None or not rows or me != 0, leave=False)
    for start, end in blocks([len(texts[i]) for _, i in rows], per_rank * world):
        block = rows[start:end]
        idx = [i for _, i in block[me::world]]
        outs: list[list[int]] = []
        if idx:
            chunk = None if steering is None else steering.rows(idx)
            tap = None if record is None else (record, idx)
            outs = _generate_batch(rt, [texts[i] for i in idx], gen, chunk, [keys[i] for i in idx], seed, tap)
        for (kd, i), ids in zip(block, gather_objects(fabric, outs, len(block)), strict=True):
            text = rt.tokenizer.decode(ids, skip_special_tokens=True).strip()
            results[kd] = Answer(text=text, ids=ids, prompt=texts[i])
            if cache is not None and me == 0:
                cache.set("generation", keys[i], {"text": text, "ids": ids})
        tell(kd for kd, _ in block)
        bar.update(len(block))
    bar.close()
    if record is not None:
        record.all_reduce(fabric)
    return [results[digest(k)] for k in keys]


LENGTH_RATIO = 2.0
"""A block's longest prompt is at most this many times its shortest (in characters), or the block
ends there. A batch is left-padded to its longest prompt, and the padding costs as much as tokens:
evaluate's 200 held-out rows (120 plain prompts, 40 under a one-line style prompt, 40 under a
1.3 kB profile) took 118-127 s in one block and 48-52 s in three (embedded model, 2-core CPU)."""


def blocks(lengths: Sequence[int], size: int, ratio: float = LENGTH_RATIO) -> list[tuple[int, int]]:
    """[start, end) of each block of rows sorted by prompt length (``lengths``, ascending): at most
    ``size`` rows, and a new block wherever a row's prompt is over ``ratio`` times the block's first."""
    out: list[tuple[int, int]] = []
    start = 0
    for i, n in enumerate(lengths):
        if i > start and (i - start >= size or n > ratio * lengths[start]):
            out.append((start, i))
            start = i
    if lengths:
        out.append((start, len(lengths)))
    return out


def _lookup(
    keys: list[dict[str, Any]], cache: Cache | None
) -> tuple[dict[str, tuple[dict[str, Any], int]], dict[str, int]]:
    """({row digest: (cached value, first row)}, {row digest: first row to generate}), each row once."""
    hits: dict[str, tuple[dict[str, Any], int]] = {}
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        kd = digest(key)
        if kd in hits or kd in todo:
            continue
        hit = cache.get("generation", key) if cache is not None else None
        if _usable(hit):
            assert hit is not None
            hits[kd] = (hit, i)
        else:
            todo[kd] = i
    return hits, todo


def _usable(hit: Any) -> bool:
    """A cached answer of the shape ``generate`` writes; anything else (an edited row) is a miss."""
    return (
        isinstance(hit, dict)
        and isinstance(hit.get("text"), str)
        and isinstance(hit.get("ids"), list)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in hit["ids"])
    )


def generate_population(
    rt: Runtime,
    prompts: Sequence[str],
    gen: GenerationConfig,
    steering: SteeringSpec,
    *,
    cache: Cache | None = None,
    seed: int = 0,
    desc: str | None = None,
    on_answers: Callable[[dict[tuple[int, int], Answer]], None] | None = None,
) -> list[list[Answer]]:
    """Answers [candidate][prompt] for ``steering``'s rows (one per candidate): every (candidate,
    prompt) row in one ``generate`` call (chunked by ``max_batch``), each row with its candidate's
    vector. This is how optimisation, evaluation and the benchmark answer a whole population.
    ``on_answers`` gets {(candidate, prompt index): answer} as ``generate``'s does."""
    n = len(prompts)
    rows = [Request(p) for _ in range(len(steering)) for p in prompts]  # candidate-major
    tell = None
    if on_answers is not None:
        report = on_answers

        def tell(known: dict[int, Answer]) -> None:
            report({divmod(i, n): a for i, a in known.items()})

    out = generate(
        rt, rows, gen, steering=steering.repeat(n), cache=cache, seed=seed, desc=desc, on_answers=tell
    )
    return [out[c * n : (c + 1) * n] for c in range(len(steering))]


def _row_key(
    rt: Runtime,
    text: str,
    gen: GenerationConfig,
    seed: int,
    steering: SteeringSpec | None,
    i: int,
) -> dict[str, Any]:
    """Everything that determines a row's answer (``GenerationConfig.outcome``: not how rows share
    forward passes); the seed only matters when sampling."""
    settings = gen.outcome()
    return {
        "model": rt.fingerprint,
        "dtype": str(rt.model.dtype),
        # bf16-mixed and 32-true hold float32 weights alike, but compute differently.
        "precision": rt.precision,
        "v": GENERATION_VERSION,
        "prompt": text,
        "gen": settings,
        "seed": seed if gen.temperature > 0 else None,
        "steer": None if steering is None else steering.row_key(i),
    }


@torch.inference_mode()
def _generate_batch(
    rt: Runtime,
    texts: list[str],
    gen: GenerationConfig,
    steering: SteeringSpec | None,
    keys: list[dict[str, Any]],
    seed: int,
    tap: tuple[Tap, list[int]] | None = None,
) -> list[list[int]]:
    """A KV-cached decode loop over one left-padded batch; returns generated ids per row.

    With ``tap`` (a recorder and the request index of each row) every forward is reported to it,
    and the last token of a row cut off at ``max_new_tokens`` is fed once more so that each answer
    token's activations are computed."""
    tok = rt.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].to(rt.device)  # [batch, prompt_len]
    mask = enc["attention_mask"].to(rt.device)  # [batch, prompt_len]
    batch = ids.shape[0]
    eos = eos_ids(rt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
    generators = None
    if gen.temperature > 0:
        generators = [torch.Generator().manual_seed(int(digest([seed, k], 15), 16)) for k in keys]
    ctx: Any = nullcontext() if steering is None else steering.apply(rt.model, attention_mask=mask)
    out_ids = torch.full((batch, gen.max_new_tokens), pad, dtype=torch.long, device=rt.device)
    lengths = torch.full((batch,), gen.max_new_tokens, dtype=torch.long, device=rt.device)
    live = torch.arange(batch, device=rt.device)  # the batch row of each row still decoding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = last_logits_only(rt.model)
    eos_t = torch.tensor(sorted(eos), device=rt.device)
    # Unless the prefix is steered, the prompt's prefix is computed once per distinct prompt (one per
    # prompt, not per candidate, in a population) and only the last prompt token runs per row, steered.
    past = None
    recorder = None if tap is None else tap[0]
    tap_rows = torch.tensor([] if tap is None else tap[1], dtype=torch.long, device=rt.device)
    hooks: Any = nullcontext() if recorder is None else recorder.hooked(rt.model)
    if recorder is not None:  # the recorder sees whole prompts: no shared prefix
        recorder.prompt(tap_rows, mask)
    elif ids.shape[1] > 1 and (steering is None or not steering.steers_prefix):
        with rt.autocast():
            past = shared_prefix(rt, ids[:, :-1], mask[:, :-1], position_ids[:, :-1])
    with ctx as steered, hooks, rt.autocast():
        if past is None:
            out = rt.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **extra
            )
        else:
            last = slice(ids.shape[1] - 1, None)
            out = rt.model(
                input_ids=ids[:, last],
                attention_mask=mask,
                position_ids=position_ids[:, last],
                use_cache=True,
                **extra,
                **past,
            )
        cache = kv_cache(rt.model, out)
        leave = gen.finished_rows_leave and droppable(next(iter(cache.values())))
        seen = None  # [live rows, vocab]: tokens each row has produced, for the repetition penalty
        finished = torch.zeros(batch, dtype=torch.bool, device=rt.device)  # [live rows]
        for step in range(gen.max_new_tokens):
            logits = out.logits[:, -1, :].float()  # [live rows, vocab]
            if gen.repetition_penalty != 1.0:
                if seen is None:
                    seen = torch.zeros_like(logits, dtype=torch.bool)
                logits = penalise_repeats(logits, seen, gen.repetition_penalty)
            nxt = _pick(logits, gen, generators)
            if seen is not None:
                seen[torch.arange(len(live), device=seen.device), nxt] = True
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # rows that ended feed padding
            out_ids[live, step] = nxt
            ended = torch.isin(nxt, eos_t) & ~finished
            lengths[live[ended]] = step
            finished |= ended
            cut = step == gen.max_new_tokens - 1
            if bool(finished.all()) or (cut and recorder is None):
                break
            position_ids = position_ids[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if leave and bool(ended.any()):
                # Rows that ended leave the batch and stop costing compute (the server's continuous
                # batching drops rows the same way, with drop_rows).
                keep = (~finished).nonzero().squeeze(1)
                mask = drop_rows(next(iter(cache.values())), mask, keep)
                live, nxt, position_ids, finished = live[keep], nxt[keep], position_ids[keep], finished[keep]
                seen = None if seen is None else seen[keep]
                generators = None if generators is None else [generators[int(k)] for k in keep]
                if steered is not None:
                    steered.keep(keep)
            if recorder is not None:
                recorder.answer(tap_rows[live], ~finished)
            out = rt.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **extra,
                **cache,
            )
            if cut:  # the recorder has seen the cut-off rows' last token
                break
            cache = kv_cache(rt.model, out)
    return [out_ids[b, : int(lengths[b])].tolist() for b in range(batch)]


AUTO_MAX_ROWS = 256
"""The most rows ``batch_rows`` picks: the cache stores a batch whole, so a kill loses one batch at most."""
MEMORY_FRACTION = 0.5
"""The share of free memory ``batch_rows`` fills, leaving room for the caller and allocator slack."""


CPU_WHOLE_ROWS = 32
"""On a CPU a forward over whole rows at once (the activation-recording pass: compute-bound, padded to
the longest row) is fastest in small batches, unlike decoding: 80 rows x ~86 tokens took 10.4-11.2 s
in batches of 16, 10.8-11.0 s of 32, 11.3-14.0 s of 64 and 12.3-19.1 s in one batch of 80 (three
interleaved repeats each, embedded model, float32)."""


def batch_rows(rt: Runtime, max_batch: int | None, tokens: int, whole_rows: bool = False) -> int:
    """Rows per forward: ``max_batch`` when set; else as many rows of ``tokens`` tokens (prompt plus
    new tokens) as fit MEMORY_FRACTION of the free memory, between 1 and AUTO_MAX_ROWS, or 64 where
    the memory or the model's shape cannot be read. ``whole_rows``: the forward runs every token of
    a row at once rather than decoding, so on a CPU it takes at most CPU_WHOLE_ROWS."""
    if max_batch is not None:
        return max_batch
    per_row, free = row_bytes(rt, tokens), free_memory(rt.device)
    rows = 64 if per_row is None or free is None else int(MEMORY_FRACTION * free // per_row)
    rows = max(1, min(AUTO_MAX_ROWS, rows))
    return min(rows, CPU_WHOLE_ROWS) if whole_rows and rt.device.type == "cpu" else rows


def row_bytes(rt: Runtime, tokens: int) -> int | None:
    """Bytes one row of ``tokens`` tokens needs at its peak: its KV cache twice (torch.cat copies it
    as it grows), one layer's activations and attention scores over the whole row (the prefill),
    and float32 next-token logits a few times over (penalty, softmax, sort)."""
    c = getattr(rt.model, "config", None)
    c = getattr(c, "text_config", None) or c
    layers, hidden = getattr(c, "num_hidden_layers", None), getattr(c, "hidden_size", None)
    heads, vocab = getattr(c, "num_attention_heads", None), getattr(c, "vocab_size", None)
    if not (layers and hidden and heads and vocab):
        return None
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    inter = getattr(c, "intermediate_size", None) or 4 * hidden
    elem = rt.model.dtype.itemsize
    kv = 2 * 2 * layers * kv_heads * head_dim * tokens * elem
    activations = tokens * (4 * hidden + 3 * inter) * 4 + heads * tokens * tokens * 4
    return int(kv + activations + 4 * vocab * 4)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, or the RAM the kernel reports available (MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def droppable(cache: Any) -> bool:
    """Whether rows can leave this KV cache: a plain growing cache of [rows, heads, len, dim] keys and
    values per layer (not a static, sliding-window or quantised one)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def drop_rows(cache: Any, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only rows ``keep`` of a left-padded batch: its KV cache in place (see ``droppable``), and
    its attention mask [rows, len], returned without the left columns no remaining row attends to."""
    mask = mask[keep]
    start = int((mask.sum(0) > 0).nonzero()[0])  # first column some remaining row attends to
    for layer in cache.layers:
        layer.keys = layer.keys[keep, :, start:]
        layer.values = layer.values[keep, :, start:]
    return mask[:, start:]


def shared_prefix(
    rt: Runtime, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor
) -> dict[str, Any]:
    """The KV cache of an unsteered forward over ``ids`` [batch, len], run once per distinct row and
    expanded to every row, as the keyword argument that continues it."""
    first: dict[tuple[int, ...], int] = {}  # distinct row -> its index among the distinct rows
    pick: list[int] = []  # batch row computed for each distinct row
    inverse: list[int] = []  # distinct row of each batch row
    for b, row in enumerate(ids.tolist()):
        j = first.setdefault(tuple(row), len(first))
        if j == len(pick):
            pick.append(b)
        inverse.append(j)

    def run(rows: list[int]) -> dict[str, Any]:
        index = torch.tensor(rows, device=ids.device)
        out = rt.model(
            input_ids=ids[index],
            attention_mask=mask[index],
            position_ids=position_ids[index],
            use_cache=True,
            **no_logits(rt.model),  # only the KV cache is wanted
        )
        return kv_cache(rt.model, out)

    past = run(pick)
    if len(pick) < len(inverse):
        cache = next(iter(past.values()))
        if not hasattr(cache, "reorder_cache"):  # a cache that cannot be expanded: every row runs it
            return run(list(range(len(inverse))))
        cache.reorder_cache(torch.tensor(inverse, device=ids.device))
    return past


def kv_cache(model: torch.nn.Module, out: Any) -> dict[str, Any]:
    """The KV cache of a forward's output ``out`` as the keyword the model's forward takes:
    ``cache`` in recent transformers 5 (``past_key_values`` is deprecated there and goes in 5.40),
    ``past_key_values`` before."""
    cls = type(model)
    if cls not in _CACHE_KEYWORD:  # read once per model class, not on every decode step
        takes_cache = "cache" in inspect.signature(cls.forward).parameters
        _CACHE_KEYWORD[cls] = "cache" if takes_cache else "past_key_values"
    name = _CACHE_KEYWORD[cls]
    return {name: getattr(out, name)}


_CACHE_KEYWORD: dict[type, str] = {}


def last_logits_only(model: torch.nn.Module) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model takes it: the LM head then runs on one position, not all."""
    return {"logits_to_keep": 1} if _keeps_logits(model) else {}


def no_logits(model: torch.nn.Module) -> dict[str, Any]:
    """``logits_to_keep`` with no position where the model takes it: the LM head runs on nothing, for
    a forward whose caller wants only the KV cache or the hidden states. (``logits_to_keep=1`` on a
    batch runs the head on one column per row, about 80 ms for 16 rows of SmolLM2 on this CPU.)"""
    if not _keeps_logits(model):
        return {}
    return {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=model.device)}


def _keeps_logits(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: logits [batch, vocab] of tokens in ``seen`` made less likely."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def _pick(
    logits: torch.Tensor, gen: GenerationConfig, generators: list[torch.Generator] | None
) -> torch.Tensor:
    if generators is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / gen.temperature, dim=-1).cpu()
    if gen.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < gen.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    picks = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


def eos_ids(rt: Runtime) -> set[int]:
    """Every token id that ends a turn: the model's and generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(rt.model, "generation_config", None), rt.model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if rt.tokenizer.eos_token_id is not None:
        ids.add(int(rt.tokenizer.eos_token_id))
    return ids
