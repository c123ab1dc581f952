"""The Mosaic GPU paged prefill kernel in Mosaic GPU interpret mode (a CPU simulation of its
warpgroups, barriers and TMA copies) against the plain-JAX reference, and its dispatch.

Both q layouts run: gathered by tile beforehand, and `direct_q` / `direct_out` (q read and the
output written in place, [T, H * D], by 8-aligned tiles with head-major rows). jax 0.10.2's
interpreter lacks three primitives the GPU build uses: `layout_cast`, `run_state` and wgmma with a
transposed or register operand. In interpret mode the kernel takes QK^T and PV
as register dot products instead (`gpu=False` in `_kernel`); the producer/consumer pipeline,
barrier protocol (the interpreter checks that every phase is observed), page gather, causal
masks, online softmax and tile layout are the GPU code. The wgmma path itself is checked on the
H100 by `benchmarks/bench_attention.py --prefill-parts` (BENCHMARKS.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.errors import ConfigError
from kiln.runtime.kernels import attention as attn
from kiln.runtime.kernels import paged_prefill_mgpu as mg


def ragged_case(rng, q_lens, ctx_lens, heads, kv_heads, head_dim, page, dtype, pad_tokens=3):
    """q, pools and metadata of a ragged batch on shuffled pool blocks (one spare table column,
    padding tokens at the end)."""
    s = len(q_lens)
    used = [-(-c // page) for c in ctx_lens]
    nb, width = sum(used) + 2, max(used) + 1
    perm = rng.permutation(nb).astype(np.int32)
    tables = np.zeros((s, width), np.int32)
    o = 0
    for i, u in enumerate(used):
        tables[i, :u] = perm[o:o + u]
        o += u
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_ids = np.r_[np.repeat(np.arange(s), q_lens), [0] * pad_tokens].astype(np.int32)
    pos = np.r_[np.concatenate([np.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)]), [0] * pad_tokens]
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    t = int(qsl[-1]) + pad_tokens
    return dict(q=normal(t, heads, head_dim), k=normal(kv_heads, nb, page, head_dim),
                v=normal(kv_heads, nb, page, head_dim), positions=jnp.asarray(pos.astype(np.int32)),
                seq_ids=jnp.asarray(seq_ids), tables=jnp.asarray(tables),
                ctx=jnp.asarray(np.asarray(ctx_lens, np.int32)), qsl=jnp.asarray(qsl))


@pytest.mark.parametrize("q_lens, ctx_lens, heads, kv_heads, page, dtype, cfg, pad", [
    # q gathered by tile (53 tokens: not a multiple of 8, so also where direct_q is asked for), GQA 4:
    # 32-token tiles, a tile whose second warpgroup has no tokens, a decode token at 130
    ([40, 9, 1], [100, 9, 130], 4, 1, 16, jnp.bfloat16, mg.MgpuConfig(64, 2, True, True), 3),
    # q and output in place (80 tokens), GQA 2 on 2 kv heads, 128-token pages read in slices, a 3-deep
    # ring, a cached prefix, a sequence starting at an unaligned token (70)
    ([70, 3], [200, 3], 4, 2, 128, jnp.float16, mg.MgpuConfig(64, 3, True, True), 7),
    # in place, GQA 6 padded to 8 (padding heads neither read nor written), 16-token tiles
    ([21, 30], [21, 64], 6, 1, 16, jnp.bfloat16, mg.MgpuConfig(64, 2, True, True), 5),
    # q in place, output through the tile buffer and a gather
    ([40, 9, 1], [100, 9, 130], 4, 1, 16, jnp.bfloat16, mg.MgpuConfig(64, 2, True, False), 14),
])
def test_interpret_matches_reference(q_lens, ctx_lens, heads, kv_heads, page, dtype, cfg, pad):
    b = ragged_case(np.random.default_rng(len(q_lens)), q_lens, ctx_lens, heads, kv_heads, 64, page, dtype,
                    pad_tokens=pad)
    out = mg.paged_prefill(b["q"], b["k"], b["v"], b["seq_ids"], b["tables"], b["ctx"], b["qsl"],
                           scale=64 ** -0.5, config=cfg, interpret=True)
    f32 = {k: b[k].astype(jnp.float32) for k in ("q", "k", "v")}
    ref = attn.paged_attention_reference(f32["q"], f32["k"], f32["v"], b["positions"], b["seq_ids"], b["tables"],
                                         b["ctx"], scale=64 ** -0.5)
    n = sum(q_lens)
    got = np.asarray(out[:n], np.float32)
    want = np.asarray(ref[:n])
    assert out.dtype == dtype
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
    # every token's row, not only the whole: the worst token within 3x the tolerance
    per_tok = np.linalg.norm(got - want, axis=(1, 2)) / np.linalg.norm(want, axis=(1, 2))
    assert per_tok.max() < 6e-2
    assert not np.asarray(out[n:]).any()  # padding tokens are zeros


@pytest.mark.parametrize("seed", range(6))
def test_aligned_tile_metadata_covers_every_token_once(seed):
    """`direct_q` tiles: every real token is a valid row of exactly one tile, at its position; tiles
    start at multiples of 8; with `tokens`, every padding token is a valid row of a tile with no keys."""
    rng = np.random.default_rng(seed)
    s, bq = int(rng.integers(1, 6)), int(rng.choice([8, 16, 32, 64, 128]))
    q_lens = rng.integers(0, 90, s)
    ctx = q_lens + rng.integers(0, 50, s)
    qsl = np.r_[0, np.cumsum(q_lens)]
    t = int(-(-(qsl[-1] + rng.integers(0, 20)) // 8) * 8) or 8
    num_tiles = max(1, min(-(-t // bq) + 2 * s + 2, t))
    meta, first = mg.aligned_tile_metadata(jnp.asarray(qsl, jnp.int32), jnp.asarray(ctx, jnp.int32), bq, num_tiles, t)
    meta = np.asarray(meta).reshape(num_tiles, 5)
    covered = np.zeros(t, int)
    for j, (seq, a8, lo, hi, pa) in enumerate(meta):
        for r in range(lo, hi):
            tok = a8 * 8 + r
            covered[tok] += 1
            if tok < qsl[-1]:
                assert qsl[seq] <= tok < qsl[seq + 1]
                assert pa + r == ctx[seq] - q_lens[seq] + tok - qsl[seq]  # the token's position
                assert j == first[seq] + (tok - qsl[seq] // 8 * 8) // bq  # where the output gather looks
            else:
                assert pa + r < 0  # padding rows see no keys
    assert (covered == 1).all()


def test_supported_cases():
    ok = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, head_dim=128, block_size=16, group=4)
    assert mg.supported(**ok) == mg.available()
    assert mg.available()  # jax here ships Mosaic GPU
    for change in (dict(sliding_window=256), dict(soft_cap=30.0), dict(kv_dtype=jnp.float8_e4m3fn),
                   dict(q_dtype=jnp.float32, kv_dtype=jnp.float32), dict(head_dim=256), dict(block_size=12),
                   dict(block_size=24), dict(group=128)):
        assert not mg.supported(**{**ok, **change}), change


def test_dispatch(monkeypatch):
    q = jax.ShapeDtypeStruct((2048, 32, 128), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((8, 256, 16, 128), jnp.bfloat16)
    assert not attn._use_mgpu("pallas", q, pool, (4, 1), None, None)  # CPU: not Hopper
    monkeypatch.setattr(attn, "hopper", lambda: True)
    monkeypatch.setattr(attn, "lowers", lambda *a, **k: True)
    assert attn._use_mgpu("pallas", q, pool, (4, 1), None, None)        # prefill-heavy on Hopper
    assert not attn._use_mgpu("pallas", q, pool, (1024, 1), None, None)  # 2 tokens per sequence row: Triton
    assert not attn._use_mgpu("pallas", q, pool, (512, 1), None, None)   # 4 per row (a throughput step): Triton
    assert attn._use_mgpu("pallas", q, pool, (64, 1), None, None)        # 32 per row: a 128-row tile each
    assert not attn._use_mgpu("pallas", q, pool, (4, 1), 4096, None)     # a window: Triton
    assert attn._use_mgpu("mgpu", q, pool, (1024, 1), None, None)        # forced
    with pytest.raises(ConfigError, match="Mosaic GPU"):
        attn._use_mgpu("mgpu", q, pool, (4, 1), None, 30.0)
    assert attn.resolve_impl("triton", head_dim=128, block_size=16) == "triton"
    assert attn.resolve_impl("mgpu", head_dim=128, block_size=16) == "mgpu"


def test_dispatch_falls_back_where_mosaic_does_not_lower(monkeypatch):
    """Under "pallas", a shape the Mosaic GPU compiler rejects goes to the Triton kernel (probed
    once per shape) instead of failing the step's compile; a kernel that lowers is taken."""
    q = jax.ShapeDtypeStruct((2048, 32, 128), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((8, 12238, 16, 128), jnp.bfloat16)
    calls = []

    def rejecting(q, k, v, seq_ids, bt, ctx, qsl, *, scale):
        calls.append(bt.shape)
        raise AssertionError("layout inference")

    def fine(q, k, v, seq_ids, bt, ctx, qsl, *, scale):
        return q

    monkeypatch.setattr(attn, "_LOWERS", {})
    assert not attn.lowers(rejecting, q, pool, (256, 16))
    assert not attn.lowers(rejecting, q, pool, (256, 16))
    assert calls == [(256, 16)]  # probed once
    assert attn.lowers(fine, q, pool, (256, 16))
    monkeypatch.setattr(attn, "hopper", lambda: True)
    monkeypatch.setattr(mg, "paged_prefill", rejecting)
    assert not attn._use_mgpu("pallas", q, pool, (8, 16), None, None)


def test_dispatch_takes_the_in_place_layout_or_the_tile_gather_where_only_that_lowers(monkeypatch):
    q = jax.ShapeDtypeStruct((2048, 32, 128), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((8, 256, 16, 128), jnp.bfloat16)
    monkeypatch.setattr(attn, "hopper", lambda: True)
    monkeypatch.setattr(attn, "lowers", lambda *a, config: True)
    assert attn.mgpu_config(q, pool, (4, 16)) == mg.MgpuConfig() and mg.MgpuConfig().direct_out
    monkeypatch.setattr(attn, "lowers", lambda *a, config: not config.direct_q)
    assert attn.mgpu_config(q, pool, (4, 16)) == mg.MgpuConfig(direct_q=False, direct_out=False)
    assert attn._use_mgpu("pallas", q, pool, (4, 16), None, None)
    monkeypatch.setattr(attn, "lowers", lambda *a, config: False)
    assert attn.mgpu_config(q, pool, (4, 16)) is None
    assert not attn._use_mgpu("pallas", q, pool, (4, 16), None, None)
