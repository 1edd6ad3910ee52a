"""Shared fixtures: a tiny random Llama with an offline word-level tokenizer, saved like a real model,
and a tiny project (traits with vectors, a persona, prompts) on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "i you me my your we our the a an is are was were be to of and or in on at for with how what why "
    "when where who do did does have has had not no yes good bad day weekend work food dinner friend "
    "family home today tomorrow yesterday like love hate feel think know remember story time once "
    "please thanks hello hi formal casual warm cold happy sad angry calm answer question tell about "
    "should would could can will just really very so it this that there here up down out go went "
    "make made cook eat drink sleep walk run talk say said plan trip rain sun weather book music"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        w: i
        for i, w in enumerate(
            specials
            + [str(d) for d in range(10)]
            + sorted(set(WORDS))
            + ["user", "system", "assistant", "?", ".", ",", "!"]
        )
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(vocab_size: int, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=3,
        pad_token_id=0,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; scale the head so greedy choices are decisive.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer saved as a local model folder (loaded by the real loader)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_rt(tiny_model_dir: Path):
    """A Runtime over the tiny model through the real loading code."""
    from persona_steering.config import ModelConfig
    from persona_steering.runtime import load_runtime

    return load_runtime(
        ModelConfig(name=str(tiny_model_dir), accelerator="cpu"), cache_dir=tiny_model_dir / "cache"
    )


@pytest.fixture()
def one_torch_thread():
    """Tiny models: a second intra-op thread only spin-waits, which turns into 30x slowdowns when
    another process keeps this 2-core machine busy. Modules opt in with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per test session for the real embedded model (dequantised once)."""
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture()
def project(tmp_path, tiny_model_dir):
    """A tiny project: two traits with vectors, a persona, prompts; returns CLI options."""
    from tests_helpers import write_trait

    from persona_steering.config import load_config
    from persona_steering.extraction import run_vectors

    traits = tmp_path / "traits"
    write_trait(
        traits,
        "T1",
        "be formal and warm",
        "be casual and cold",
        ["how was your weekend ?", "what should i cook ?"],
    )
    write_trait(traits, "T2", "talk about me", "talk about you", ["hello !", "how was work today ?"])
    persona = tmp_path / "personas" / "p1"
    persona.mkdir(parents=True)
    (persona / "persona_profile.txt").write_text("A warm friend who tells stories about the weekend.")
    (persona / "persona_samples.json").write_text(
        json.dumps(["i love my weekend with family", "i remember a trip once", "the food was good"])
    )
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        yaml.safe_dump(
            {
                "train": ["how was your day ?", "what should i cook ?", "tell me about a trip"],
                "heldout": ["hello !"],
            }
        )
    )
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.accelerator=cpu",
        "judge.backend=embedding",  # mechanics on a 4-sample persona; the offline judge has its own tests
        f"cache_dir={tmp_path / 'cache'}",
        f"vectors.trait_dir={traits}",
        f"vectors.out_dir={tmp_path / 'vectors'}",
        "vectors.traits=[T1, T2]",
        "traits=[T1, T2]",
        f"steering.trait_vector_dir={tmp_path / 'vectors'}",
        "steering.layer=2",
        "steering.alpha=2.0",
        "generation.max_new_tokens=6",
        f"optimize.persona_dir={tmp_path / 'personas'}",
        f"optimize.prompts_file={prompts}",
        "optimize.persona_id=p1",
        "optimize.num_prompts=2",
        "optimize.max_iterations=4",
        "optimize.population_size=4",
        f"optimize.save_dir={tmp_path / 'runs'}",
    ]
    run_vectors(load_config(None, overrides), log=lambda *_: None)
    return tmp_path, overrides
