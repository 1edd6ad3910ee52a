"""Trait vectors: answers under pos/neg instructions, one all-layer forward per batch, contrasts.

``run_vectors(cfg)`` is the stage behind ``persona-steering vectors``. Summaries per answer and
layer: ``response_avg`` (mean over the response tokens; the one steering uses), ``prompt_avg``
(mean over prompt tokens, the first token left out: its activation norm is ~100x the others and
would dominate any average) and ``prompt_last`` (the last prompt token).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from persona_steering import __version__
from persona_steering.cache import Cache, digest, exclusive_lock, remove_stale_temps
from persona_steering.config import Config, ConfigError
from persona_steering.distributed import (
    all_reduce_sum,
    main_cache,
    on_main,
    quiet_unless_main,
    rank_log,
    shard,
)
from persona_steering.generation import Answer, Request, batch_rows, generate, no_logits
from persona_steering.layers import capture_layers, decoder_blocks
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.store import load_vectors, save_vectors
from persona_steering.traits import Trait, load_traits
from persona_steering.vectors import DIRECTIONS

SUMMARIES = ("response_avg", "prompt_avg", "prompt_last")
EXTRACTION_VERSION = 1


@dataclass
class TraitResult:
    trait: str
    path: str
    pairs: int
    questions: int
    skipped: bool
    mid_layer: int
    mid_norm: float
    example: dict[str, str]


def render_vectors(results: list[TraitResult]) -> str:
    """Where the vectors went and one line per trait: pairs, a mid-layer norm, written or up to date."""
    lines = [f"vectors in {results[0].path.rsplit('/', 1)[0]}/"] if results else []
    for r in results:
        state = "up to date" if r.skipped else "written"
        lines.append(
            f"  {r.trait}: {r.pairs} pairs from {r.questions} questions, "
            f"|mean_diff| at layer {r.mid_layer} = {r.mid_norm:.2f} ({state})"
        )
    return "\n".join(lines)


def run_vectors(cfg: Config, rt: Runtime | None = None, log: Any = print) -> list[TraitResult]:
    """Extract and save vectors for every configured trait; skip traits whose file is up to date."""
    traits = load_traits(cfg.vectors.trait_dir, cfg.vectors.traits)
    if cfg.vectors.filter_with_judge and cfg.judge.backend in ("embedding", "offline"):
        raise ConfigError(
            "--filter needs a judge that scores traits: --judge openai (with a key) or --judge local"
        )
    ident = identify(cfg.model)
    out_dir = Path(cfg.vectors.out_dir) / ident.slug
    inputs = {t.name: _inputs_digest(cfg, t, ident.fingerprint, ident.precision) for t in traits}
    todo = [t for t in traits if not _up_to_date(out_dir / f"{t.name}.safetensors", inputs[t.name])]
    written: list[Path] = []
    if todo:
        rt = rt or load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
        # Every rank must run the same collectives: all follow rank 0's view of what is up to date.
        names = on_main(rt.fabric, lambda: [t.name for t in todo])
        todo = [t for t in traits if t.name in names]
        log = quiet_unless_main(rt.fabric, log)
        rank_log(rt.fabric, f"extracting {', '.join(names)} from a round-robin share of the rows")
        log(f"extracting {', '.join(names)} into {out_dir}")
        with _writing(rt, out_dir, todo), main_cache(rt.fabric, cfg.cache_dir) as cache:
            recorded: dict[Pair, Activations] | None = {} if cfg.vectors.one_pass else None
            answers = trait_answers(rt, cfg, todo, cache, recorded)
            for trait in todo:
                started = time.perf_counter()
                pos, neg = answers[trait.name]
                kept = _filter_pairs(rt, cfg, trait, pos, neg, cache, log)
                rows = [a for a, _ in kept] + [b for _, b in kept]
                recorded_rows = _activations(rt, rows, recorded or {}, cfg.generation.max_batch, trait.name)
                acts, norms = recorded_rows.means(), recorded_rows.norm_means()
                n = len(kept)
                tensors: dict[str, torch.Tensor] = {}
                for summary in SUMMARIES:
                    for method, fn in DIRECTIONS.items():
                        tensors[f"{method}.{summary}"] = fn(
                            acts[summary][:n], acts[summary][n:]
                        )  # [L+1, hidden]
                    tensors[f"norm.{summary}"] = norms[summary]
                meta = {
                    "model_id": rt.model_id,
                    "fingerprint": rt.fingerprint,
                    "precision": ident.precision,
                    "trait": trait.name,
                    "trait_digest": trait.digest(),
                    "questions": len(trait.extract_questions),
                    "pairs_total": len(pos),
                    "pairs_kept": n,
                    "hidden_size": rt.hidden_size,
                    "num_layers": rt.num_layers,
                    "inputs_digest": inputs[trait.name],
                    "config_digest": cfg.digest("model", "generation", "vectors", "seed"),
                    "version": __version__,
                    "example": {
                        "question": kept[0][0].user,
                        "pos": kept[0][0].answer,
                        "neg": kept[0][1].answer,
                    },
                    "seconds": round(time.perf_counter() - started, 2),
                }
                if rt.rank == 0:
                    save_vectors(out_dir / f"{trait.name}.safetensors", tensors, meta)
                written.append(out_dir / f"{trait.name}.safetensors")
        if rt.world_size > 1:
            rt.fabric.barrier()  # the others read back the files rank 0 wrote
    results = [_skipped(out_dir / f"{t.name}.safetensors") for t in traits if t not in todo]
    results += [_skipped(path, skipped=False) for path in written]
    order = {t.name: i for i, t in enumerate(traits)}
    return sorted(results, key=lambda r: order[r.trait])


@dataclass(frozen=True)
class Pair:
    """One answered prompt: what was asked, under which system prompt, and the answer."""

    user: str
    system: str
    answer: str
    prompt_text: str
    answer_ids: tuple[int, ...]


def trait_answers(
    rt: Runtime,
    cfg: Config,
    traits: list[Trait],
    cache: Cache | None,
    recorded: dict[Pair, Activations] | None = None,
) -> dict[str, tuple[list[Pair], list[Pair]]]:
    """Every pos and neg answer of every trait, in one batched, memoised generate call.

    Under the settings ``vectors`` ran with, every answer is a cache hit: no model work. With
    ``recorded`` (a dict to fill) each answer generated now has its activations recorded while it is
    generated, under its Pair; cached answers are not there and need the recording pass.
    """
    plan: list[tuple[str, str, Request, int]] = []  # (trait, pole, request, replicate)
    for trait in traits:
        n_pairs = len(trait.instructions)
        per_q = min(cfg.vectors.pairs_per_question or n_pairs, n_pairs)
        for j, question in enumerate(trait.extract_questions):
            for pos, neg in (trait.instructions[(j + r) % n_pairs] for r in range(per_q)):
                for k in range(cfg.vectors.n_per_question):
                    plan.append((trait.name, "pos", Request(question, pos), k))
                    plan.append((trait.name, "neg", Request(question, neg), k))
    answers: list[Answer | None] = [None] * len(plan)
    taps: list[tuple[Recorder, int] | None] = [None] * len(plan)
    for k in range(cfg.vectors.n_per_question):
        idx = [i for i, p in enumerate(plan) if p[3] == k]
        recorder = None if recorded is None else Recorder(rt, len(idx))
        outs = generate(
            rt,
            [plan[i][2] for i in idx],
            cfg.generation,
            cache=cache,
            seed=cfg.seed * 1000 + k,
            desc="generating answers",
            record=recorder,
        )
        for j, (i, a) in enumerate(zip(idx, outs, strict=True)):
            answers[i] = a
            taps[i] = None if recorder is None else (recorder, j)
    result: dict[str, tuple[list[Pair], list[Pair]]] = {t.name: ([], []) for t in traits}
    for (trait_name, pole, req, _), ans, tap in zip(plan, answers, taps, strict=True):
        assert ans is not None
        pair = Pair(req.user, req.system or "", ans.text, ans.prompt, tuple(ans.ids))
        result[trait_name][0 if pole == "pos" else 1].append(pair)
        if recorded is not None and tap is not None and bool(tap[0].seen[tap[1]]):
            recorded[pair] = tap[0].activations_of(tap[1])
    return result


def _activations(
    rt: Runtime, rows: list[Pair], recorded: dict[Pair, Activations], max_batch: int | None, name: str
) -> Activations:
    """``rows``' activations: those recorded while generating, and the rest (cached answers) from
    the recording pass."""
    missing = [r for r in rows if r not in recorded]
    if missing:
        passed = record_rows(rt, missing, max_batch, desc=f"{name} activations")
        recorded = recorded | {r: passed.select([i]) for i, r in enumerate(missing)}
    return Activations.cat([recorded[r] for r in rows])


@contextmanager
def _writing(rt: Runtime, out_dir: Path, traits: list[Trait]) -> Iterator[None]:
    """Rank 0 holds ``out_dir``'s lock while it extracts (a second vectors run into the same folder
    stops at once) and first removes the temp files a killed run left beside the vector files."""
    if rt.rank != 0:
        yield
        return
    with exclusive_lock(out_dir / ".lock", f"vectors into {out_dir}"):
        for trait in traits:
            remove_stale_temps(out_dir / f"{trait.name}.safetensors")
        yield


def _filter_pairs(
    rt: Runtime, cfg: Config, trait: Trait, pos: list[Pair], neg: list[Pair], cache: Cache | None, log: Any
) -> list[tuple[Pair, Pair]]:
    """Pairs to use; with vectors.filter_with_judge, only those the judge finds effective."""
    pairs = [(p, n) for p, n in zip(pos, neg, strict=True) if p.answer_ids and n.answer_ids]
    if not cfg.vectors.filter_with_judge:
        log(f"{trait.name}: keeping all {len(pairs)} pairs (no judge filter; --filter --judge openai|local)")
        return pairs
    from persona_steering.judges import Query, build_judge

    queries = []
    for p, n in pairs:
        for a in (p, n):
            queries.append(Query("trait", a.user, a.answer, rubric=trait.eval_prompt, trait=trait.name))
            queries.append(Query("coherence", a.user, a.answer))
    v = on_main(rt.fabric, lambda: build_judge(cfg.judge, rt).judge(queries, cache))  # judged once
    thr = cfg.vectors.filter_threshold
    kept = []
    for i, pair in enumerate(pairs):
        pt, pc, nt, nc = (x.score for x in v[4 * i : 4 * i + 4])
        if None in (pt, pc, nt, nc):
            continue
        if pt >= thr and nt < thr and pc >= 50 and nc >= 50:  # type: ignore[operator]
            kept.append(pair)
    log(f"{trait.name}: judge kept {len(kept)} of {len(pairs)} pairs")
    if not kept:
        raise RuntimeError(
            f"{trait.name}: the judge found no effective pair; strengthen the instructions in {trait.path}"
        )
    return kept


def record_activations(
    rt: Runtime, rows: list[Pair], max_batch: int | None, desc: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-row summaries at every hidden_states row, from one forward per batch.

    Returns:
        ({summary: [rows, L+1, hidden]}, {summary: [L+1] mean token norm}).
    """
    acts = record_rows(rt, rows, max_batch, desc)
    return acts.means(), acts.norm_means()


