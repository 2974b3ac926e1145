"""A language model as the judge of `sae explain`'s scorers (analysis.explain_scoring.Judge): detection and fuzzing
are Yes / No questions, scored continuously by log P(Yes) - log P(No) through a sigmoid, so AUROC is meaningful."""

from __future__ import annotations

import math

from analysis.explain_prompts import detect_messages, fuzz_messages
from analysis.explain_scoring import Example
from analysis.llm_backends import Backend

CHOICES = ["Yes", "No"]


def _yes(logprobs: list[list[float]]) -> list[float]:
    """P(Yes) against P(No) for each answer's pair of log-probabilities."""
    return [1 / (1 + math.exp(max(-60.0, min(60.0, no - yes)))) for yes, no in logprobs]


class LLMJudge:
    """Answers the scorers' questions with a chat backend (simulation needs per-token log-probs: not asked)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name

    def detect(self, explanation: str, examples: list[Example]) -> list[float]:
        conversations = [detect_messages(explanation, e) for e in examples]
        return _yes(self.backend.choice_logprobs(conversations, CHOICES)) if conversations else []

    def fuzz(self, explanation: str, examples: list[Example], marked: list[list[bool]]) -> list[float]:
        conversations = [fuzz_messages(explanation, e, m) for e, m in zip(examples, marked)]
        return _yes(self.backend.choice_logprobs(conversations, CHOICES)) if conversations else []

    def simulate(self, explanation: str, examples: list[Example]) -> list[list[float]] | None:
        return None
