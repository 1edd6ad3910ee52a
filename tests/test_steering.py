"""Row convention, steering positions through generate, per-row vectors, batched == single row."""

from dataclasses import replace

import pytest
import torch

from persona_steering.config import GenerationConfig
from persona_steering.generation import Request, chat_text, generate, generate_population
from persona_steering.layers import LayerError, capture_layers, decoder_blocks, normalize_layer
from persona_steering.steering import SteeringSpec, steer

QUESTIONS = ["how was your weekend ?", "what should i cook for dinner ?", "tell me about a trip", "hello !"]


def _encode(rt, texts):
    enc = rt.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_capture_rows_match_hidden_states_convention(tiny_rt):
    ids, mask = _encode(tiny_rt, [chat_text(tiny_rt.tokenizer, Request(q)) for q in QUESTIONS[:2]])
    with torch.inference_mode():
        with capture_layers(tiny_rt.model) as rows:
            out = tiny_rt.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    assert len(rows) == len(hs) == tiny_rt.num_layers + 1
    for i in range(tiny_rt.num_layers):  # rows 0..L-1 identical
        torch.testing.assert_close(rows[i], hs[i])
    # The last hidden_states entry is taken after the final norm; our row L is the block output.
    torch.testing.assert_close(tiny_rt.model.model.norm(rows[-1]), hs[-1])


@pytest.mark.parametrize("row", [1, 2])
def test_steering_at_row_i_shows_in_hidden_states_i(tiny_rt, row):
    ids, mask = _encode(tiny_rt, [chat_text(tiny_rt.tokenizer, Request(q)) for q in QUESTIONS[:3]])
    delta = torch.randn(3, tiny_rt.hidden_size)
    with torch.inference_mode():
        base = tiny_rt.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with steer(tiny_rt.model, row, delta, "all", attention_mask=mask):
            steered = tiny_rt.model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True
            ).hidden_states
    expected = base[row] + mask[:, :, None] * delta[:, None, :]
    torch.testing.assert_close(steered[row], expected)
    torch.testing.assert_close(steered[row - 1], base[row - 1])  # nothing before the layer changes


def test_hook_removed_restores_logits_bit_for_bit(tiny_rt):
    ids, mask = _encode(tiny_rt, [chat_text(tiny_rt.tokenizer, Request(QUESTIONS[0]))])
    with torch.inference_mode():
        before = tiny_rt.model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(RuntimeError, match="boom"):
            with steer(tiny_rt.model, 2, torch.ones(1, tiny_rt.hidden_size), "all"):
                raise RuntimeError("boom")
        after = tiny_rt.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert not any(b._forward_hooks for b in decoder_blocks(tiny_rt.model))


def _record_steered_positions(rt, positions, reqs, max_new_tokens=5):
    """Run generate with a per-row delta and count, for each block-1 forward, which positions moved."""
    seen = []
    block = decoder_blocks(rt.model)[1]  # row 2 = output of block 1
    delta = torch.full((len(reqs), rt.hidden_size), 1000.0)  # huge: a steered position is obvious
    handle = block.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    # The steering hook is registered after ours, so it sees and changes the same output; compare
    # against an unsteered run of the same calls.
    try:
        generate(
            rt,
            reqs,
            GenerationConfig(max_new_tokens=max_new_tokens),
            steering=SteeringSpec(2, delta, positions),
        )
        steered = list(seen)
        seen.clear()
        generate(rt, reqs, GenerationConfig(max_new_tokens=max_new_tokens))
        plain = list(seen)
    finally:
        handle.remove()
    return steered, plain


