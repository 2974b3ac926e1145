"""`sae steer`: generate with and without pushing the model along SAE features, side by side, same seed."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from pathlib import Path

from sae.commands.common import open_sae

HELP = "generate with features turned up (or clamped), next to the unsteered text"
DESCRIPTION = ("Add strength × the decoder direction of each --feature at the SAE's hook (or clamp the feature to "
               "--strength with --clamp) while the model generates; prints both continuations, sampled with the same "
               "seed. --measure reports how the log-probability of the features' promoted tokens moves on held-out text.")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae steer`."""
    p.add_argument("run", help="run folder (or SAE folder holding cfg.json and sae_weights.safetensors)")
    p.add_argument("--feature", type=int, action="append", required=True, help="feature index (repeat for several)")
    p.add_argument("--strength", type=float, required=True,
                   help="added activation (units of the feature's own activation; see its max in the dashboard), "
                        "or with --clamp the value the feature is held at")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    p.add_argument("--clamp", action="store_true", help="hold the feature at --strength (encode, set, decode, keep the SAE error)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 for greedy (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both generations (default 0)")
    p.add_argument("--measure", action="store_true",
                   help="also report the change in log-prob of the features' top promoted tokens over held-out text")
    p.add_argument("--measure-prompts", type=int, default=8, help="held-out contexts for --measure (default 8)")
    p.add_argument("--measure-tokens", type=int, default=10, help="promoted tokens measured (default 10)")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument("--dataset", default=None, help="held-out text for --measure (default: the training corpus, test split)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")


def side_by_side(left: str, right: str, left_title: str, right_title: str, width: int | None = None) -> str:
    """Two texts in columns, wrapped to the terminal width."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = max(30, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines = []
        for para in text.split("\n"):
            lines.extend(textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=True) or [""])
        return lines
    a, b = [left_title, "─" * min(col, len(left_title))] + wrap(left), [right_title, "─" * min(col, len(right_title))] + wrap(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{col}} │ {y}" for x, y in zip(a, b))


def held_out_prompts(dataset: str, n: int, lm, data_dir: str | None = None, tokens: int = 64) -> list[str]:
    """The text of the first n contexts of `tokens` tokens from the test split of `dataset`."""
    from activations.sources import open_text_source
    from activations.tokens import pack_contexts

    prompts = []
    for context in pack_contexts(open_text_source(dataset, split="test", data_dir=data_dir), lm.tokenizer, tokens, prepend_bos=False):
        prompts.append(lm.tokenizer.decode(context.tokens, skip_special_tokens=True))
        if len(prompts) == n:
            break
    return prompts


def run(args: argparse.Namespace) -> dict:
    from analysis.logits import feature_logit_weights
    from analysis.steering import generate, measure_effect, steering

    sae, lm = open_sae(args.run, model=args.model, device=args.device)
    features = args.feature
    mode = f"clamped to {args.strength:g}" if args.clamp else f"{args.strength:+g} × decoder direction"
    print(f"steering {lm.name} at {sae.cfg.hook_name}: feature{'s' if len(features) > 1 else ''} "
          f"{', '.join(map(str, features))} {mode}")
    stats_max = _max_seen(Path(args.run), features)
    weights = feature_logit_weights(sae, lm, features)
    for f, w, mx in zip(features, weights, stats_max):
        promoted = ", ".join(repr(lm.tokenizer.decode([int(t)])) for t in w.topk(8).indices)
        seen = f" (max activation seen {mx:.3g})" if mx is not None else ""
        print(f"  feature {f}{seen} promotes {promoted}")
    print(f"seed {args.seed}, temperature {args.temperature:g}, {args.max_new_tokens} new tokens\n")

    plain = generate(lm, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    with steering(lm, sae, features, args.strength, clamp=args.clamp):
        steered = generate(lm, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    print(f"prompt: {args.prompt!r}\n")
    print(side_by_side(args.prompt + plain, args.prompt + steered, "unsteered", f"steered ({mode})"))
    result = {"unsteered": plain, "steered": steered}
    if args.measure:
        prompts = held_out_prompts(args.dataset or sae.cfg.dataset or "wikitext-2", args.measure_prompts, lm, args.data_dir)
        effect = measure_effect(lm, sae, features, args.strength, [args.prompt, *prompts],
                                n_tokens=args.measure_tokens, clamp=args.clamp)
        print(f"\nmeasured over {len(prompts) + 1} prompts ({effect.positions} next-token predictions):")
        print(f"  top {len(effect.promoted)} promoted tokens: mean log-prob {effect.logprob_clean:.3f} → "
              f"{effect.logprob_steered:.3f} (Δ {effect.delta:+.3f}); most suppressed tokens Δ {effect.delta_suppressed:+.3f}")
        print("  " + "  ".join(f"{t!r} {d:+.2f}" for t, d in zip(effect.promoted, effect.delta_per_token)))
        result["effect"] = effect
    return result


def _max_seen(run: Path, features: list[int]) -> list[float | None]:
    """Each feature's max activation from `sae inspect`'s statistics, when they exist."""
    from activations.errors import UserError
    from analysis.feature_stats import FeatureStats
    try:
        stats = FeatureStats.load(run / "features")
    except UserError:  # no inspect run yet: the hint is optional
        return [None] * len(features)
    return [float(stats.max[f]) if 0 <= f < stats.d_sae else None for f in features]
