"""The HTML report from a real tiny-model project (optimise, evaluate): sections, embedded images,
balanced markup, escaped text, fallbacks when files are missing, and bad input."""

from __future__ import annotations

import base64
import copy
import json
import shutil
from html.parser import HTMLParser

import pytest
import torch
from tests_helpers import build_project

from persona_steering.cli import main
from persona_steering.config import ConfigError, load_config
from persona_steering.evaluate.run import run_evaluate
from persona_steering.html_report import render_report
from persona_steering.optimize import run_optimize
from persona_steering.record import PersonaRecord
from persona_steering.rendering import fmt_interval

SECTIONS = ["persona", "configuration", "convergence", "weights", "evaluation", "answers", "interference"]
VOID = {"meta", "img", "br", "hr", "link", "input"}
NASTY = '<script>alert("x")</script> & <b>bold</b>'


class Page(HTMLParser):
    """Sections, images, cells and whether every element was closed in order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self.tags: list[str] = []
        self.stack: list[str] = []
        self.balanced = True
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()
        self.balanced &= not self.stack

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None
        if not self.stack or self.stack.pop() != tag:
            self.balanced = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A tiny project optimised for 2 iterations and evaluated with base, prompt and proposed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a second intra-op thread only spin-waits on tiny models
    root = tmp_path_factory.mktemp("report-project")
    overrides = build_project(root, tiny_model_dir)
    quiet = dict(log=lambda *_: None)
    run_optimize(
        load_config(None, [*overrides, "optimize.max_iterations=2", "optimize.population_size=2"]), **quiet
    )
    run_evaluate(load_config(None, [*overrides, "evaluate.methods=[base, prompt, proposed]"]), **quiet)
    torch.set_num_threads(before)
    return root, overrides


def report_cli(overrides: list[str], *extra: str) -> int:
    return main(["report", *sum((["--set", o] for o in overrides), []), *extra])


def test_report_has_every_section_embedded_images_and_the_evaluation(finished, tmp_path):
    root, overrides = finished
    assert report_cli(overrides, "--out-dir", str(tmp_path)) == 0
    text = (tmp_path / "p1.html").read_text()
    page = Page(text)
    assert page.balanced and page.sections == SECTIONS
    assert len(page.images) == 3  # convergence, weight trajectories, evaluation
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "script" not in page.tags and "http://" not in text and "https://" not in text
    evaluation = json.loads((root / "runs" / "p1_evaluation.json").read_text())
    result = json.loads((root / "runs" / "p1_optimization.json").read_text())
    for method in ("base", "prompt", "proposed"):
        assert method in page.cells
        for answer in evaluation["methods"][method]["answers"][:3]:
            assert answer in page.cells
    assert f"{result['best_weights']['T1']:+.3f}" in page.cells and result["config_digest"] in page.cells
    assert "A warm friend who tells stories about the weekend." in text
    assert "No evaluation yet" not in text
    # The three parts of persona fit, the loop and echo rates, per judge, as the evaluation measured them.
    for part in ("style (0-1)", "relevance (0-1)", "fluency (0-1)", "loop rate", "echo rate"):
        assert part in page.cells
    loop = evaluation["scores"]["embedding"]["proposed"]["loop_rate"]
    assert fmt_interval(loop["mean"], loop["low"], loop["high"]) in page.cells
    served = result["parts"]  # the search mean's, which the run serves by default
    assert (
        result["selected"] == "mean"
        and f"style {served['style']:.2f}" in text
        and "(not optimised against)" not in text
    )


def test_text_is_escaped_and_missing_files_leave_notes(finished):
    root, _ = finished
    result = json.loads((root / "runs" / "p1_optimization.json").read_text())
    evaluation = json.loads((root / "runs" / "p1_evaluation.json").read_text())
    bad_eval = copy.deepcopy(evaluation)
    bad_eval["methods"]["proposed"]["answers"][0] = NASTY
    text = render_report(PersonaRecord.from_dict(result), bad_eval, profile=NASTY)
    page = Page(text)
    assert page.balanced and "script" not in page.tags and "b" not in page.tags
    assert text.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;") == 2
    assert NASTY in page.cells
    nasty_trait = {**result, "traits": ["<T1>"], "weights": {"<T1>": 1.0}, "best_weights": {"<T1>": 1.0}}
    assert "&lt;T1&gt;" in render_report(PersonaRecord.from_dict(nasty_trait), None)
    with pytest.raises(ConfigError, match="not a usable persona id"):
        PersonaRecord.from_dict({**result, "persona_id": "<p1>"})

    examples = [{"prompt": "hi", "baseline": "b0", "steered": NASTY}]
    bare = render_report(PersonaRecord.from_dict({**result, "examples": examples}), None)
    page = Page(bare)
    assert page.balanced and page.sections == SECTIONS and len(page.images) == 1  # the weights, drawn here
    assert "No evaluation yet: run make evaluate PERSONA=p1" in bare
    assert "The convergence plot was not found" in bare and "No persona_profile.txt" in bare
    assert ["hi", "b0", "n/a", NASTY] == page.cells[-4:]  # examples: no prompt baseline before evaluate


def test_report_bad_input_is_one_line_and_writes_nothing(finished, tmp_path, capsys):
    root, overrides = finished
    out = tmp_path / "out"
    assert main(["report", "--out-dir", str(out)]) == 2
    assert "optimize.persona_id is required" in capsys.readouterr().err
    assert report_cli(overrides, "--out-dir", str(out), "--save-dir", str(tmp_path / "none")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no optimisation result at" in err[0]
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    (runs / "p1_evaluation.json").write_text("{broken")
    assert report_cli(overrides, "--out-dir", str(out), "--save-dir", str(runs)) == 2
    assert "p1_evaluation.json is not valid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_interference_section_summarises_the_model_s_results(finished):
    from persona_steering.interference_report import mean_additivity, mean_leakage

    root, _ = finished
    result = json.loads((root / "runs" / "p1_optimization.json").read_text())
    leakage = [[1.0, 0.5], [-0.25, 1.0]]
    additivity = [{"r2": 0.8, "pair": [0, 1]}]
    data = {
        "fingerprint": result["fingerprint"],
        "strengths": [-1, 1],
        "pair_strength": 0.5,
        "prompts": ["a"],
        "layer": 2,
        "scorers": {"classifier": NASTY},
        "classifier_report": {"T1": {"accuracy": 0.9}},
        "bases": {"traits": {"scorers": {"classifier": {"leakage": leakage, "additivity": additivity}}}},
    }
    text = render_report(PersonaRecord.from_dict(result), None, interference=(data, None))
    page = Page(text)
    assert page.balanced and "script" not in page.tags
    assert ["traits", "classifier", f"{mean_leakage(leakage):.2f}", f"{mean_additivity(additivity):.2f}"] == (
        page.cells[-4:]
    )
    assert mean_leakage(leakage) == pytest.approx(0.375) and "T1 0.90" in text
    # Written by make interference for this model: run_report finds it by fingerprint.
    folder = root / "interference" / "some-slug"
    folder.mkdir(parents=True)
    (folder / "interference.json").write_text(json.dumps(data))
    from persona_steering.html_report import _find_interference

    assert _find_interference(root / "interference", result["fingerprint"]) == (data, None)
    assert _find_interference(root / "interference", "another") is None
