"""Apply docs/budget_iterations.md's rule: nine CMA-ES iterations against twelve, on held-out prompts.

    python scripts/budget_iterations.py runs/axis5_v6 runs/axis5_v6_it9

Reads each run's ``<persona>_evaluation.json`` (from ``evaluate --methods base,...,proposed``) and
prints, per judge, ``proposed - base`` with its Holm p, the paired ``proposed(short) - proposed(long)``
with Holm over the personas, loop rates, and the rule's four checks on the embedding judge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from persona_steering.evaluate.stats import holm, sign_flip_test

PERSONAS = (
    "cheerful_best_friend",
    "nostalgic_grandpa",
    "corporate_consultant",
    "stoic_engineer",
    "dramatic_storyteller",
)
DECIDING = "embedding"  # the judge CMA-ES does not climb


def main(long_dir: str, short_dir: str) -> None:
    long = {p: json.loads((Path(long_dir) / f"{p}_evaluation.json").read_text()) for p in PERSONAS}
    short = {p: json.loads((Path(short_dir) / f"{p}_evaluation.json").read_text()) for p in PERSONAS}
    checks: dict[str, bool] = {}
    for judge in long[PERSONAS[0]]["scores"]:
        print(
            f"\n{judge}: proposed - base (Holm p), long | short; short - long paired (Holm p over personas)\n"
        )
        print("| persona | long | short | short - long | loop rate base / long / short |")
        print("| --- | --- | --- | --- | --- |")
        tests = []
        for p in PERSONAS:
            a = short[p]["scores"][judge]["proposed"]["persona_fit"]["per_prompt"]
            b = long[p]["scores"][judge]["proposed"]["persona_fit"]["per_prompt"]
            tests.append(sign_flip_test(a, b))
        adjusted = holm([t.p if t else None for t in tests])
        sums = {"long": 0.0, "short": 0.0}
        significant = {"long": 0, "short": 0}
        loops_ok, worse = True, False
        for p, t, p_adj in zip(PERSONAS, tests, adjusted, strict=True):
            cells = []
            for name, run in (("long", long[p]), ("short", short[p])):
                vs = run["scores"][judge]["proposed"]["persona_fit"]["vs_base"]
                sums[name] += vs["diff"]
                significant[name] += int(vs["p_holm"] < 0.05 and vs["diff"] > 0)
                cells.append(f"{vs['diff']:+.2f} ({vs['p_holm']:.3f})")
            rates = [
                run["scores"][judge][m]["loop_rate"]["mean"]
                for run, m in ((long[p], "base"), (long[p], "proposed"), (short[p], "proposed"))
            ]
            loops_ok &= rates[2] <= rates[0] + 0.05
            assert t is not None and p_adj is not None
            loop_cell = " / ".join(f"{r:.2f}" for r in rates)
            print(f"| {p} | {cells[0]} | {cells[1]} | {t.diff:+.2f} ({p_adj:.3f}) | {loop_cell} |")
            worse |= t.diff < 0 and p_adj < 0.05
        print(
            f"| sum (significant over base) | {sums['long']:+.2f} ({significant['long']}/5) "
            f"| {sums['short']:+.2f} ({significant['short']}/5) | | |"
        )
        if judge == DECIDING:
            checks["1. short sum >= 90% of long sum"] = sums["short"] >= 0.9 * sums["long"]
            checks["2. no persona significantly worse"] = not worse
            checks["3. >= 3 of 5 beat base"] = significant["short"] >= 3
            checks["4. loop rate <= base + 5 points"] = loops_ok
    print(f"\nrule on the {DECIDING} judge:")
    for name, ok in checks.items():
        print(f"- {name}: {'yes' if ok else 'NO'}")
    print("adopt the shorter budget" if all(checks.values()) else "keep the longer budget")


if __name__ == "__main__":
    main(*sys.argv[1:3])