def test_positions_response_prompt_all_through_generate(tiny_rt):
    reqs = [Request(QUESTIONS[0]), Request(QUESTIONS[3])]  # different lengths: row 1 is left-padded
    texts = [chat_text(tiny_rt.tokenizer, r) for r in reqs]
    _, mask = _encode(tiny_rt, sorted(texts, key=len))
    # Steering row 2 (block 1 output) changes block 2's input; record block 2's input instead.
    for positions in ("response", "prompt", "all"):
        inputs = []
        h = decoder_blocks(tiny_rt.model)[2].register_forward_pre_hook(
            lambda m, a: inputs.append(a[0].clone())
        )
        try:
            delta = torch.full((2, tiny_rt.hidden_size), 100.0)
            generate(
                tiny_rt, reqs, GenerationConfig(max_new_tokens=4), steering=SteeringSpec(2, delta, positions)
            )
            steered = list(inputs)
            inputs.clear()
            generate(tiny_rt, reqs, GenerationConfig(max_new_tokens=4))
            plain = list(inputs)
        finally:
            h.remove()
        (steered_prompt, steered_steps), (plain_prompt, plain_steps) = (
            _prompt_then_steps(x, mask.shape[1]) for x in (steered, plain)
        )
        prefill_moved = (steered_prompt - plain_prompt).abs().amax(-1) > 50  # [batch, prompt_len]
        decode_moved = [bool(((s - p).abs().amax(-1) > 50).all()) for s, p in zip(steered_steps, plain_steps)]
        assert len(steered_steps) == len(plain_steps) == 3
        if positions == "response":
            expected = torch.zeros_like(mask, dtype=torch.bool)
            expected[:, -1] = True  # the last prompt token predicts the first response token
            assert torch.equal(prefill_moved, expected)
            assert all(decode_moved) and decode_moved
        elif positions == "prompt":
            assert torch.equal(prefill_moved, mask.bool())  # never the left padding
            assert not any(decode_moved)
        else:
            assert torch.equal(prefill_moved, mask.bool())
            assert all(decode_moved)


def _prompt_then_steps(
    inputs: list[torch.Tensor], prompt_len: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A block's inputs during one generate call as (the whole prompt [batch, len, hidden], decode
    steps): the prompt arrives in one forward, or in two (its shared prefix, then its last token)."""
    if inputs[0].shape[1] == prompt_len:
        return inputs[0], inputs[1:]
    assert inputs[0].shape[1] == prompt_len - 1 and inputs[1].shape[1] == 1
    return torch.cat(inputs[:2], dim=1), inputs[2:]


def test_zero_delta_equals_unsteered_and_rows_are_independent(tiny_rt):
    reqs = [Request(q) for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=8)
    base = generate(tiny_rt, reqs, gen)
    zero = generate(tiny_rt, reqs, gen, steering=SteeringSpec(2, torch.zeros(4, tiny_rt.hidden_size)))
    assert [a.ids for a in zero] == [a.ids for a in base]
    torch.manual_seed(1)
    deltas = torch.randn(4, tiny_rt.hidden_size) * 5
    deltas[1] = 0
    mixed = generate(tiny_rt, reqs, gen, steering=SteeringSpec(2, deltas))
    assert mixed[1].ids == base[1].ids  # a zero row is unaffected by its neighbours' vectors
    for i in (0, 2, 3):  # each steered row equals that prompt run alone with its own vector
        alone = generate(tiny_rt, [reqs[i]], gen, steering=SteeringSpec(2, deltas[i : i + 1]))
        assert alone[0].ids == mixed[i].ids
    assert any(mixed[i].ids != base[i].ids for i in (0, 2, 3))


def test_population_prompt_prefix_runs_once_per_prompt(tiny_rt):
    """3 candidates x 2 prompts: the unsteered prompt prefix is computed for 2 rows, not 6, and every
    row still equals that prompt answered alone under its candidate's vector."""
    prompts = [QUESTIONS[0], QUESTIONS[3]]  # different lengths: one row is left-padded
    gen = GenerationConfig(max_new_tokens=4)
    deltas = torch.randn(3, tiny_rt.hidden_size, generator=torch.Generator().manual_seed(2)) * 5
    shapes = []
    h = decoder_blocks(tiny_rt.model)[0].register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape[:2]))
    try:
        together = generate_population(tiny_rt, prompts, gen, SteeringSpec(2, deltas))
    finally:
        h.remove()
    prompt_len = max(len(_encode(tiny_rt, [chat_text(tiny_rt.tokenizer, Request(p))])[0][0]) for p in prompts)
    assert list(shapes[:2]) == [(2, prompt_len - 1), (6, 1)]
    for c in range(3):
        for p in range(2):
            alone = generate(tiny_rt, [Request(prompts[p])], gen, steering=SteeringSpec(2, deltas[c : c + 1]))
            assert alone[0].ids == together[c][p].ids, (c, p)
    assert len({tuple(together[c][0].ids) for c in range(3)}) > 1  # the vectors do something


