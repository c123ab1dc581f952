"""One sequence being generated, as the scheduler sees it (plain Python, no jax).

Counters, not phases::

    all tokens:  | prompt ............ | output ...... | ? |      ? = placeholder: sampled by a
                 0          num_computed_tokens ──►     num_tokens   step still on the device
                 ^^^^^^^^^^^^^^^^^^^^^^ K/V in the cache

A step computes tokens [num_computed_tokens, num_computed_tokens + n). When it reaches the
end, the step samples one new token, which joins as a placeholder until the host reads it
back (`resolve`). Prefill, chunked prefill, decode, prefix-cache hits and recompute after
preemption are all this one rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiln.runtime.block_manager import BlockTable

if TYPE_CHECKING:
    from kiln.runtime.sampling_params import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Request:
    request_id: str                 # the group's id (shared by the n sequences of one prompt)
    prompt_token_ids: list[int]
    params: "SamplingParams"
    seed: int                       # this sequence's sampling seed
    stop_ids: frozenset[int]        # tokens that end it (EOS unless ignore_eos, plus stop_token_ids)
    index: int = 0                  # which of the n completions
    leader: "Request | None" = None  # for index > 0: the sequence whose prompt blocks it shares
    arrival: int = 0
    status: str = WAITING
    finish_reason: str | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0      # prompt tokens found in the prefix cache at admission
    blocks: BlockTable = field(default_factory=BlockTable)
    slot: int = -1                  # while running: its row in the step builder's persistent arrays
    all_token_ids: list[int] = field(default_factory=list)   # prompt + resolved output
    pending: deque = field(default_factory=deque)             # (step, row) of each placeholder
    logprobs: list = field(default_factory=list)              # per output token: {token: logprob}

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """A copy (O(length)): hot paths use `num_output_tokens` or `output_tail`."""
        return self.all_token_ids[len(self.prompt_token_ids):]

    def output_tail(self, start: int) -> list[int]:
        """Resolved output tokens from index `start` on."""
        return self.all_token_ids[len(self.prompt_token_ids) + start:]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, placeholders included."""
        return len(self.all_token_ids) - len(self.prompt_token_ids) + len(self.pending)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids) + len(self.pending)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def target_tokens(self) -> int:
        """How many tokens must end up in the cache for this sequence to make progress: all of
        them while it may still sample, all but the last once max_tokens are out."""
        n = len(self.all_token_ids) + len(self.pending)
        return n - 1 if n - len(self.prompt_token_ids) >= self.params.max_tokens else n

    def add_placeholder(self, step: int, row: int) -> None:
        self.pending.append((step, row))

    def resolve(self, token: int) -> None:
        """The oldest placeholder's value arrived from the device."""
        self.pending.popleft()
        self.all_token_ids.append(token)
