"""Steer llama.cpp with an exported control vector and compare with our own steering.

Loads a control-vector GGUF (``make export-gguf PERSONA=<id>``) into llama.cpp through
llama-cpp-python, with the embedded model's own GGUF file (or ``--model``), and prints for each
prompt the greedy answer of llama.cpp unsteered, llama.cpp steered, and this package's HF steering
at every position (``--positions all``: what llama.cpp does) with the same vector.

Not run by the tests: llama-cpp-python has no wheel on the package index here and compiles from
source (about 11 minutes on 2 cores)::

    pip install llama-cpp-python
    python scripts/llamacpp_steer.py runs/export/nostalgic_grandpa.gguf

HF runs the GGUF's weights dequantised to float32, llama.cpp its quantised kernels (activations
rounded to 8 bits inside the matmuls), so the two steered answers can part after some tokens; both
should move the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np

PROMPTS = [
    "What did you do last weekend?",
    "How should I prepare for a job interview?",
    "Tell me about your favourite place.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("control_vector", help="control-vector .gguf written by export-gguf")
    parser.add_argument("--model", help="GGUF model file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", action="append", help="a user message (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the vector (llama.cpp's SCALE)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF comparison")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: pip install llama-cpp-python (compiles ~11 min)", file=sys.stderr)
        return 2
    from persona_steering.export import read_control_vector
    from persona_steering.runtime import embedded_gguf_path

    vectors = read_control_vector(args.control_vector)  # {hidden_states row: [hidden]}
    model_path = args.model or str(embedded_gguf_path())
    prompts = args.prompt or PROMPTS
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=1024, seed=0, verbose=False)
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    # llama.cpp's buffer holds one n_embd slice per block, starting at block 1; direction.N (our
    # hidden_states row N + 1) is added to the output of block N.
    data = np.zeros(n_embd * n_layer, dtype=np.float32)
    for row, vec in vectors.items():
        block = row - 1
        data[n_embd * (block - 1) : n_embd * block] = vec.float().numpy() * args.scale
    set_cvec = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
    blocks = sorted(row - 1 for row in vectors)
    print(f"llama.cpp {model_path}: {n_layer} blocks, n_embd {n_embd}; steering blocks {blocks}")

    def answer(prompt: str) -> str:
        llm.reset()  # no KV cache reuse across steered and unsteered runs
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=args.max_tokens
        )
        return str(out["choices"][0]["message"]["content"]).strip()

    plain = [answer(p) for p in prompts]
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if set_cvec(llm.ctx, ptr, data.size, n_embd, 1, n_layer - 1) != 0:
        print("llama.cpp refused the control vector", file=sys.stderr)
        return 1
    steered = [answer(p) for p in prompts]
    hf = None if args.no_hf else _hf_answers(vectors, prompts, args.max_tokens, args.scale)
    for i, prompt in enumerate(prompts):
        print(f"\n### {prompt}\n- llama.cpp unsteered: {plain[i]}\n- llama.cpp steered:   {steered[i]}")
        if hf is not None:
            print(f"- HF steered (all positions): {hf[i]}")
    return 0


def _hf_answers(vectors: dict, prompts: list[str], max_tokens: int, scale: float) -> list[str]:
    """The same vectors through this package's steering on the dequantised embedded model."""
    from persona_steering.config import GenerationConfig, ModelConfig
    from persona_steering.generation import Request, generate
    from persona_steering.runtime import load_runtime

    rt = load_runtime(ModelConfig(accelerator="cpu", precision="32-true"), "cache", 0)
    (row, vec), *rest = vectors.items()
    if rest:
        print("HF comparison steers one layer: using the first vector only", file=sys.stderr)
    deltas = (vec.float() * scale)[None].repeat(len(prompts), 1)  # [prompts, hidden]
    gen = GenerationConfig(max_new_tokens=max_tokens)
    answers = generate(rt, [Request(p) for p in prompts], gen, deltas=deltas, layer=row, positions="all")
    return [a.text for a in answers]


if __name__ == "__main__":
    sys.exit(main())
