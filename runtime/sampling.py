"""Sampling on the device, one row per sequence, every row with its own parameters.

    logits ─► penalties (repetition / presence / frequency) ─► min_tokens suppression
           ─► greedy argmax | temperature ─► top-k ─► top-p ─► min-p ─► categorical(key)

A row's PRNG key is (seed, index of the token in its output): a sequence's samples depend
on its seed and its own tokens only, never on what it was batched with. Logprobs are of
the model's raw distribution (before penalties and filters), top-N plus the sampled token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kiln.runtime.sampling_params import MAX_LOGPROBS, SamplingParams, request_key  # noqa: F401  (re-exported)


def token_counts(ids, vocab: int):
    """ids [N, M] (negative = padding) -> int32 counts [N, vocab]."""
    n = ids.shape[0]
    valid = ids >= 0
    return jnp.zeros((n, vocab), jnp.int32).at[jnp.arange(n)[:, None], jnp.where(valid, ids, 0)].add(
        valid.astype(jnp.int32))


def apply_penalties(logits, prompt_ids, output_ids, repetition, presence, frequency):
    """vLLM's conventions: repetition divides positive / multiplies negative logits of every
    token seen in prompt or output; presence and frequency subtract per generated token."""
    v = logits.shape[-1]
    out_counts = token_counts(output_ids, v)
    seen = (token_counts(prompt_ids, v) + out_counts) > 0
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * out_counts - presence[:, None] * (out_counts > 0)


def suppress(logits, ids):
    """Set the logits of `ids` [N, K] (negative = padding) to -inf."""
    n, v = logits.shape
    return jnp.asarray(logits).at[jnp.arange(n)[:, None], jnp.where(ids >= 0, ids, v)].set(-jnp.inf, mode="drop")


def filter_logits(x, top_k, top_p, min_p):
    """x [N, V] already divided by temperature; keeps each row's top-k, then the smallest
    prefix with mass >= top_p, then tokens with p >= min_p * p_max. Others -> -inf."""
    v = x.shape[-1]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    sorted_x = jnp.where(jnp.arange(v)[None, :] < k[:, None], sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    cut = jnp.sum((cum - probs) < top_p[:, None], axis=-1)  # token i stays if the mass before it < top_p
    threshold = jnp.take_along_axis(sorted_x, (cut - 1)[:, None], axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
    p = jax.nn.softmax(x, axis=-1)
    return jnp.where(p < min_p[:, None] * jnp.max(p, axis=-1, keepdims=True), -jnp.inf, x)


def sample_rows(logits, s: dict, *, all_greedy: bool = False, num_logprobs: int = 0) -> dict:
    """logits [N, V]; `s` holds per-row arrays [N]: temperature, top_k, top_p, min_p, keys
    (uint32 [N, 2]); optionally prompt_ids/output_ids [N, M] with repetition, presence,
    frequency (penalties), and suppress_ids [N, K] (min_tokens). Returns {"tokens": int32 [N]}
    plus, with num_logprobs, "top_ids"/"top_logprobs" [N, num_logprobs] and "logprob" [N]."""
    raw = logits.astype(jnp.float32)
    x = raw
    if "output_ids" in s:
        x = apply_penalties(x, s["prompt_ids"], s["output_ids"], s["repetition"], s["presence"], s["frequency"])
    if "suppress_ids" in s:
        x = suppress(x, s["suppress_ids"])
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if not all_greedy:
        temp = s["temperature"]
        y = filter_logits(x / jnp.where(temp > 0, temp, 1.0)[:, None], s["top_k"], s["top_p"], s["min_p"])

        def draw(key, row):
            return jax.random.categorical(jax.random.wrap_key_data(key, impl="threefry2x32"), row)

        tokens = jnp.where(temp > 0, jax.vmap(draw)(s["keys"], y).astype(jnp.int32), tokens)
    out = {"tokens": tokens}
    if num_logprobs:
        lp = jax.nn.log_softmax(raw, axis=-1)
        out["top_logprobs"], out["top_ids"] = jax.lax.top_k(lp, num_logprobs)
        out["logprob"] = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    return out


@jax.jit
def sample(logits, temperature, top_k, top_p, min_p, keys):
    """Plain per-row sampling without penalties: logits [N, V] -> int32 [N]."""
    s = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, keys=keys)
    return sample_rows(logits, s)["tokens"]
