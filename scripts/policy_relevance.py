"""Relevance from the policy model instead of MiniLM: an experiment on a hand-written judge set.

Rule, fixed before the first number was seen (2026-12-07): ``rel_pmi(a, q) = max(0, 2r - 1)`` where
``r`` is the share of the prompt pool's other questions ``q'`` (``fit.questions``: the training and
held-out prompts) with mean log p(a | q) > mean log p(a | q') under the unsteered model, ties half:
the same rank form as the offline judge's MiniLM relevance, with the policy model in its place. Three
variants are scored, with style and fluency from the offline judge as it is: ``emb`` (relevance as
today), ``pmi`` (replaced) and ``min`` (the lower of the two). On the dev set only, a variant
qualifies if it keeps pairwise accuracy >= 0.9 for all five personas and puts every degenerate answer
below the unsteered one; ``pmi`` is preferred to ``min``. Only a qualifying variant would be run on
the calibration set, once. Result: docs/policy_relevance.md (neither qualified).

    python scripts/policy_relevance.py tests/data/judge_dev runs/policy_relevance.json

Log-probabilities are memoised in ``<out>.logprobs.json`` (the pool is 50 questions: 50 forward rows
per answer, about 20 minutes for the dev set on a 2-core CPU).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from persona_steering.cache import Cache
from persona_steering.calibration import load_calibration, pairwise_accuracy
from persona_steering.config import load_config
from persona_steering.contrast import fit_context
from persona_steering.generation import Request, generate
from persona_steering.judges import build_judge
from persona_steering.judges.base import joint_score
from persona_steering.judges.offline import mean_logprobs
from persona_steering.runtime import load_runtime
from persona_steering.traits import load_persona

KINDS = ("in_voice", "assistant", "degenerate", "unsteered")


def main(data: str, out: str) -> None:
    cfg = load_config("configs/default.yaml", ["model.accelerator=cpu"])
    rt = load_runtime(cfg.model, cfg.cache_dir)
    memo_path = Path(out + ".logprobs.json")
    memo = {}
    if memo_path.is_file():
        memo = {tuple(json.loads(k)): v for k, v in json.loads(memo_path.read_text()).items()}
    res: dict = {}
    t0 = time.time()
    with Cache(cfg.cache_dir) as cache:
        judge = build_judge(cfg.judge, rt, cfg.cache_dir)
        for pid, items in load_calibration(data).items():
            fit = fit_context(rt, cfg, load_persona(cfg.optimize.persona_dir, pid), cache)
            qs = [i["question"] for i in items]
            base = [a.text for a in generate(rt, [Request(q) for q in qs], cfg.generation, cache=cache)]
            rows = []
            for it, b in zip(items, base, strict=True):
                ans = {k: (it[k] if k != "unsteered" else b) for k in KINDS}
                vs = judge.judge([fit.query(it["question"], ans[k], b) for k in KINDS], cache)
                rows.append((it, ans, vs))
            pool = list(fit.questions)
            todo = sorted({(q, a) for _, ans, _ in rows for a in ans.values() for q in pool} - set(memo))
            for s in range(0, len(todo), 32):
                chunk = todo[s : s + 32]
                for pair, value in zip(chunk, mean_logprobs(rt, chunk), strict=True):
                    memo[pair] = value
            print(pid, "scored", len(todo), "pairs", round(time.time() - t0), "s", flush=True)
            per: dict = {v: {k: [] for k in KINDS} for v in ("emb", "pmi", "min")}
            detail = []
            for it, ans, vs in rows:
                q = it["question"]
                for k, v in zip(KINDS, vs, strict=True):
                    own = memo[(q, ans[k])]
                    others = [memo[(o, ans[k])] for o in pool if o != q]
                    r = (sum(o < own for o in others) + 0.5 * sum(o == own for o in others)) / len(others)
                    pmi = max(0.0, 2 * r - 1)
                    parts = dict(v.meta["parts"])
                    emb = parts["relevance"]
                    for var, rel in (("emb", emb), ("pmi", pmi), ("min", min(emb, pmi))):
                        per[var][k].append(round(joint_score({**parts, "relevance": rel}), 4))
                    detail.append({"q": q, "kind": k, "emb": emb, "pmi": round(pmi, 3), "answer": ans[k]})
            res[pid] = {"detail": detail}
            for var, sc in per.items():
                below = sum(d < u for d, u in zip(sc["degenerate"], sc["unsteered"], strict=True))
                res[pid][var] = {
                    "pairwise": round(pairwise_accuracy([sc[k] for k in KINDS[:3]]) or 0.0, 3),
                    "deg_below": f"{below}/{len(items)}",
                    "means": {k: round(sum(x) / len(x), 2) for k, x in sc.items()},
                }
            memo_path.write_text(json.dumps({json.dumps(list(k)): v for k, v in memo.items()}))
    Path(out).write_text(json.dumps(res, indent=1))
    for pid, r in res.items():
        print(pid, {v: (r[v]["pairwise"], r[v]["deg_below"]) for v in ("emb", "pmi", "min")})
    print("seconds", round(time.time() - t0))


if __name__ == "__main__":
    main(*sys.argv[1:3])
