"""`SamplingParams`: what a request asks of the sampler and of the stop checks (plain Python).

Validated on construction: a bad value raises `RequestError` naming the field and its range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.errors import RequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1                         # completions per prompt (they share the prompt's KV blocks)
    max_tokens: int = 16
    min_tokens: int = 0                # EOS / stop_token_ids are suppressed until this many tokens
    temperature: float = 1.0           # 0 = greedy
    top_k: int = 0                     # 0 or -1: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0    # > 1 discourages tokens seen in the prompt or the output
    presence_penalty: float = 0.0      # subtracted once from tokens already generated
    frequency_penalty: float = 0.0     # subtracted per occurrence in the generated tokens
    seed: int | None = None            # the output depends only on seed and prompt, not on the batch
    stop: list[str] | str | None = None  # stop strings, matched on the text; not part of the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # top-N logprobs per generated token (plus the sampled one)
    skip_special_tokens: bool = True

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise RequestError(msg)

        need(isinstance(self.n, int) and self.n >= 1, f"n must be a positive integer, got {self.n!r}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        need(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        need(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature!r}")
        if self.top_k == -1:
            self.top_k = 0
        need(isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be -1, 0 (no limit) or a positive integer, got {self.top_k!r}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        need(-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def request_key(seed: int, step: int) -> np.ndarray:
    """The raw PRNG key for a sequence's `step`-th sampled token (host side, uint32[2])."""
    return np.array([seed & 0xFFFFFFFF, step & 0xFFFFFFFF], np.uint32)