def record_rows(rt: Runtime, rows: list[Pair], max_batch: int | None, desc: str | None = None) -> Activations:
    """The recording pass: prompt + answer of each row in one forward per batch, every layer summed.

    Each layer is reduced to its summaries inside the hook, on the model's device, so memory holds
    one layer's states at a time rather than all of them (about 3 GB per batch of 64 on an 8B model).
    With several processes each records its round-robin share of the rows and the sums are added
    up, so every rank returns the full result.
    """
    recorder = Recorder(rt, len(rows))
    _record_share(rt, recorder, rows, shard(len(rows), rt.fabric), max_batch, desc if rt.rank == 0 else None)
    recorder.all_reduce(rt.fabric)
    return recorder.activations()


@dataclass
class Activations:
    """Rows' activation summaries at every hidden_states row, kept as sums with their token counts so
    that rows recorded by different passes combine exactly (``cat``, ``select``)."""

    sums: dict[str, torch.Tensor]  # {summary: [rows, L+1, hidden]} sums over the summary's tokens
    counts: torch.Tensor  # [rows, summaries] tokens summed
    norms: torch.Tensor  # [rows, summaries, L+1] float64 sums of those tokens' norms

    def means(self) -> dict[str, torch.Tensor]:
        """{summary: [rows, L+1, hidden]}: each row's mean (zero where it has no such token)."""
        return {
            s: self.sums[s] / self.counts[:, k].clamp_min(1).to(self.sums[s].dtype)[:, None, None]
            for k, s in enumerate(SUMMARIES)
        }

    def norm_means(self) -> dict[str, torch.Tensor]:
        """{summary: [L+1]}: the mean token norm over every row's tokens."""
        total = self.norms.sum(0)  # [summaries, L+1]
        counts = self.counts.sum(0).clamp_min(1)  # [summaries]
        return {s: (total[k] / counts[k]).float() for k, s in enumerate(SUMMARIES)}

    def select(self, rows: list[int]) -> Activations:
        index = torch.tensor(rows, dtype=torch.long)
        return Activations({s: t[index] for s, t in self.sums.items()}, self.counts[index], self.norms[index])

    @staticmethod
    def cat(parts: list[Activations]) -> Activations:
        return Activations(
            {s: torch.cat([p.sums[s] for p in parts]) for s in SUMMARIES},
            torch.cat([p.counts for p in parts]),
            torch.cat([p.norms for p in parts]),
        )


