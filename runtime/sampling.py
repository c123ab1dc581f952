"""Sampling parameters (host) and batched sampling on the device.

Each row of a batch carries its own temperature, top-k, top-p, min-p and PRNG key, so one
jitted call samples a whole mixed batch. A request's key depends only on its seed and how
many tokens it has generated: its output does not depend on what it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import RequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0                 # 0 or -1: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be -1, 0 (no limit) or a positive integer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def request_key(seed: int, step: int) -> np.ndarray:
    """The raw PRNG key for a request's `step`-th sampled token (host side, uint32[2])."""
    return np.array([seed & 0xFFFFFFFF, step & 0xFFFFFFFF], np.uint32)


@jax.jit
def sample(logits, temperature, top_k, top_p, min_p, keys):
    """logits [N, V]; per-row temperature/top_k/top_p/min_p [N]; keys uint32 [N, 2].
    Returns int32 [N]: argmax where temperature == 0, else a sample from the filtered
    distribution."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)
    x = logits / t[:, None]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    v = x.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    sorted_x = jnp.where(jnp.arange(v)[None, :] < k[:, None], sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # keep the smallest prefix whose mass reaches top_p: token i stays if the mass before it < top_p
    cut = jnp.sum((cum - probs) < top_p[:, None], axis=-1)  # >= 1
    threshold = jnp.take_along_axis(sorted_x, (cut - 1)[:, None], axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
    p = jax.nn.softmax(x, axis=-1)
    x = jnp.where(p < min_p[:, None] * jnp.max(p, axis=-1, keepdims=True), -jnp.inf, x)

    def draw(key, row):
        return jax.random.categorical(jax.random.wrap_key_data(key, impl="threefry2x32"), row)

    sampled = jax.vmap(draw)(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
