"""The offline judge on the hand-written calibration set, with the embedded model (integration).

The set in tests/data/judge_calibration/ was written before the judge was tuned and is never edited
to make it pass. The two requirements of issue 10 are asserted per persona as they stand; where the
judge does not meet one yet, the test is a strict xfail that records the measured value, so a fix
turns it into a failure that asks for the mark to go.
"""

from __future__ import annotations

import pytest

from persona_steering.cache import Cache
from persona_steering.calibration import CLASSES, check_persona, load_calibration, pairwise_accuracy
from persona_steering.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = "tests/data/judge_calibration"
PERSONAS = sorted(load_calibration(DATA))

# Measured on 2026-12-07 (offline judge v5, SmolLM2-135M-Instruct): `persona-steering judge-check`.
# v6 only adds the echo gate, and no calibration answer echoes its question, so the counts are v6's too.
# v5 lifted cheerful_best_friend (v4 0.875) and nostalgic_grandpa (v4 0.889) to 0.917 and 0.914.
BELOW_0_9: dict[str, float] = {}
DEGENERATE_ABOVE_UNSTEERED = {
    "nostalgic_grandpa": 1,
    "stoic_engineer": 1,
}


def test_pairwise_accuracy_counts_ties_half_and_none_as_wrong() -> None:
    assert pairwise_accuracy([[3.0, 2.0], [1.0]]) == 1.0
    assert pairwise_accuracy([[1.0], [1.0]]) == 0.5
    assert pairwise_accuracy([[None], [1.0]]) == 0.0
    assert pairwise_accuracy([[2.0], [3.0], [1.0]]) == pytest.approx(2 / 3)


def test_calibration_set_is_complete() -> None:
    sets = load_calibration(DATA)
    assert len(sets) == 5
    for items in sets.values():
        assert len(items) >= 10 and all(item[k].strip() for item in items for k in CLASSES)
        kinds = {item["degenerate_kind"] for item in items}
        assert kinds == {"loop", "salad", "off_topic", "fragment"}


@pytest.fixture(scope="module")
def results(embedded_cache) -> dict:
    from persona_steering.judges import build_judge
    from persona_steering.runtime import load_runtime

    # What `persona-steering judge-check` runs: configs/default.yaml (its repetition penalty
    # decides the unsteered answers every degenerate one is held against), on the CPU.
    cfg = load_config("configs/default.yaml", ["model.accelerator=cpu", f"cache_dir={embedded_cache}"])
    rt = load_runtime(cfg.model, cfg.cache_dir)
    judge = build_judge(cfg.judge, rt, cfg.cache_dir)
    with Cache(cfg.cache_dir) as cache:
        return {
            p: check_persona(judge, rt, cfg, p, items, cache) for p, items in load_calibration(DATA).items()
        }


def _mark(persona: str, known: dict, what: str) -> pytest.MarkDecorator | tuple:
    if persona in known:
        return pytest.param(
            persona, marks=pytest.mark.xfail(strict=True, reason=f"{what}: measured {known[persona]}")
        )
    return persona


@pytest.mark.parametrize("persona", [_mark(p, BELOW_0_9, "pairwise accuracy below 0.9") for p in PERSONAS])
def test_offline_judge_ranks_in_voice_over_assistant_over_degenerate(results: dict, persona: str) -> None:
    assert results[persona]["pairwise_accuracy"] >= 0.9


@pytest.mark.parametrize(
    "persona", [_mark(p, DEGENERATE_ABOVE_UNSTEERED, "degenerate answers above unsteered") for p in PERSONAS]
)
def test_every_degenerate_answer_scores_below_the_unsteered_one(results: dict, persona: str) -> None:
    r = results[persona]
    assert r["degenerate_below_unsteered"] == r["items"] and r["missing"] == 0
