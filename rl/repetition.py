"""Early stop of degenerate repetition (MiniMax-M1): once N consecutive generated tokens each had
probability > p, the model is looping with high confidence; stop the generation there (N=3000, p=0.99).

`repetition_cut_index` is the pure rule over a finished sequence; `RepetitionDetector` applies the same
rule one token at a time inside a sampler loop. Both agree by construction (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class RepetitionStopConfig:
    window: int = 3000  # N consecutive tokens
    threshold: float = 0.99  # each with probability > threshold
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"RepetitionStopConfig.window must be >= 1, got {self.window}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"RepetitionStopConfig.threshold must be in [0, 1), got {self.threshold}")


def repetition_cut_index(
    probs: Iterable[float], window: int = 3000, threshold: float = 0.99, *, logprobs: bool = False
) -> int | None:
    """Index to cut the generation at (keep tokens[:cut]), or None if the rule never fires.

    The cut is just after the token that completes the first run of `window` consecutive tokens with
    probability > threshold. Pass `logprobs=True` for per-token log-probabilities.
    """
    config = RepetitionStopConfig(window=window, threshold=threshold)
    detector = RepetitionDetector(config)
    for i, value in enumerate(probs):
        if detector.update(math.exp(value) if logprobs else value):
            return i + 1
    return None


class RepetitionDetector:
    """Streaming form: call `update(prob)` per sampled token; it returns True when generation must stop."""

    def __init__(self, config: RepetitionStopConfig | None = None) -> None:
        self.config = config or RepetitionStopConfig()
        self.run = 0  # length of the current run of confident tokens
        self.triggered = False

    def reset(self) -> None:
        self.run = 0
        self.triggered = False

    def update(self, prob: float) -> bool:
        if not (0.0 <= prob <= 1.0 + 1e-6) or math.isnan(prob):
            raise ValueError(f"token probability must be in [0, 1], got {prob}")
        if not self.config.enabled:
            return False
        self.run = self.run + 1 if prob > self.config.threshold else 0
        if self.run >= self.config.window:
            self.triggered = True
        return self.triggered

    def update_logprob(self, logprob: float) -> bool:
        return self.update(math.exp(logprob))
