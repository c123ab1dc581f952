"""What generation returns (vLLM's shape).

A streamed `RequestOutput` carries deltas: each `CompletionOutput` holds only the text,
token ids and logprobs that are new since the previous one for that request (their
concatenation is the final result); `finished` and `finish_reason` arrive on the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)  # slots: one of each per streamed request per step (cheaper to make)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None  # per token: top-N and the sampled token -> logprob

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float   # of prompt tokens looked up, the share found in the cache
    steps: int
    tokens_per_step: float
    preemptions: int
    finished_requests: int