def test_prefix_cache_that_cannot_expand_runs_per_row(tiny_rt, monkeypatch):
    """A KV cache class without reorder_cache: the prefix then runs for every row, same answers."""
    from transformers import cache_utils

    prompts = [QUESTIONS[0], QUESTIONS[3]]
    gen = GenerationConfig(max_new_tokens=4)
    deltas = torch.randn(3, tiny_rt.hidden_size, generator=torch.Generator().manual_seed(2)) * 5
    shared = generate_population(tiny_rt, prompts, gen, SteeringSpec(2, deltas))
    monkeypatch.delattr(cache_utils.Cache, "reorder_cache")
    batches = []
    h = decoder_blocks(tiny_rt.model)[0].register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        per_row = generate_population(tiny_rt, prompts, gen, SteeringSpec(2, deltas))
    finally:
        h.remove()
    assert batches[:3] == [2, 6, 6]  # distinct prompts, then all rows again, then the last prompt token
    assert [[a.ids for a in c] for c in per_row] == [[a.ids for a in c] for c in shared]


def test_batched_greedy_equals_single_row(tiny_rt):
    reqs = [Request(q, "be formal .") for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=10, max_batch=4)  # with the default repetition penalty
    assert gen.repetition_penalty > 1
    batched = generate(tiny_rt, reqs, gen)
    singles = [generate(tiny_rt, [r], gen)[0] for r in reqs]
    assert [a.ids for a in batched] == [a.ids for a in singles]
    # Without the penalty, equal to transformers' own greedy generate (whose penalty would also
    # count the prompt's tokens).
    batched = generate(tiny_rt, reqs, replace(gen, repetition_penalty=1.0))
    ids, mask = _encode(tiny_rt, [chat_text(tiny_rt.tokenizer, reqs[0])])
    ref = tiny_rt.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    ref_ids = ref[0, ids.shape[1] :].tolist()
    assert ref_ids[: len(batched[0].ids)] == batched[0].ids


def test_sampling_is_seeded_per_row_not_per_batch(tiny_rt):
    reqs = [Request(q) for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0)
    a = generate(tiny_rt, reqs, gen, seed=3)
    b = generate(tiny_rt, list(reversed(reqs)), gen, seed=3)
    assert [x.ids for x in a] == [x.ids for x in reversed(b)]
    c = generate(tiny_rt, reqs, gen, seed=4)
    assert [x.ids for x in a] != [x.ids for x in c]


def test_generation_cache_miss_then_hit(tiny_rt, tmp_path):
    from persona_steering.cache import Cache

    reqs = [Request(q) for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=6)
    calls = []
    h = tiny_rt.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with Cache(tmp_path) as cache:
            first = generate(tiny_rt, reqs, gen, cache=cache)
            n_cold = len(calls)
            again = generate(tiny_rt, reqs, gen, cache=cache)
            assert len(calls) == n_cold > 0  # warm: no forward at all
            assert [a.ids for a in again] == [a.ids for a in first]
            tiny_rt.fingerprint = "another-model"
            generate(tiny_rt, reqs[:1], gen, cache=cache)
            assert len(calls) > n_cold  # another fingerprint misses
    finally:
        h.remove()


def test_wrong_hidden_size_and_layer_refused(tiny_rt):
    with pytest.raises(LayerError, match="expected \\[batch, 32\\]"):
        with steer(tiny_rt.model, 1, torch.zeros(2, 7)):
            pass
    with pytest.raises(LayerError, match="out of range"):
        normalize_layer(4, 3)
    with pytest.raises(LayerError, match="out of range"):
        normalize_layer(0, 3)
    assert normalize_layer(-1, 3) == 3


def _reference_penalised_greedy(rt, text, max_new_tokens, penalty):
    """One row, no KV cache, no batching: the CTRL penalty on tokens this answer already produced."""
    ids = rt.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    eos = rt.tokenizer.eos_token_id
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = rt.model(input_ids=ids).logits[0, -1].float().clone()
            for t in set(out):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_repetition_penalty_matches_a_plain_reference_batched_and_keyed(tiny_rt, tmp_path):
    from persona_steering.cache import Cache

    reqs = [Request(q) for q in QUESTIONS]
    plain = generate(tiny_rt, reqs, GenerationConfig(max_new_tokens=12))
    # The tiny random model repeats itself under greedy decoding, so the penalty has work to do.
    assert any(len(set(a.ids)) < len(a.ids) for a in plain)
    gen = GenerationConfig(max_new_tokens=12, repetition_penalty=1.8, max_batch=3)
    batched = generate(tiny_rt, reqs, gen)
    for req, answer in zip(reqs, batched, strict=True):
        assert answer.ids == _reference_penalised_greedy(tiny_rt, chat_text(tiny_rt.tokenizer, req), 12, 1.8)
    assert [a.ids for a in batched] != [a.ids for a in plain]
    with Cache(tmp_path) as cache:  # the penalty is part of the key: no stale unpenalised answer
        generate(tiny_rt, reqs, GenerationConfig(max_new_tokens=12), cache=cache)
        again = generate(tiny_rt, reqs, gen, cache=cache)
    assert [a.ids for a in again] == [a.ids for a in batched]


