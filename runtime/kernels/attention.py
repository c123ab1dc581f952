"""Paged attention: the KV-cache write and the attention read, with implementation choice.

Pool layout, per layer, for K and V alike (the layout jax's GPU paged-attention kernel uses)::

    pool[kv_head, block, offset, head_dim]      flat slot = block * block_size + offset

A flat ragged batch of T new tokens writes its K/V at `slot_mapping[t]` (negative = padding,
dropped), then each token attends over its sequence's blocks, keys at positions
`<= positions[t]` (causal inside the new tokens too) and, with a sliding window `W`,
`> positions[t] - W`.

Implementations (`impl`): "reference" (plain JAX, the correctness oracle, any backend),
"triton" (`ragged_paged_attention.py`, Triton-lowered Pallas: every feature, decode split-K),
"mgpu" (`paged_prefill_mgpu.py`, Mosaic GPU on Hopper: wgmma + TMA, for prefill; bf16/f16,
head dim 64/128, no window/soft-cap/fp8), "pallas" (the kernels chosen by shape: Mosaic GPU for
prefill-heavy steps on Hopper where it covers the case, Triton otherwise), "interpret" (the
Triton kernel in Pallas interpret mode, for CPU tests) and "auto": "pallas" on the GPU, the
reference elsewhere. `KILN_ATTENTION=<impl>` in the environment overrides "auto".

FP8 (e4m3) pools: the cache entry may carry scalar `k_scale`/`v_scale` (value = stored *
scale); writes divide by the scale and saturate, reads multiply (the kernel folds the
scales into the softmax scale and the output).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from kiln.errors import ConfigError
from kiln.runtime.kernels import requested_impl

IMPLS = ("auto", "reference", "pallas", "triton", "mgpu", "interpret")
MGPU_MIN_TOKENS = 1024      # "prefill-heavy" by static shape: at least this many tokens (measured from 2k) ...
MGPU_TOKENS_PER_SEQ = 32    # ... and this many per sequence row (a 128-row tile per row; with fewer, as in a
                            # throughput step of 512 rows, its tile arrays outgrow the work: H100, 4096
                            # tokens / 512 rows, 450 decodes + 28 chunks: Mosaic 431 us, Triton 278 us)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


KV_WRITES = ("elements", "words")


def _kv_write_words(dtype, d: int) -> bool:
    """Whether the K/V scatter moves 32-bit words instead of elements: `KILN_KV_WRITE`
    ("words" | "elements", default "words"), for 8- and 16-bit pools whose rows are whole words.
    XLA's scatter runs about one update element per thread: for an fp8 pool at 4096 new tokens a
    step it took 1.63 ms over 32 layers as elements, 0.24 ms as words (H100, BENCHMARKS.md session 10)."""
    mode = os.environ.get("KILN_KV_WRITE", "words")
    if mode not in KV_WRITES:
        raise ConfigError(f"KILN_KV_WRITE={mode!r} is not one of {', '.join(KV_WRITES)}")
    size = jnp.dtype(dtype).itemsize
    return mode == "words" and size < 4 and (d * size) % 4 == 0


def write_kv(k_pool, v_pool, k, v, slot_mapping, *, k_scale=None, v_scale=None):
    """Scatter new K/V [T, KVH, D] into the pools at `slot_mapping` (padding slots < 0 are
    dropped). Returns the updated pools; with the pools donated, XLA updates in place (a
    scatter of T rows, no pass over the cache). FP8 pools store `value / scale`, saturated."""
    kvh, nb, bs, d = k_pool.shape
    slots = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)  # out of range -> dropped

    words = _kv_write_words(k_pool.dtype, d)

    def put(pool, new, scale):
        new = jnp.swapaxes(new, 0, 1)
        if scale is not None:
            new = jnp.clip(new.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX)
        new = new.astype(pool.dtype)
        flat = pool.reshape(kvh, nb * bs, d)
        if words:  # the rows as 32-bit words: a quarter (fp8) or half (bf16) of the elements to scatter
            size = pool.dtype.itemsize
            r = 4 // size
            as_words = jax.lax.bitcast_convert_type(flat.reshape(kvh, nb * bs, d // r, r), jnp.uint32)
            # the new rows' words by shifts, not a bitcast that changes the element size: elementwise
            # ops XLA can fuse into the scatter (a size-changing bitcast is a fusion of its own)
            u = jax.lax.bitcast_convert_type(new, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
            u = u.reshape(u.shape[:-1] + (d // r, r))
            w = u[..., 0]
            for i in range(1, r):  # little-endian, as the pool's bitcast: element i in bits [8*size*i, ...)
                w = w | (u[..., i] << (8 * size * i))
            flat = jax.lax.bitcast_convert_type(as_words.at[:, slots].set(w, mode="drop"), pool.dtype)
        else:
            flat = flat.at[:, slots].set(new, mode="drop")
        return flat.reshape(kvh, nb, bs, d)

    return put(k_pool, k, k_scale), put(v_pool, v, v_scale)


def paged_attention_reference(q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens, *,
                              scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None):
    """Plain-JAX paged attention over a ragged batch. q [T, H, D] -> [T, H, D].

    Gathers every sequence's blocks, then each token's sequence: memory O(T * context),
    the reference that kernels are tested against, not a fast path."""
    if k_scale is not None:
        k_pool = k_pool.astype(jnp.float32) * k_scale
    if v_scale is not None:
        v_pool = v_pool.astype(jnp.float32) * v_scale
    t, h, d = q.shape
    kvh, _, bs, _ = k_pool.shape
    s, b = block_tables.shape
    g = h // kvh
    ctx = b * bs

    def per_token(pool):  # [KVH, T, ctx, D]
        seq = pool[:, block_tables].reshape(kvh, s, ctx, d)
        return seq[:, seq_ids]

    kt, vt = per_token(k_pool), per_token(v_pool)
    qg = q.reshape(t, kvh, g, d)
    exact = jax.lax.Precision.HIGHEST  # the oracle: no TF32 for fp32 inputs on the GPU
    scores = jnp.einsum("tkgd,ktcd->tkgc", qg, kt, preferred_element_type=jnp.float32, precision=exact) * scale
    if soft_cap:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    kpos = jnp.arange(ctx, dtype=jnp.int32)[None, :]
    pos = positions[:, None]
    mask = (kpos <= pos) & (kpos < context_lens[seq_ids][:, None])
    if sliding_window:
        mask &= kpos > pos - sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgc,ktcd->tkgd", probs.astype(vt.dtype), vt, preferred_element_type=jnp.float32,
                     precision=exact)
    return out.reshape(t, h, d).astype(q.dtype)


def paged_attention(q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens, query_start_loc, *,
                    scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None, impl="auto"):
    """Attention of the ragged batch over the (already written) pools, by `impl` (see IMPLS)."""
    impl = resolve_impl(impl, head_dim=q.shape[-1], block_size=k_pool.shape[2])
    if impl == "reference":
        return paged_attention_reference(q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens,
                                         scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                         k_scale=k_scale, v_scale=v_scale)
    if impl in ("pallas", "mgpu") and _use_mgpu(impl, q, k_pool, block_tables.shape, sliding_window, soft_cap):
        from kiln.runtime.kernels.paged_prefill_mgpu import paged_prefill

        return paged_prefill(q, k_pool, v_pool, seq_ids, block_tables, context_lens, query_start_loc, scale=scale,
                             config=mgpu_config(q, k_pool, block_tables.shape))
    from kiln.runtime.kernels.ragged_paged_attention import ragged_paged_attention

    return ragged_paged_attention(q, k_pool, v_pool, seq_ids, block_tables, context_lens, query_start_loc,
                                  scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                  k_scale=k_scale, v_scale=v_scale, interpret=impl == "interpret")


def resolve_impl(impl: str, *, head_dim: int, block_size: int) -> str:
    """The implementation that runs: "auto" is the kernel on the GPU (where the shapes suit
    it) and the reference elsewhere; an explicit choice is checked, never changed."""
    from kiln.runtime.kernels.ragged_paged_attention import supported

    impl = requested_impl(impl, IMPLS, "KILN_ATTENTION", "attention")
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "pallas" if on_gpu and supported(head_dim, block_size) else "reference"
    if impl in ("pallas", "triton", "interpret") and not supported(head_dim, block_size):
        raise ConfigError(f"the Pallas attention kernel needs a power-of-two head_dim >= 16 and page size "
                          f"(got head_dim {head_dim}, kv_block_size {block_size}); use attention='reference'")
    return impl


def hopper() -> bool:
    """The default device is an sm_90 GPU (wgmma): where the Mosaic GPU kernel runs."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")) == "9.0"


