"""The ``monitor`` stage: per-token projection onto one trait while the model writes an answer.

A forward hook on the decoder block whose output is hidden_states row ``layer`` (the same row
convention and block as ``steering.steer``) keeps the last position's state of every forward call
of one generation: the prefill's last prompt token, then each generated token as it is fed back.
Answer token ``t`` is shown with the state that *chose* it, i.e. the position before it (the last
prompt token for the first answer token). Those are exactly the positions that ``response``
steering steers, every answer token gets a value without an extra forward, and the value says
where the residual stream stood along the trait at the moment the token was picked.

With ``--weights`` the answer is steered as ``steer`` does it; the steering hook runs first, so a
monitor at the steered layer sees the steered state. Nothing is memoised: the hook must see the
forward passes, and a cache hit would skip them. Outputs: a coloured terminal line (plain values
when stdout is not a terminal) and ``<out_dir>/<trait>_L<layer>_<digest>.png`` with a ``.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from persona_steering import __version__
from persona_steering.basis import configured_basis, parse_weights
from persona_steering.cache import atomic_write_json, digest
from persona_steering.config import Config, ConfigError
from persona_steering.generation import Request, generate
from persona_steering.layers import decoder_blocks, normalize_layer, untuple
from persona_steering.rendering import save_figure
from persona_steering.runtime import Runtime, identify, load_runtime
from persona_steering.steering import SteeringSpec
from persona_steering.store import VectorFileError, load_vectors
from persona_steering.traits import load_traits
from persona_steering.vectors import unit

DEFAULT_OUT_DIR = "runs/monitor"
NEUTRAL = (235, 235, 235)
POSITIVE = (60, 180, 75)
NEGATIVE = (215, 50, 50)


@dataclass(frozen=True)
class MonitorSettings:
    """Per-invocation options of ``monitor`` (steering layer, alpha, traits come from the config)."""

    trait: str
    prompt: str
    layer: int | None = None  # hidden_states row to read; None = steering.layer
    weights: dict[str, float] = field(default_factory=dict)
    system: str | None = None
    out_dir: str = DEFAULT_OUT_DIR

    @classmethod
    def from_config(cls, cfg: Config) -> MonitorSettings:
        """``cfg.monitor`` with the prompt and weights of ``cfg.steer`` (one --prompt, one --weights)."""
        m = cfg.monitor
        weights = parse_weights(cfg.steer.weights)
        return cls(m.trait or "", cfg.steer.prompt or "", m.read_layer, weights, m.system, m.out_dir)


@dataclass
class MonitorResult:
    """One monitored answer: its tokens, one projection per token, and where the plot went."""

    trait: str
    layer: int
    prompt: str
    answer: str
    ids: list[int]  # answer token ids, end-of-turn excluded
    tokens: list[str]
    values: list[float]
    pos_label: str
    neg_label: str
    png: str
    json: str


def run_monitor(cfg: Config, log: Callable[[str], None] = print) -> MonitorResult:
    """Generate one answer to ``settings.prompt`` and project each token's state onto the trait.

    Args:
        cfg: model, generation, steering (for ``weights``) and vector settings; ``monitor`` (the trait,
            layer to read, system prompt, output folder) and ``steer`` (prompt, optional weights).
        log: where progress lines go.

    Returns:
        The tokens and their projections (unit trait vector at the read layer, raw activation units).
    """
    settings = MonitorSettings.from_config(cfg)
    if not settings.trait or not settings.prompt.strip():
        raise ConfigError("monitor needs --trait NAME and --prompt TEXT")
    ident = identify(cfg.model)
    path = Path(cfg.steering.trait_vector_dir) / ident.slug / f"{settings.trait}.safetensors"
    vf = load_vectors(path, fingerprint=ident.fingerprint)
    row = normalize_layer(
        cfg.steering.layer if settings.layer is None else settings.layer, int(vf.meta["num_layers"])
    )
    direction = unit(vf.vector(cfg.steering.vector_method, cfg.steering.summary, row).float())  # [hidden]
    if float(direction.norm()) == 0:
        raise VectorFileError(f"{path}: the vector at layer {row} is zero")
    steering = _steering(cfg, settings.weights, ident.slug, ident.fingerprint)
    labels = _labels(cfg, settings.trait)
    rt = load_runtime(cfg.model, cfg.cache_dir, cfg.seed)
    answer, ids, states = _generate_and_record(rt, cfg, settings, row, steering)
    values = (states @ direction).tolist()  # [tokens]
    name = f"{settings.trait}_L{row}_" + digest(
        [
            rt.fingerprint,
            settings.prompt,
            settings.system,
            settings.weights,
            asdict(cfg.steering),
            asdict(cfg.generation),
        ],
        10,
    )
    result = MonitorResult(
        settings.trait,
        row,
        settings.prompt,
        answer,
        ids,
        token_texts(rt.tokenizer, ids),
        values,
        *labels,
        png=str(Path(settings.out_dir) / f"{name}.png"),
        json=str(Path(settings.out_dir) / f"{name}.json"),
    )
    plot_tokens(result, result.png)
    atomic_write_json(
        result.json,
        {
            **asdict(result),
            "model_id": rt.model_id,
            "weights": settings.weights,
            "config_digest": cfg.digest("model", "generation", "steering"),
            "version": __version__,
        },
    )
    log(f"wrote {result.png}")
    return result


@contextmanager
def record_last_states(model: torch.nn.Module, row: int) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Collect the last position's state of hidden_states row ``row`` at every forward call.

    Yields a list that fills with one (sequence length, [batch, hidden] float32 CPU tensor) per call.
    """
    block = decoder_blocks(model)[row - 1]
    states: list[tuple[int, torch.Tensor]] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        hidden = untuple(output)
        states.append((hidden.shape[1], hidden[:, -1, :].detach().float().cpu()))

    handle = block.register_forward_hook(hook)  # appended: runs after a prepended steering hook
    try:
        yield states
    finally:
        handle.remove()