def test_repetition_penalty_below_one_is_refused():
    from persona_steering.config import ConfigError

    with pytest.raises(ConfigError, match="repetition_penalty must be >= 1"):
        GenerationConfig(repetition_penalty=0.9)


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def test_template_without_system_role_gets_system_text_in_the_user_turn(tiny_rt):
    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = NO_SYSTEM_TEMPLATE
    text = chat_text(tok, Request("how was your day ?", "answer formally"))
    assert (
        text == "<|im_start|> user answer formally\n\nhow was your day ? <|im_end|> <|im_start|> assistant "
    )
    assert (
        chat_text(tok, Request("hello !")) == "<|im_start|> user hello ! <|im_end|> <|im_start|> assistant "
    )
    # a template that takes a system role still gets one
    with_system = chat_text(tiny_rt.tokenizer, Request("hello !", "answer formally"))
    assert with_system.startswith("<|im_start|> system answer formally <|im_end|>")
    # and generate runs through it: a system prompt changes the prompt the model sees
    tiny_rt.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    try:
        gen = GenerationConfig(max_new_tokens=3)
        plain, instructed = generate(tiny_rt, [Request("hello !"), Request("hello !", "be warm")], gen)
    finally:
        tiny_rt.tokenizer.chat_template = build_tokenizer().chat_template
    assert (
        instructed.prompt.startswith("<|im_start|> user be warm\n\nhello !")
        and plain.prompt != instructed.prompt
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_leave_the_batch_with_the_same_answers(tiny_rt, monkeypatch, temperature):
    """Rows that produce an end token leave the decode batch (fewer rows per later step), and every
    answer, steered per row, penalised and sampled or greedy, equals the one decoded with all rows kept."""
    reqs = [Request(q) for q in QUESTIONS] * 2  # 8 rows, prompts of different lengths (left padding)
    deltas = torch.randn(8, tiny_rt.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    deltas[0] = 0
    spec = SteeringSpec(2, deltas)
    keep_all = GenerationConfig(
        max_new_tokens=12, temperature=temperature, repetition_penalty=1.3, finished_rows_leave=False
    )
    first = generate(tiny_rt, reqs, keep_all, steering=spec, seed=1)
    # Make a token the random model emits mid-answer an end token, so rows end at different steps.
    ends = {t: {a.ids.index(t) for a in first if t in a.ids} for a in first for t in a.ids}  # first steps
    end = max(ends, key=lambda t: len(ends[t]))
    assert len(ends[end]) >= 2, ends  # rows end at two different steps at least
    eos = sorted({*([tiny_rt.model.generation_config.eos_token_id] or []), end} - {None})
    monkeypatch.setattr(tiny_rt.model.generation_config, "eos_token_id", eos)

    def decode(gen):
        rows: list[int] = []
        hook = decoder_blocks(tiny_rt.model)[0].register_forward_pre_hook(
            lambda m, a: rows.append(a[0].shape[0])
        )
        try:
            answers = generate(tiny_rt, reqs, gen, steering=spec, seed=1)
        finally:
            hook.remove()
        return [a.ids for a in answers], rows

    kept, kept_rows = decode(keep_all)
    left, left_rows = decode(GenerationConfig(**{**keep_all.__dict__, "finished_rows_leave": True}))
    assert left == kept
    assert sum(1 for ids in kept if len(ids) < 12) >= 2  # some rows did end early
    assert set(kept_rows[1:]) == {8} and left_rows[1] == 8  # the decode steps: all rows, or fewer
    assert left_rows[-1] < 8 and sorted(left_rows[1:], reverse=True) == left_rows[1:]
    assert sum(left_rows) < sum(kept_rows[: len(left_rows)])


def test_rows_per_batch_come_from_free_memory_when_max_batch_is_null(tiny_rt, monkeypatch):
    """max_batch null: as many rows as fit half the free memory; the answers do not depend on it."""
    from persona_steering import generation

    per_row = generation.row_bytes(tiny_rt, 40)
    assert per_row is not None and generation.row_bytes(tiny_rt, 80) > per_row  # longer rows cost more
    assert generation.batch_rows(tiny_rt, 5, 40) == 5  # a number is taken as it is
    monkeypatch.setattr(
        generation, "free_memory", lambda device: int(3.5 * per_row / generation.MEMORY_FRACTION)
    )
    assert generation.batch_rows(tiny_rt, None, 40) == 3
    monkeypatch.setattr(generation, "free_memory", lambda device: 10**15)
    assert generation.batch_rows(tiny_rt, None, 40) == generation.AUTO_MAX_ROWS
    monkeypatch.setattr(generation, "free_memory", lambda device: 0)
    assert generation.batch_rows(tiny_rt, None, 40) == 1
    monkeypatch.setattr(generation, "free_memory", lambda device: None)  # unreadable: the old fixed size
    assert generation.batch_rows(tiny_rt, None, 40) == 64

    reqs = [Request(q) for q in QUESTIONS] * 2
    fixed = generate(tiny_rt, reqs, GenerationConfig(max_new_tokens=6, max_batch=2))
    tokens = max(len(_encode(tiny_rt, [chat_text(tiny_rt.tokenizer, r)])[0][0]) for r in reqs) + 6
    monkeypatch.setattr(
        generation,
        "free_memory",
        lambda device: int(3 * generation.row_bytes(tiny_rt, tokens) / generation.MEMORY_FRACTION),
    )
    batches: list[int] = []
    hook = decoder_blocks(tiny_rt.model)[0].register_forward_pre_hook(
        lambda m, a: batches.append(a[0].shape[0])
    )
    try:
        auto = generate(tiny_rt, reqs, GenerationConfig(max_new_tokens=6, max_batch=None))
    finally:
        hook.remove()
    assert [a.ids for a in auto] == [a.ids for a in fixed]
    assert max(batches) == 3  # 8 rows in batches of 3, 3 and 2


def test_on_answers_reports_every_request_once_cached_ones_first(tiny_rt, tmp_path):
    from persona_steering.cache import Cache

    reqs = [Request(q) for q in QUESTIONS] + [Request(QUESTIONS[0])]  # a repeat shares its row
    gen = GenerationConfig(max_new_tokens=6, max_batch=1)
    with Cache(tmp_path) as cache:
        generate(tiny_rt, reqs[:2], gen, cache=cache)  # the first two are cached now
        told: list[dict] = []
        out = generate(tiny_rt, reqs, gen, cache=cache, on_answers=told.append)
    assert sorted(told[0]) == [0, 1, len(reqs) - 1]  # cached rows (and the repeat) before any block
    assert len(told) == 1 + 2  # then block by block: two rows to generate, one a block
    indices = [i for block in told for i in block]
    assert sorted(indices) == list(range(len(reqs)))  # every request exactly once
    assert all(block[i] == out[i] for block in told for i in block)


def test_population_on_answers_names_candidate_and_prompt(tiny_rt):
    deltas = torch.zeros(3, tiny_rt.model.config.hidden_size)
    deltas[1, 0] = 5.0
    told: dict = {}
    out = generate_population(
        tiny_rt,
        QUESTIONS[:2],
        GenerationConfig(max_new_tokens=6, max_batch=2),
        SteeringSpec(1, deltas, "response"),
        on_answers=told.update,
    )
    assert sorted(told) == [(c, p) for c in range(3) for p in range(2)]
    assert all(told[c, p] == out[c][p] for c, p in told)


def test_blocks_end_at_the_size_and_where_the_prompt_length_jumps():
    from persona_steering.generation import blocks

    assert blocks([], 4) == []
    assert blocks([10, 11, 12, 13, 14], 2) == [(0, 2), (2, 4), (4, 5)]
    assert blocks([10, 15, 20, 21, 41, 100], 8) == [(0, 3), (3, 5), (5, 6)]  # 21 > 2 x 10; 100 > 2 x 21
    assert blocks([10, 20], 8) == [(0, 2)]  # exactly twice the first still fits


def test_rows_with_a_long_system_prompt_run_in_their_own_block_with_the_same_answers(tiny_rt):
    long = "you are a retired railway mechanic . " * 12
    reqs = [Request(q) for q in QUESTIONS] + [Request(q, long) for q in QUESTIONS]
    batches: list[tuple[int, int]] = []
    hook = decoder_blocks(tiny_rt.model)[0].register_forward_pre_hook(
        lambda m, a: batches.append(tuple(a[0].shape[:2]))
    )
    try:
        split = generate(tiny_rt, reqs, GenerationConfig(max_new_tokens=6, max_batch=8))
    finally:
        hook.remove()
    singles = [generate(tiny_rt, [r], GenerationConfig(max_new_tokens=6, max_batch=8))[0] for r in reqs]
    assert [a.ids for a in split] == [a.ids for a in singles]
    assert {rows for rows, _ in batches} == {4}  # two blocks of 4 rows, never one of 8