def _use_mgpu(impl, q, k_pool, block_tables_shape, sliding_window, soft_cap) -> bool:
    """Whether this step's attention goes to the Mosaic GPU kernel: forced by impl="mgpu" (an error
    where it cannot), or under "pallas" for prefill-heavy shapes on Hopper that it covers."""
    from kiln.runtime.kernels import paged_prefill_mgpu as mg

    t, h, d = q.shape
    kvh, _, page, _ = k_pool.shape
    num_seqs = block_tables_shape[0]
    ok = mg.supported(q_dtype=q.dtype, kv_dtype=k_pool.dtype, head_dim=d, block_size=page, group=h // kvh,
                      sliding_window=sliding_window, soft_cap=soft_cap)
    if impl == "mgpu":
        if not (ok and hopper()):
            raise ConfigError(f"the Mosaic GPU attention kernel needs a Hopper GPU, bf16/f16 q and KV cache, head_dim "
                              f"64/128, kv_block_size a multiple of 8, no sliding window/soft-cap (got {q.dtype}/"
                              f"{k_pool.dtype}, head_dim {d}, kv_block_size {page}); use attention='pallas'")
        return True
    return (ok and t >= MGPU_MIN_TOKENS and t >= MGPU_TOKENS_PER_SEQ * num_seqs and hopper()
            and mgpu_config(q, k_pool, block_tables_shape) is not None)


