"""The Pallas ragged paged-attention kernel (interpret mode on the CPU) against the plain-JAX
reference, over random ragged batches drawn by hypothesis.

Shapes that change the compiled program (heads, head dim, page size, dtype, window, soft-cap,
tile config) come from a short fixed list, so each compiles once; everything data-dependent
(the prefill/decode mix, context lengths, shuffled block tables, values) is drawn fresh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import ConfigError
from kiln.runtime.kernels import attention as attn
from kiln.runtime.kernels.ragged_paged_attention import KernelConfig, choose_config, ragged_paged_attention

T, S = 24, 5  # static flat-batch shape: up to T new tokens over up to S sequences


@functools.lru_cache(maxsize=None)
def kernel(cfg, scale, window, cap, fp8):
    def f(q, k, v, seq_ids, tables, ctx, qsl, ks, vs):
        return ragged_paged_attention(q, k, v, seq_ids, tables, ctx, qsl, scale=scale, sliding_window=window,
                                      soft_cap=cap, k_scale=ks if fp8 else None, v_scale=vs if fp8 else None,
                                      config=cfg, interpret=True)
    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def reference(scale, window, cap):
    return jax.jit(functools.partial(attn.paged_attention_reference, scale=scale, sliding_window=window,
                                     soft_cap=cap))


@st.composite
def ragged_batch(draw, block_size: int, width: int):
    """(q_lens, ctx_lens, block tables, num_blocks): a mix of prefill chunks (some with a cached
    prefix), decode tokens and empty padding sequences, each on shuffled pool blocks."""
    n = draw(st.integers(1, S))
    q_lens, ctx_lens = [], []
    budget = T
    for _ in range(n):
        q = draw(st.sampled_from([1, 1, 2, 3, 5, 8, 13]))
        q = max(1, min(q, budget - (n - len(q_lens) - 1)))
        budget -= q
        ctx = draw(st.integers(q, width * block_size))
        q_lens.append(q)
        ctx_lens.append(ctx)
    num_blocks = S * width + 3
    perm = draw(st.permutations(range(num_blocks)))
    tables = np.zeros((S, width), np.int32)
    for i, c in enumerate(ctx_lens):
        used = -(-c // block_size)
        tables[i, :used] = perm[i * width:i * width + used]
    return q_lens, ctx_lens, tables, num_blocks


def flat_inputs(q_lens, ctx_lens, tables):
    n = sum(q_lens)
    seq_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    qsl = np.full(S + 1, n, np.int32)
    ctx = np.zeros(S, np.int32)
    t = 0
    for s, (q, c) in enumerate(zip(q_lens, ctx_lens)):
        seq_ids[t:t + q] = s
        positions[t:t + q] = np.arange(c - q, c)
        qsl[s] = t
        ctx[s] = c
        t += q
    return dict(seq_ids=seq_ids, positions=positions, qsl=qsl, ctx=ctx, tables=tables)


# (kv heads, group, head dim, page size, dtype, sliding window, soft cap, tile config, fp8 pools)
CASES = {
    "mha-d64": (2, 1, 64, 4, "float32", None, None, None, False),
    "gqa4-d128-window": (2, 4, 128, 8, "float32", 7, None, KernelConfig(2, 16), False),
    "gqa8-d256-softcap": (1, 8, 256, 16, "float32", None, 20.0, KernelConfig(2, 8), False),
    "gqa4-d64-bf16-window-softcap": (2, 4, 64, 4, "bfloat16", 6, 30.0, None, False),
    "gqa4-d128-bf16": (2, 4, 128, 16, "bfloat16", None, None, KernelConfig(4, 32), False),
    "decode-splitk": (2, 1, 128, 8, "float32", 11, None, KernelConfig(16, 16, 4), False),
    "decode-splitk-tile-layout-window": (2, 4, 64, 8, "float32", 5, None,
                                         KernelConfig(4, 8, 4, in_place_split_k=False), False),
    "splitk-tile-layout-group3-fp8": (2, 3, 64, 8, "bfloat16", None, None,
                                      KernelConfig(2, 16, 2, in_place_split_k=False), True),
    "prefetch-pages-window": (2, 4, 64, 8, "float32", 6, None, KernelConfig(2, 16, 2, prefetch_pages=True), False),
    "prefetch-page-slices-fp8": (2, 4, 64, 16, "bfloat16", None, None,
                                 KernelConfig(4, 8, 1, 1, 1, prefetch_pages=True), True),
    "decode-splitk-one-page-fp8": (2, 4, 128, 16, "bfloat16", None, None, KernelConfig(4, 16, 8, 1, 1), True),
    "group3-padded": (2, 3, 64, 8, "float32", None, None, KernelConfig(4, 16, 2), False),
    "fp8-kv": (2, 4, 64, 8, "float32", None, None, None, True),
    "fp8-kv-bf16-f16": (2, 4, 64, 8, "bfloat16", None, None, KernelConfig(2, 16, 2), True),  # fp8 -> f16 path
    "grid-tile-major": (2, 2, 64, 4, "float32", 9, None, KernelConfig(4, 8, 1, longest_first=False), False),
}
WIDTH = 6  # blocks per sequence


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(data=st.data())
def test_kernel_matches_reference(case, data):
    kvh, g, d, bs, dtype, window, cap, cfg, fp8 = CASES[case]
    q_lens, ctx_lens, tables, nb = data.draw(ragged_batch(bs, WIDTH))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    x = flat_inputs(q_lens, ctx_lens, tables)
    q = jnp.asarray(rng.standard_normal((T, kvh * g, d)), dtype)
    k = jnp.asarray(rng.standard_normal((kvh, nb, bs, d)) * 2, dtype)
    v = jnp.asarray(rng.standard_normal((kvh, nb, bs, d)), dtype)
    ks, vs = jnp.float32(0.37), jnp.float32(1.9)
    if fp8:  # stored fp8 values; the reference reads the same values dequantised
        k, v = k.astype(jnp.float8_e4m3fn), v.astype(jnp.float8_e4m3fn)
    scale = d ** -0.5
    out = kernel(cfg, scale, window, cap, fp8)(q, k, v, x["seq_ids"], x["tables"], x["ctx"], x["qsl"], ks, vs)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    kr, vr = (f32(k) * ks, f32(v) * vs) if fp8 else (f32(k), f32(v))
    ref = reference(scale, window, cap)(f32(q), kr, vr, x["positions"], x["seq_ids"], x["tables"], x["ctx"])
    n = sum(q_lens)
    out, ref = np.asarray(out, np.float32), np.asarray(ref)
    err = np.linalg.norm(out[:n] - ref[:n]) / np.linalg.norm(ref[:n])
    assert err < (2e-2 if dtype == "bfloat16" else 1e-5), (case, q_lens, ctx_lens, err)
    assert np.all(out[n:] == 0)  # padding tokens come out as zeros


def test_choose_config_shapes():
    dec = choose_config(64, 64, 8, 4, 128, 16, 32768)
    assert dec.block_q * 4 == 16 and dec.block_k % 16 == 0 and dec.splits >= 1
    one = choose_config(8, 1, 8, 4, 128, 16, 32768)  # one long decode: split-K fills the GPU
    assert one.splits > 1
    short = choose_config(16, 1, 8, 4, 128, 16, 256)  # batch 1 over a 256-token table: split-K on 16-key steps
    assert short.splits == 8 and short.block_k == 16
    # a serving batch: no split-K, K/V loaded straight to registers (no cp.async ring); fp8 pools
    # take 64-key steps on 2 warps, 16-bit pools one page per step on one warp (the H100 sweep)
    serve8 = choose_config(512, 512, 8, 4, 128, 16, 1024, kv_itemsize=1)
    serve16 = choose_config(512, 512, 8, 4, 128, 16, 1024)
    assert (serve8.splits, serve8.num_stages, serve8.block_k, serve8.num_warps) == (1, 1, 64, 2)
    assert (serve16.splits, serve16.num_stages, serve16.block_k, serve16.num_warps) == (1, 1, 16, 1)
    pre = choose_config(4096, 4, 8, 4, 128, 16, 4096)
    assert pre.block_q * 4 == 128 and pre.splits == 1
    pre8 = choose_config(4096, 4, 8, 4, 128, 16, 4096, kv_itemsize=1)  # fp8 pools: 64-row tiles, no ring
    assert (pre8.block_q * 4, pre8.num_stages, pre8.splits) == (64, 1, 1)
    for d, page in ((128, 64), (256, 32), (128, 256)):  # whole pages, or a slice of one
        bk = choose_config(64, 4, 8, 4, d, page, 4096).block_k
        assert bk % page == 0 or page % bk == 0
    f32 = choose_config(4096, 1, 8, 4, 256, 16, 4096, itemsize=4)  # shrunk to fit shared memory
    rows = 2 * f32.block_k * f32.num_stages + f32.block_q * 4  # K and V tiles per stage, and the q tile
    assert rows * 256 * 4 <= 160 * 1024


def test_dispatch_auto_and_switch(monkeypatch):
    assert attn.resolve_impl("auto", head_dim=128, block_size=16) == "reference"  # CPU
    monkeypatch.setenv("KILN_ATTENTION", "interpret")
    assert attn.resolve_impl("auto", head_dim=128, block_size=16) == "interpret"
    assert attn.resolve_impl("reference", head_dim=128, block_size=16) == "reference"  # explicit wins
    monkeypatch.setenv("KILN_ATTENTION", "fast")
    with pytest.raises(ConfigError, match="KILN_ATTENTION"):
        attn.resolve_impl("auto", head_dim=128, block_size=16)
    with pytest.raises(ConfigError, match="unknown attention"):
        attn.resolve_impl("cuda", head_dim=128, block_size=16)
    with pytest.raises(ConfigError, match="power-of-two head_dim"):
        attn.resolve_impl("pallas", head_dim=96, block_size=16)


def test_write_kv_fp8_scales_and_padding():
    kp = jnp.zeros((2, 4, 4, 8), jnp.float8_e4m3fn)
    new = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 8)) * 3, jnp.float32)
    big = new.at[0, 0, 0].set(1e4)  # saturates instead of overflowing to NaN
    slots = jnp.asarray([5, -1, 14], jnp.int32)
    k2, v2 = attn.write_kv(kp, kp, big, new, slots, k_scale=0.5, v_scale=2.0)
    flat_k = np.asarray(k2.astype(jnp.float32)).reshape(2, 16, 8)
    flat_v = np.asarray(v2.astype(jnp.float32)).reshape(2, 16, 8)
    assert flat_k[0, 5, 0] == attn.FP8_MAX
    np.testing.assert_allclose(flat_v[:, 14] * 2.0, np.asarray(new[2]), rtol=0.07, atol=0.02)
    untouched = np.ones(16, bool)
    untouched[[5, 14]] = False
    assert np.all(flat_v[:, untouched] == 0)  # the padding token (slot -1) wrote nothing


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16", "float32"])
def test_write_kv_as_words_equals_elements(monkeypatch, dtype):
    """KILN_KV_WRITE=words scatters each row as 32-bit words: the same pools as the element
    scatter, bit for bit (padding dropped, existing contents kept); unknown modes are refused."""
    rng = np.random.default_rng(3)
    pool = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32).astype(dtype)
    k, v = (jnp.asarray(rng.standard_normal((5, 2, 16)) * 2, jnp.bfloat16) for _ in range(2))
    slots = jnp.asarray([3, -1, 22, 7, 0], jnp.int32)
    scales = dict(k_scale=0.5, v_scale=2.0) if dtype.startswith("float8") else {}
    got = {}
    for mode in attn.KV_WRITES:
        monkeypatch.setenv("KILN_KV_WRITE", mode)
        assert attn._kv_write_words(pool.dtype, 16) == (mode == "words" and dtype != "float32")
        got[mode] = [np.asarray(p).view(np.uint8) for p in jax.jit(
            lambda kp, vp: attn.write_kv(kp, vp, k, v, slots, **scales))(pool, pool)]
    for a, b in zip(got["words"], got["elements"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got["words"][0], np.asarray(pool).view(np.uint8))  # something was written
    monkeypatch.setenv("KILN_KV_WRITE", "bytes")
    with pytest.raises(ConfigError, match="KILN_KV_WRITE='bytes'"):
        attn.write_kv(pool, pool, k, v, slots, **scales)


def test_lowers_to_triton_for_the_gpu():
    """The kernel lowers through Pallas' Triton backend (no GPU needed to lower): decode
    split-K, prefill with window and soft-cap, FP8 pools, serving decode and fp8 prefill in token layout."""
    sd = jax.ShapeDtypeStruct
    i32 = jnp.int32

    def lower(t, s, pool_dtype, **kw):
        def f(q, k, v, sid, bt, cl, qsl):
            return ragged_paged_attention(q, k, v, sid, bt, cl, qsl, scale=0.1, **kw)
        pool = sd((8, 512, 16, 128), pool_dtype)
        args = (sd((t, 32, 128), jnp.bfloat16), pool, pool, sd((t,), i32), sd((s, 64), i32), sd((s,), i32),
                sd((s + 1,), i32))
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text

    lower(64, 64, jnp.bfloat16)
    lower(1024, 4, jnp.bfloat16, sliding_window=100, soft_cap=30.0)
    lower(16, 16, jnp.float8_e4m3fn, k_scale=0.5, v_scale=0.5)
    lower(512, 512, jnp.float8_e4m3fn, k_scale=0.5, v_scale=0.5)   # serving decode, token layout
    lower(1024, 4, jnp.float8_e4m3fn, k_scale=0.5, v_scale=0.5)    # fp8 prefill: 64-row tiles, one stage
    lower(16, 1, jnp.float8_e4m3fn, k_scale=0.5, v_scale=0.5,       # batch-1 split-K partials in token layout
          config=KernelConfig(4, 16, 8, 1, 1, in_place_split_k=True))
    lower(512, 512, jnp.float8_e4m3fn, k_scale=0.5, v_scale=0.5,    # block-table entries one step ahead
          config=KernelConfig(4, 64, 1, 2, 1, prefetch_pages=True))


def test_precomputed_tile_metadata_gives_the_same_result():
    """`metadata=` (tile metadata computed once for several layers) changes nothing."""
    from kiln.runtime.kernels.ragged_paged_attention import tile_metadata

    rng = np.random.default_rng(3)
    q_lens, ctx_lens = [3, 1, 5], [9, 20, 5]
    tables = np.zeros((S, WIDTH), np.int32)
    tables[:3, :5] = rng.permutation(15).reshape(3, 5)
    x = flat_inputs(q_lens, ctx_lens, tables)
    q = jnp.asarray(rng.standard_normal((T, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 16, 4, 64)), jnp.float32)
    cfg = KernelConfig(2, 8)
    md = tile_metadata(jnp.asarray(x["qsl"]), jnp.asarray(x["ctx"]), cfg.block_q, min(T, -(-T // 2) + S))
    args = (q, k, k, x["seq_ids"], x["tables"], x["ctx"], x["qsl"])
    a = ragged_paged_attention(*args, scale=0.125, config=cfg, interpret=True)
    b = ragged_paged_attention(*args, scale=0.125, config=cfg, interpret=True, metadata=md)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
