"""A language model as the judge of `sae explain`'s scorers (analysis.explain_scoring.Judge): detection and fuzzing
are Yes / No questions, scored continuously by log P(Yes) - log P(No) through a sigmoid, so AUROC is meaningful."""

from __future__ import annotations

import math

from analysis.explain_prompts import DIGITS, SIMULATE_FILL, detect_messages, fuzz_messages, simulate_messages
from analysis.explain_scoring import Example
from analysis.llm_backends import Backend

CHOICES = ["Yes", "No"]


def _yes(logprobs: list[list[float]]) -> list[float]:
    """P(Yes) against P(No) for each answer's pair of log-probabilities."""
    return [1 / (1 + math.exp(max(-60.0, min(60.0, no - yes)))) for yes, no in logprobs]


class LLMJudge:
    """Answers the scorers' questions with a chat backend; simulation runs where the backend reads log-probs of a
    written reply (the local one) and is off with `simulate=False`."""

    def __init__(self, backend: Backend, simulate: bool = True):
        self.backend = backend
        self.name = backend.name
        self.simulates = simulate

    def detect(self, explanation: str, examples: list[Example]) -> list[float]:
        conversations = [detect_messages(explanation, e) for e in examples]
        return _yes(self.backend.choice_logprobs(conversations, CHOICES)) if conversations else []

    def fuzz(self, explanation: str, examples: list[Example], marked: list[list[bool]]) -> list[float]:
        conversations = [fuzz_messages(explanation, e, m) for e, m in zip(examples, marked)]
        return _yes(self.backend.choice_logprobs(conversations, CHOICES)) if conversations else []

    def simulate(self, explanation: str, examples: list[Example]) -> list[list[float]] | None:
        """Per token, the expected digit 0-9 under the scorer's distribution in the token's slot; None when the
        backend cannot read slots or simulation is off."""
        if not self.simulates or not examples:
            return None
        asked = [simulate_messages(explanation, e) for e in examples]
        slots = self.backend.slot_logprobs([m for m, _ in asked], [s for _, s in asked], SIMULATE_FILL, DIGITS)
        if slots is None:
            return None
        return [[sum(math.exp(lp) * d for d, lp in enumerate(slot)) for slot in row] for row in slots]