def mgpu_config(q, k_pool, block_tables_shape):
    """The Mosaic GPU kernel's config for this shape: its default (q and output in place), else q gathered
    by tile where only that lowers (each probed once per shape on Hopper), else None."""
    from kiln.runtime.kernels import paged_prefill_mgpu as mg

    cfg = mg.MgpuConfig()
    if not hopper():
        return cfg
    for c in (cfg, dataclasses.replace(cfg, direct_q=False, direct_out=False)):
        if lowers(mg.paged_prefill, q, k_pool, block_tables_shape, config=c):
            return c
    return None


_LOWERS: dict = {}


def lowers(kernel, q, k_pool, block_tables_shape, **kw) -> bool:
    """Whether Mosaic GPU lowers `kernel` for these shapes (cached per shape): under "pallas" a
    shape it rejects goes to the Triton kernel instead of failing the whole step's compile (jax
    0.11.2's layout inference asserted on a real model step's pools that the kernel benchmark
    never met). The probe lowers the kernel alone, from shapes only."""
    s, b = block_tables_shape
    key = (kernel, q.shape, str(q.dtype), k_pool.shape, str(k_pool.dtype), (s, b), tuple(sorted(kw.items())))
    if key not in _LOWERS:
        i32 = jnp.int32
        args = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
                jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype), jax.ShapeDtypeStruct((q.shape[0],), i32),
                jax.ShapeDtypeStruct((s, b), i32), jax.ShapeDtypeStruct((s,), i32), jax.ShapeDtypeStruct((s + 1,), i32))
        try:
            jax.jit(lambda *a: kernel(*a, scale=1.0, **kw)).lower(*args)
            _LOWERS[key] = True
        except Exception as e:  # noqa: BLE001  (any lowering failure: fall back, say so once)
            import sys

            print(f"kiln: Mosaic GPU attention does not lower for q {q.shape} pool {k_pool.shape} "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); the Triton kernel runs",
                  file=sys.stderr, flush=True)
            _LOWERS[key] = False
    return _LOWERS[key]
