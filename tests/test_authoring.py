"""new-trait against a real local HTTP server (invalid draft, then valid; retries; fatal errors; backends
that cannot write) and build-persona offline (hand-counted features, diverse samples, the folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_steering.authoring import NUM_QUESTIONS, parse_draft
from persona_steering.cli import main
from persona_steering.fake_openai import FakeOpenAI
from persona_steering.persona_builder import select_samples
from persona_steering.style import style_features
from persona_steering.traits import DefinitionError, build_judge_prompt, load_persona, load_trait

KEY = "sk-test-authoring-0123456789"


def draft(questions: int = NUM_QUESTIONS) -> dict:
    return {
        "title": "Nautical flavour",
        "pos_label": "seafaring",
        "neg_label": "landlubber",
        "instruction": [
            {"pos": f"Talk like an old sailor, variant {i}.", "neg": f"Talk like a city clerk, variant {i}."}
            for i in range(5)
        ],
        "questions": [f"What would you do on day {i} of a long holiday?" for i in range(questions)],
        "eval_prompt": "Question: {question}\nAnswer: {answer}\nRate 0-100 how nautical the answer is. Number only.",
    }


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A clean working folder (no .env) with the key in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return tmp_path


def new_trait(server: FakeOpenAI | None, workdir: Path, *extra: str, name: str = "R6") -> int:
    args = ["new-trait", "--trait", name, "--description", "speaks like a sailor (+) or a clerk (-)"]
    args += ["--trait-dir", str(workdir / "traits"), "--judge", "openai", "--judge-model", "fake-model"]
    if server is not None:
        args += ["--base-url", server.base_url]
    return main([*args, "--set", "judge.max_attempts=3", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- new-trait ----------------------------------------------------------------------------------------


def test_invalid_draft_is_sent_back_and_the_valid_one_written(workdir, capsys):
    with FakeOpenAI() as server:
        server.push(
            "text:Sure! Here is your trait: {broken", "text:```json\n" + json.dumps(draft()) + "\n```"
        )
        assert new_trait(server, workdir) == 0
    path = workdir / "traits" / "R6.yaml"
    trait = load_trait(path)
    questions = draft()["questions"]
    assert trait.extract_questions == questions[0::2] and trait.eval_questions == questions[1::2]
    assert len(trait.instructions) == 5 and trait.pos_label == "seafaring"
    assert trait.description == "speaks like a sailor (+) or a clerk (-)"
    assert len(server.requests) == 2
    second = server.requests[1].json["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert "not a JSON object" in second[2]["content"] and "{broken" in second[1]["content"]
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert "draft 1 of 3 is invalid" in capsys.readouterr().out


def test_transient_errors_are_retried_and_counts_are_checked(workdir):
    with FakeOpenAI() as server:
        # 503 is retried by the judge's policy; 39 questions is sent back; 41 with a duplicate is fine.
        questions = draft()["questions"][:39] + ["WHAT would you do on day 0 of a long holiday?"]
        server.push(
            "503",
            "text:" + json.dumps(draft(39)),
            "text:" + json.dumps({**draft(), "questions": questions + ["Last one?"]}),
        )
        assert new_trait(server, workdir) == 0
        assert len(server.requests) == 3
    trait = load_trait(workdir / "traits" / "R6.yaml")
    assert len(trait.extract_questions) == len(trait.eval_questions) == 20
    assert "Last one?" in trait.eval_questions
    with pytest.raises(DefinitionError, match="40 distinct questions, got 39"):
        parse_draft(json.dumps(draft(39)))
    with pytest.raises(DefinitionError, match="'instruction' must be a list of 5"):
        parse_draft(json.dumps({**draft(), "instruction": draft()["instruction"][:4]}))


def test_three_invalid_drafts_fail_with_the_last_reason_and_write_nothing(workdir, capsys):
    bad_prompt = {**draft(), "eval_prompt": "Rate {answer} only"}
    with FakeOpenAI() as server:
        server.push("text:[]", "text:" + json.dumps(draft(12)), "text:" + json.dumps(bad_prompt))
        assert new_trait(server, workdir) == 2
        assert len(server.requests) == 3
    line = one_error_line(capsys)
    assert "no valid trait definition in 3 drafts" in line and "eval_prompt" in line
    assert not (workdir / "traits").exists()


def test_bad_name_existing_file_and_fatal_errors(workdir, capsys):
    with FakeOpenAI() as server:
        assert new_trait(server, workdir, name="../evil") == 2
        assert "not a usable trait name" in one_error_line(capsys)
        (workdir / "traits").mkdir()
        (workdir / "traits" / "R6.yaml").write_text("keep me")
        assert new_trait(server, workdir) == 2
        assert "pass --overwrite" in one_error_line(capsys)
        assert server.requests == []  # refused before any call
        server.push("401")
        assert new_trait(server, workdir, "--overwrite") == 2
        line = one_error_line(capsys)
        assert "AuthenticationError (401)" in line and KEY not in line
        assert (workdir / "traits" / "R6.yaml").read_text() == "keep me"
        server.push("text:" + json.dumps(draft()))
        assert new_trait(server, workdir, "--overwrite") == 0
    assert load_trait(workdir / "traits" / "R6.yaml").name == "R6"


def test_backends_that_cannot_write_name_the_fix(workdir, monkeypatch, capsys):
    args = ["new-trait", "--trait", "R6", "--description", "x", "--trait-dir", str(workdir / "traits")]
    assert main([*args, "--judge", "embedding"]) == 2
    line = one_error_line(capsys)
    assert "--judge openai --judge-model gpt-4o-mini" in line and "OPENAI_API_KEY" in line
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main([*args, "--judge", "openai"]) == 2
    line = one_error_line(capsys)
    assert "set OPENAI_API_KEY" in line and "--judge openai --judge-model" in line
    assert not (workdir / "traits").exists()


# --- build-persona ------------------------------------------------------------------------------------


def test_style_features_match_a_hand_count():
    f = style_features(["I don't know. Do you?", "Wow! We went to the fair yesterday and I loved it."])
    # 16 words, 4 sentences; don't = contraction, wow = slang, went + loved = past, loved = positive.
    assert (f["words"], f["sentences"], f["utterances"]) == (16, 4, 2)
    assert (
        f["contraction_rate"]
        == f["slang_rate"]
        == f["other_reference_rate"]
        == pytest.approx(1 / 16, abs=1e-4)
    )
    assert f["self_reference_rate"] == f["past_tense_rate"] == pytest.approx(2 / 16, abs=1e-4)
    assert f["question_rate"] == f["exclamation_rate"] == f["past_narrative_rate"] == 0.25
    assert f["mean_sentence_length"] == 4.0 and f["sentiment"] == 1.0 and f["formality"] == 0.0
    assert f["slang_used"] == ["wow"]
    formal = style_features(["The committee will review the proposal tomorrow."])
    assert formal["formality"] == 1.0 and formal["past_tense_rate"] == 0.0


def test_samples_cover_every_length_stratum_and_prefer_new_content():
    texts = [" ".join(f"w{k}" for k in range(n)) + f" topic{n}" for n in range(3, 23)]  # 4..23 words
    chosen = select_samples(texts, 5)
    assert chosen == select_samples(list(texts), 5)  # deterministic
    lengths = sorted(len(t.split()) for t in chosen)
    assert [(length - 4) // 4 for length in lengths] == [0, 1, 2, 3, 4]  # one per length quintile
    assert chosen == [t for t in texts if t in chosen]  # original order
    pool = [
        "apple banana cherry grape",
        "apple banana cherry melon",
        "apple banana cherry grape melon kiwi",
        "train station winter snow porch evening",
    ]
    assert select_samples(pool, 2) == [pool[0], pool[3]]


def conversations() -> list:
    walter = [
        "Well now, I remember the winter of sixty-two, the snow came up past my knees.",
        "I fixed engines all day long at the depot.",
        "Yes.",
        "My father always said a good tool is worth two bad ones, and he was right.",
        "Back then we walked to school, kiddo, three miles each way.",
        "I miss the old porch swing.",
        "Your grandma beat me at ring toss at the county fair, and I knew I was done for.",
        "We didn't have phones, I wrote letters and waited two weeks for an answer.",
        "The trains were loud but I loved every one of them.",
        "Is that so?",
    ]
    amy = ["How was your day?", "Tell me about the fair!", "Did you like school?"]
    return [
        [
            {"speaker": s, "text": t}
            for pair in zip(amy, walter[i::3], strict=False)
            for s, t in zip(("Amy", "Walter"), pair, strict=True)
        ]
        for i in range(3)
    ] + [[{"speaker": "Walter", "text": t} for t in walter[9:]]]


def test_build_persona_writes_a_loadable_deterministic_folder(tmp_path, capsys):
    source = tmp_path / "raw_conversations.json"
    source.write_text(json.dumps(conversations(), indent=1))
    personas = tmp_path / "personas"
    args = ["build-persona", "--conversations", str(source), "--speaker", "Walter", "--persona-id", "walter"]
    args += ["--persona-dir", str(personas), "--num-samples", "5"]
    assert main(args) == 0
    folder = personas / "walter"
    names = ["final_judge_prompt.txt", "persona_features.json", "persona_profile.txt", "persona_samples.json"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "raw_conversations.json"])
    persona = load_persona(personas, "walter")
    turns = [t["text"] for c in conversations() for t in c if t["speaker"] == "Walter"]
    assert len(persona.samples) == 5 and set(persona.samples) <= set(turns)
    assert "Yes." not in persona.samples  # a one-word turn says little about a voice
    assert persona.judge_prompt == build_judge_prompt(persona.profile, persona.samples)
    assert (folder / "raw_conversations.json").read_bytes() == source.read_bytes()
    features = json.loads((folder / "persona_features.json").read_text())
    assert features["speaker"] == "Walter" and features["utterances"] == len(turns)
    assert features == {**style_features(turns), "speaker": "Walter", "source": source.name}
    assert "Walter talks mostly about themself" in persona.profile
    assert persona.profile in capsys.readouterr().out
    before = {n: (folder / n).read_bytes() for n in names}
    assert main(args) == 2
    assert "pass --overwrite" in one_error_line(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert {n: (folder / n).read_bytes() for n in names} == before
    assert [p.name for p in personas.iterdir()] == ["walter"]  # no temporary folder left behind


def test_build_persona_bad_input_lists_speakers_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps(conversations()))
    base = ["build-persona", "--conversations", str(source), "--persona-dir", str(tmp_path / "personas")]
    assert main([*base, "--speaker", "Walt", "--persona-id", "w"]) == 2
    line = one_error_line(capsys)
    assert "no speaker 'Walt'" in line and "'Amy' (9 turns), 'Walter' (10 turns)" in line
    source.write_text(json.dumps([[{"speaker": "A", "text": "hi"}, {"speaker": "B"}]]))
    assert main([*base, "--speaker", "A", "--persona-id", "w"]) == 2
    assert "turn [0][1] must be an object" in one_error_line(capsys)
    assert main([*base, "--speaker", "A", "--persona-id", "bad/id"]) == 2
    assert "not a usable persona id" in one_error_line(capsys)
    assert main([*base, "--speaker", "A"]) == 2
    assert "needs --conversations FILE, --speaker NAME and --persona-id ID" in one_error_line(capsys)
    assert not (tmp_path / "personas").exists()
