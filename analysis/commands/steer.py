"""`sae steer`: generate with and without pushing the model along SAE features, side by side, same seed."""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from activations.config import HeldOutText, SAEModelConfig
from activations.errors import UserError
from activations.options import check_fields, option
from activations.sources import open_text_source
from activations.tokens import pack_contexts
from analysis.feature_stats import FeatureStats
from analysis.logits import feature_logit_weights
from analysis.steering import generate, measure_effect, steering
from sae.runs import open_sae

HELP = "generate with features turned up (or clamped), next to the unsteered text"
DESCRIPTION = (
    "Add strength × the decoder direction of each --feature at the SAE's hook (or clamp the feature to "
    "--strength with --clamp) while the model generates; prints both continuations, sampled with the same "
    "seed. --measure reports how the log-probability of the features' promoted tokens moves on held-out text."
)


@dataclass
class SteerConfig:
    """Which features, how strongly, on which prompt, and how to sample."""

    feature: list[int] = option(help="feature index (repeat, or comma-separate, for several)", required=True)
    strength: float = option(
        help="added activation (units of the feature's own activation; see its max in the "
        "dashboard), or with --clamp the value the feature is held at",
        required=True,
    )
    prompt: str = option(help="text to continue", required=True)
    max_new_tokens: int = option(40, "tokens to generate", low=1)
    clamp: bool = option(False, "hold the feature at --strength (encode, set, decode, keep the SAE error)")
    temperature: float = option(0.8, "sampling temperature, 0 for greedy", low=0)
    seed: int = option(0, "sampling seed, the same for both generations")
    measure: bool = option(
        False, "also report the change in log-prob of the features' top promoted tokens over held-out text"
    )
    measure_prompts: int = option(8, "held-out contexts for --measure", low=1)
    measure_tokens: int = option(10, "promoted tokens measured", low=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.feature:
            raise UserError("--feature is empty; give one or more feature indices, e.g. --feature 12")


@dataclass
class Config:
    """`sae steer`: the run, the steering, the model and the held-out text for --measure."""

    run: str = option(help="run folder (or SAE folder holding cfg.json and sae_weights.safetensors)", positional=True)
    steer: SteerConfig = field(metadata=dict(help="steering"))
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))
    text: HeldOutText = field(default_factory=HeldOutText, metadata=dict(help="held-out text for --measure"))


def side_by_side(left: str, right: str, left_title: str, right_title: str, width: int | None = None) -> str:
    """Two texts in columns, wrapped to the terminal width."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = max(30, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines = []
        for para in text.split("\n"):
            lines.extend(textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=True) or [""])
        return lines

    a = [left_title, "─" * min(col, len(left_title))] + wrap(left)
    b = [right_title, "─" * min(col, len(right_title))] + wrap(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{col}} │ {y}" for x, y in zip(a, b))


def held_out_prompts(text: HeldOutText, dataset: str, n: int, lm, tokens: int = 64) -> list[str]:
    """The text of the first n contexts of `tokens` tokens of the held-out split of `dataset`."""
    source = open_text_source(
        dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
    )
    prompts = []
    for context in pack_contexts(source, lm.tokenizer, tokens, prepend_bos=False):
        prompts.append(lm.tokenizer.decode(context.tokens, skip_special_tokens=True))
        if len(prompts) == n:
            break
    return prompts


def run(cfg: Config) -> dict:
    """Print the features' promoted tokens, the two continuations side by side, and (--measure) the effect."""
    s = cfg.steer
    sae, lm = open_sae(cfg.run, model=cfg.model.model, device=cfg.model.device)
    features = s.feature
    mode = f"clamped to {s.strength:g}" if s.clamp else f"{s.strength:+g} × decoder direction"
    print(
        f"steering {lm.name} at {sae.cfg.hook_name}: feature{'s' if len(features) > 1 else ''} "
        f"{', '.join(map(str, features))} {mode}"
    )
    weights = feature_logit_weights(sae, lm, features)
    for f, w, mx in zip(features, weights, max_seen(Path(cfg.run), features)):
        promoted = ", ".join(repr(lm.tokenizer.decode([int(t)])) for t in w.topk(8).indices)
        seen = f" (max activation seen {mx:.3g})" if mx is not None else ""
        print(f"  feature {f}{seen} promotes {promoted}")
    print(f"seed {s.seed}, temperature {s.temperature:g}, {s.max_new_tokens} new tokens\n")

    plain = generate(lm, s.prompt, s.max_new_tokens, s.temperature, s.seed)
    with steering(lm, sae, features, s.strength, clamp=s.clamp):
        steered = generate(lm, s.prompt, s.max_new_tokens, s.temperature, s.seed)
    print(f"prompt: {s.prompt!r}\n")
    print(side_by_side(s.prompt + plain, s.prompt + steered, "unsteered", f"steered ({mode})"))
    result = {"unsteered": plain, "steered": steered}
    if s.measure:
        dataset = cfg.text.dataset or sae.cfg.dataset or "wikitext-2"
        prompts = held_out_prompts(cfg.text, dataset, s.measure_prompts, lm)
        effect = measure_effect(
            lm, sae, features, s.strength, [s.prompt, *prompts], n_tokens=s.measure_tokens, clamp=s.clamp
        )
        print(f"\nmeasured over {len(prompts) + 1} prompts ({effect.positions} next-token predictions):")
        print(
            f"  top {len(effect.promoted)} promoted tokens: mean log-prob {effect.logprob_clean:.3f} → "
            f"{effect.logprob_steered:.3f} (Δ {effect.delta:+.3f}); most suppressed tokens Δ "
            f"{effect.delta_suppressed:+.3f}"
        )
        print("  " + "  ".join(f"{t!r} {d:+.2f}" for t, d in zip(effect.promoted, effect.delta_per_token)))
        result["effect"] = effect
    return result


def max_seen(run: Path, features: list[int]) -> list[float | None]:
    """Each feature's max activation from `sae inspect`'s statistics, when they exist."""
    try:
        stats = FeatureStats.load(run / "features")
    except UserError:  # no inspect run yet: the hint is optional
        return [None] * len(features)
    return [float(stats.max[f]) if 0 <= f < stats.d_sae else None for f in features]