class Recorder:
    """Sums of each row's activation summaries at every hidden_states row, over whatever forwards
    report to it. Two kinds do: the recording pass over prompt + answer (``record_rows``) and the
    decode loop while the answer is generated (``generate(..., record=...)``: the prompt forward, then
    one token per step). Both say which tokens count through ``observe``, so a summary means the same
    either way. The sums live on the model's device until ``activations``.
    """

    def __init__(self, rt: Runtime, n: int) -> None:
        layers = len(decoder_blocks(rt.model)) + 1
        dev = rt.device
        self.acts = Activations(
            {s: torch.zeros(n, layers, rt.hidden_size, device=dev) for s in SUMMARIES},
            torch.zeros(n, len(SUMMARIES), dtype=torch.float64, device=dev),
            torch.zeros(n, len(SUMMARIES), layers, dtype=torch.float64, device=dev),
        )
        self.seen = torch.zeros(n, dtype=torch.bool, device=dev)  # rows some forward reported
        self._rows = torch.zeros(0, dtype=torch.long, device=dev)
        self._masks: dict[str, torch.Tensor] = {}
        self._layer = 0

    @contextmanager
    def hooked(self, model: torch.nn.Module) -> Iterator[Recorder]:
        """While inside, every forward of ``model`` adds to the rows and tokens ``observe`` named."""
        with capture_layers(model, self._reduce):
            yield self

    def observe(self, rows: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        """The next forward: recorder row of each batch row [batch], and for some summaries a
        [batch, seq] mask of the tokens it adds (seq = the forward's new tokens)."""
        self._rows = rows.to(self.seen.device)
        self._masks = {s: m.to(self.seen.device, torch.float32) for s, m in masks.items()}
        self._layer = 0
        for s, m in self._masks.items():
            self.acts.counts[self._rows, SUMMARIES.index(s)] += m.sum(1).double()
        self.seen[self._rows] = True

    def prompt(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """A forward over whole left-padded prompts ([batch, len] attention mask): ``prompt_avg``
        leaves the first token out (its activation norm is ~100x the others), ``prompt_last`` is the
        last column."""
        first = (mask.cumsum(1) == 1) & (mask == 1)
        last = torch.zeros_like(mask)
        last[:, -1] = 1
        self.observe(rows, {"prompt_avg": mask * ~first, "prompt_last": last})

    def answer(self, rows: torch.Tensor, fed: torch.Tensor) -> None:
        """A decode step: ``fed`` [batch] says whether the token each row is fed is part of its answer."""
        self.observe(rows, {"response_avg": fed[:, None]})

    def _reduce(self, hidden: torch.Tensor) -> None:
        h = hidden.float()  # [batch, seq, hidden]
        norms = h.norm(dim=-1)  # [batch, seq]
        for s, m in self._masks.items():
            k = SUMMARIES.index(s)
            self.acts.sums[s][self._rows, self._layer] += (m[:, :, None] * h).sum(1)
            self.acts.norms[self._rows, k, self._layer] += (m * norms).sum(1).double()
        self._layer += 1

    def all_reduce(self, fabric: Any) -> None:
        """Every rank's rows on every rank (each row is recorded by one rank, zeros elsewhere)."""
        for s in SUMMARIES:
            self.acts.sums[s] = all_reduce_sum(fabric, self.acts.sums[s])
        self.acts.counts = all_reduce_sum(fabric, self.acts.counts)
        self.acts.norms = all_reduce_sum(fabric, self.acts.norms)
        self.seen = all_reduce_sum(fabric, self.seen.long()) > 0

    def activations_of(self, row: int) -> Activations:
        """One row's recording, on the CPU."""
        a = self.acts
        return Activations(
            {s: t[row : row + 1].cpu() for s, t in a.sums.items()},
            a.counts[row : row + 1].cpu(),
            a.norms[row : row + 1].cpu(),
        )

    def activations(self) -> Activations:
        """Everything recorded, on the CPU."""
        a = self.acts
        return Activations({s: t.cpu() for s, t in a.sums.items()}, a.counts.cpu(), a.norms.cpu())


@torch.inference_mode()
def _record_share(
    rt: Runtime,
    recorder: Recorder,
    rows: list[Pair],
    mine: list[int],
    max_batch: int | None,
    desc: str | None,
) -> None:
    """Record rows ``mine`` of ``rows`` into ``recorder``, sorted by length, a batch per forward."""
    order = sorted(mine, key=lambda i: len(rows[i].answer_ids))
    pad = rt.tokenizer.pad_token_id or 0
    bar = tqdm(total=len(order), desc=desc, disable=desc is None, leave=False)
    prompt_ids = {i: rt.tokenizer(rows[i].prompt_text, add_special_tokens=False)["input_ids"] for i in order}
    longest = max((len(prompt_ids[i]) + len(rows[i].answer_ids) for i in order), default=1)
    per_batch = batch_rows(rt, max_batch, longest, whole_rows=True)
    with recorder.hooked(rt.model), rt.autocast():
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            prompts = [prompt_ids[i] for i in idx]
            seqs = [p + list(rows[i].answer_ids) for p, i in zip(prompts, idx, strict=True)]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=rt.device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=rt.device)
            recorder.observe(torch.tensor(idx), _summary_masks(prompts, seqs, width, rt.device))
            rt.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                **no_logits(rt.model),  # the hooks record the hidden states; no logits wanted
            )
            bar.update(len(idx))
    bar.close()