def render(result: MonitorResult, color: bool) -> str:
    """The monitored answer: with colour, a legend line and the coloured tokens; else values per token."""
    tokens = render_tokens(result.tokens, result.values, color)
    return f"{legend(result)}\n{tokens}" if color else tokens


def render_tokens(tokens: list[str], values: list[float], color: bool) -> str:
    """The answer as one line with an ANSI background per token, or plain text with values.

    Red is negative, green positive, the intensity |value| / max |value| over the answer.
    """
    if not color:
        lines = ["".join(tokens)]
        lines += [f"{v:+10.4f}  {t!r}" for t, v in zip(tokens, values, strict=True)]
        return "\n".join(lines)
    peak = max((abs(v) for v in values), default=0.0) or 1.0
    parts = []
    for token, value in zip(tokens, values, strict=True):
        r, g, b = token_rgb(value, peak)
        parts.append(f"\x1b[38;2;0;0;0m\x1b[48;2;{r};{g};{b}m{token}\x1b[0m")
    return "".join(parts)


def legend(result: MonitorResult) -> str:
    """What the colours mean, for the line above a coloured answer."""
    peak = max((abs(v) for v in result.values), default=0.0)
    return (
        f"{result.trait} at layer {result.layer}: green = {result.pos_label}, red = {result.neg_label}, "
        f"full colour at |projection| {peak:.4g}"
    )


def token_rgb(value: float, peak: float) -> tuple[int, int, int]:
    """The background colour of a value: neutral grey at 0, full red or green at +-peak."""
    share = min(abs(value) / peak, 1.0) if peak > 0 else 0.0
    target = POSITIVE if value > 0 else NEGATIVE
    return tuple(round(n + share * (t - n)) for n, t in zip(NEUTRAL, target, strict=True))  # type: ignore[return-value]


def plot_tokens(result: MonitorResult, path: str | Path) -> Path:
    """Bars of the per-token projections, token text under each bar, coloured like the terminal line."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the stage may run on a server
    import matplotlib.pyplot as plt

    peak = max((abs(v) for v in result.values), default=0.0) or 1.0
    colors = [tuple(c / 255 for c in token_rgb(v, peak)) for v in result.values]
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * len(result.tokens), 30), 4.2))
    xs = list(range(len(result.tokens)))
    ax.bar(xs, result.values, color=colors, edgecolor="grey", linewidth=0.4)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(xs, [t.strip() or repr(t) for t in result.tokens], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(f"projection on {result.trait} (+ {result.pos_label}, - {result.neg_label})")
    ax.set_title(f"{result.trait} at layer {result.layer}: {result.prompt[:80]}", fontsize=9)
    return save_figure(fig, path)


def _steering(cfg: Config, weights: dict[str, float], slug: str, fingerprint: str) -> SteeringSpec | None:
    """The steering of the one answer for non-zero weights, checked before the model loads; else None."""
    if not any(weights.values()):
        return None
    parse_weights(",".join(f"{k}={v}" for k, v in weights.items()), cfg.traits)  # unknown names
    s = cfg.steering
    basis = configured_basis(s, cfg.traits, slug, fingerprint)
    w = torch.tensor([[weights.get(t, 0.0) for t in cfg.traits]])
    return basis.spec(w, s.alpha, s.positions)


def _labels(cfg: Config, trait: str) -> tuple[str, str]:
    """The trait's pole labels when its definition is at hand (only the legend needs them)."""
    if not (Path(cfg.vectors.trait_dir) / f"{trait}.yaml").is_file():
        return "positive", "negative"
    [definition] = load_traits(cfg.vectors.trait_dir, [trait])
    return definition.pos_label, definition.neg_label


def _generate_and_record(
    rt: Runtime,
    cfg: Config,
    settings: MonitorSettings,
    row: int,
    steering: SteeringSpec | None,
) -> tuple[str, list[int], torch.Tensor]:
    """(answer text, its token ids, [tokens, hidden] state that chose each token)."""
    with record_last_states(rt.model, row) as states:
        [answer] = generate(
            rt,
            [Request(settings.prompt, settings.system)],
            cfg.generation,
            steering=steering,
            cache=None,
            seed=cfg.seed,
        )
    ids = answer.ids
    # generate() may run the prompt as two forwards: its prefix (which chooses no token), then its
    # last token; every later forward carries the token just chosen.
    prompt_len = len(rt.tokenizer(answer.prompt, add_special_tokens=False)["input_ids"])
    choosers = [state for _, state in (states[1:] if states and states[0][0] == prompt_len - 1 else states)]
    assert len(choosers) >= len(ids), "one forward call per answer token is expected"
    chosen = torch.cat(choosers[: len(ids)]) if ids else torch.zeros(0, rt.hidden_size)  # [tokens, hidden]
    return answer.text, ids, chosen


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text: decode(ids[:i+1]) minus decode(ids[:i]).

    Decoding tokens one by one loses the spaces SentencePiece and byte-level BPE attach to them.
    """
    pieces = []
    previous = ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(text[len(previous) :] if text.startswith(previous) else text)
        previous = text
    return pieces
