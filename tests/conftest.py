"""Shared fixtures: a tiny random Llama with an offline word-level tokenizer, saved like a real model,
and a tiny project (traits with vectors, a persona, prompts) on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
    """A tiny project: two traits with vectors, a three-sample persona, one held-out prompt, a short
    CMA-ES budget; returns (folder, config overrides)."""
    from tests_helpers import SAMPLES, build_project

    overrides = build_project(tmp_path, tiny_model_dir, samples=SAMPLES[:3], heldout=["hello !"])
    overrides += ["optimize.max_iterations=4", "optimize.population_size=4"]
    return tmp_path, overrides