def _summary_masks(
    prompts: list[list[int]], seqs: list[list[int]], width: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """[batch, seq] float masks of the tokens each summary averages, under left padding."""
    masks = {s: torch.zeros(len(seqs), width, device=device) for s in SUMMARIES}
    for b, (p, seq) in enumerate(zip(prompts, seqs, strict=True)):
        first = width - len(seq)
        end_prompt = first + len(p)
        masks["prompt_avg"][b, first + 1 : end_prompt] = 1.0  # the first token's huge norm stays out
        masks["prompt_last"][b, end_prompt - 1] = 1.0
        masks["response_avg"][b, end_prompt:] = 1.0
    return masks


def _inputs_digest(cfg: Config, trait: Trait, fingerprint: str, precision: str) -> str:
    """Everything a trait's vector file depends on; equal digests mean the file is up to date."""
    return digest(
        {
            "version": EXTRACTION_VERSION,
            "model": fingerprint,
            "precision": precision,
            "trait": trait.digest(),
            "generation": cfg.generation.outcome() | {"max_batch": None},  # None: as before outcome()
            "n_per_question": cfg.vectors.n_per_question,
            "pairs_per_question": cfg.vectors.pairs_per_question,
            "filter": [
                cfg.vectors.filter_with_judge,
                cfg.vectors.filter_threshold,
                asdict(cfg.judge) if cfg.vectors.filter_with_judge else None,
            ],
            "seed": cfg.seed,
        },
        16,
    )


def _up_to_date(path: Path, inputs_digest: str) -> bool:
    if not path.is_file():
        return False
    try:
        return load_vectors(path).meta.get("inputs_digest") == inputs_digest
    except ValueError:
        return False


def _skipped(path: Path, skipped: bool = True) -> TraitResult:
    vf = load_vectors(path)
    mid = max(1, round(vf.meta["num_layers"] * 2 / 3))
    return TraitResult(
        trait=vf.meta["trait"],
        path=str(path),
        pairs=vf.meta["pairs_kept"],
        questions=vf.meta["questions"],
        skipped=skipped,
        mid_layer=mid,
        mid_norm=float(vf.tensors["mean_diff.response_avg"][mid].norm()),
        example=vf.meta.get("example", {}),
    )
