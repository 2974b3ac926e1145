"""The prompts of `sae explain`, versioned: results record PROMPT_VERSION, and a change of wording is a new version.

Examples are shown as text with the tokens where the feature fires (at least MARK_SHARE of the example's maximum)
between << and >>, as in Bills et al. 2023 and EleutherAI delphi."""

from __future__ import annotations

from analysis.explain_scoring import Example

PROMPT_VERSION = 3  # 3: simulation added
MARK_SHARE = 0.3
MAX_WORDS = 16  # an explanation is cut to this many words: a phrase, not an essay
EXPLAIN_SYSTEM = (
    "You explain what a neuron-like feature of a language model responds to. You see text excerpts where it "
    "fires; the tokens where it fires most are marked <<like this>>. Answer with one short phrase, at most 12 "
    "words, naming what the marked tokens have in common. Do not explain your reasoning."
)
DETECT_SYSTEM = (
    "A feature of a language model is described by an explanation. Decide whether it fires anywhere in the text. "
    "Answer Yes or No."
)
FUZZ_SYSTEM = (
    "A feature of a language model is described by an explanation. In the text some tokens are marked <<like "
    "this>>. Decide whether the marked tokens are exactly the ones the explanation is about. Answer Yes or No."
)
SIMULATE_SYSTEM = (
    "A feature of a language model is described by an explanation. For each token of the text, one per line, "
    "write how strongly the feature fires on it, from 0 (not at all) to 9 (as strongly as it ever does)."
)
SIMULATE_FILL = "unknown\n"  # the placeholder written after each token; its slot's digit distribution is read
DIGITS = [str(d) for d in range(10)]


def _text(tokens: list[str], marks: list[bool]) -> str:
    """The tokens joined, marked ones between << and >>, newlines shown as ↵."""
    out = []
    for token, marked in zip(tokens, marks):
        token = token.replace("\n", "↵")
        out.append(f"<<{token}>>" if marked else token)
    return "".join(out).strip()


def shown_text(example: Example) -> str:
    """An example as the explainer sees it: its strongest tokens marked."""
    top = max(example.acts, default=0.0)
    return _text(example.tokens, [top > 0 and a >= MARK_SHARE * top for a in example.acts])


def explainer_messages(examples: list[Example], promoted: list[str]) -> list[dict[str, str]]:
    """The explainer's conversation: numbered marked excerpts and the tokens the feature promotes."""
    lines = [f"{i + 1}. {shown_text(e)}" for i, e in enumerate(examples)]
    tokens = ", ".join(repr(t) for t in promoted[:8])
    user = "Excerpts:\n" + "\n".join(lines) + (f"\n\nTokens it makes more likely next: {tokens}" if tokens else "")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user + "\n\nExplanation:"}]


def detect_messages(explanation: str, example: Example) -> list[dict[str, str]]:
    """Does a text activate a feature so explained?"""
    text = _text(example.tokens, [False] * len(example.tokens))
    user = f"Explanation: {explanation}\n\nText: {text}\n\nDoes the feature fire in this text? Answer Yes or No."
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


def fuzz_messages(explanation: str, example: Example, marks: list[bool]) -> list[dict[str, str]]:
    """Are the marked tokens the ones the explanation is about?"""
    user = (
        f"Explanation: {explanation}\n\nText: {_text(example.tokens, marks)}\n\n"
        "Are the marked tokens the ones the explanation describes? Answer Yes or No."
    )
    return [{"role": "system", "content": FUZZ_SYSTEM}, {"role": "user", "content": user}]


def clean_explanation(reply: str) -> str:
    """The first line of a reply, without quotes, a leading 'Explanation:' or a trailing period."""
    line = next((s.strip() for s in reply.strip().splitlines() if s.strip()), "")
    if line.lower().startswith("explanation:"):
        line = line[len("explanation:") :].strip()
    words = line.strip("\"' ").split()
    return " ".join(words[:MAX_WORDS]).rstrip(".,;:") or "(no explanation)"


def simulate_messages(explanation: str, example: Example) -> tuple[list[dict[str, str]], list[str]]:
    """Simulation (Bills et al. 2023, all at once): the conversation, and the reply's segments ("token<TAB>"), each
    followed by SIMULATE_FILL; the activation predicted for a token is the expected digit in its slot."""
    text = _text(example.tokens, [False] * len(example.tokens))
    user = f"Explanation: {explanation}\n\nText: {text}\n\nEach token and its activation (0-9):"
    segments = [token.replace("\n", "↵") + "\t" for token in example.tokens]
    return [{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}], segments
