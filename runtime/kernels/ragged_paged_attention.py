"""Ragged paged attention as one Pallas kernel (Triton backend on the GPU, `interpret=True` on
the CPU): prefill chunks and decode tokens of a flat batch, over the paged KV pools.

Work decomposition. Each sequence's new tokens are cut into q tiles of `block_q` tokens; a
tile holds those tokens times the G query heads that share one KV head, so one matmul has
M = block_q * G rows and every K/V byte a tile reads serves all G heads (GQA)::

    flat tokens   | seq0: 0 1 2 3 4 5 | seq1: 6 | seq2: 7 8 | pad |
    q tiles (4)     [0 1 2 3] [4 5]    [6]       [7 8]
    grid            (kv_head, tile, split)    one program each; tiles from the last (longest first)
    tile rows       row r = token (r // G) of the tile, query head (r % G) of the KV head

A program walks its sequence's keys in steps of `block_k` tokens, gathering the pages
through the block table, with an online softmax. Keys strictly inside the causal/window
band skip the mask; only the edge steps compute it. With `splits > 1` (decode over long
contexts) each program takes one slice of the key range and writes an unnormalised
partial (o, running max, running sum); `combine_splits` merges them (split-K). With one split
the kernel gathers its q rows from, and scatters its output rows to, token layout [T * H, D]
(no relayout before, no gather after; padded group rows go to one spare output row).

Positions are not read: a sequence's new tokens sit at positions
`context_len - q_len ... context_len - 1`, as `runtime/batch.py` lays them out.
FP8 (e4m3) pools are read with per-layer scalar scales (`k_scale` folds into the softmax
scale, `v_scale` into the output); with a bf16/f16 q they widen to f16 (one native convert on
sm_89+; e4m3 -> bf16 is several), q pre-scaled by 1/sqrt(d) so f16's range suffices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -1e30  # masked logit; finite so fully masked rows never make NaNs
LOG2E = 1.4426950408889634


def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params across jax versions (`CompilerParams` is `TritonCompilerParams`
    in older releases; a plain dict in the oldest)."""
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is not None:
        return cls(num_warps=num_warps, num_stages=num_stages)
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_q: int      # new tokens per q tile (tile rows = block_q * padded group)
    block_k: int      # key tokens per inner step: a multiple or a divisor of the page size
    splits: int = 1   # slices of the key range per tile (split-K), merged by combine_splits
    num_warps: int = 4
    num_stages: int = 2
    longest_first: bool = True  # grid (kv head, tile reversed): a sequence's last (longest causal) tiles start first
    fp8_f16: bool = True        # fp8 pools with bf16/f16 q: K/V convert to f16 (one native cvt on sm_89+), not bf16
    in_place: bool = True       # splits == 1: q rows read from, outputs written to token layout [T * H, D]
    in_place_split_k: bool = True   # the same with split-K (partials in token layout; no q pad / relayout): fp8 batch 1
                                    # on the H100 TPOT 3.73 -> 3.68 ms (BENCHMARKS.md session 11)
    prefetch_pages: bool = False    # each key step reads the next step's block-table entries: off, 0-1% (H100)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_config(num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, head_dim: int,
                  block_size: int, max_context: int, num_cores: int = 132, itemsize: int = 2,
                  kv_itemsize: int | None = None) -> KernelConfig:
    """Static tile choice from static shapes. Decode-shaped batches (one token per sequence)
    get the smallest tile that feeds a tensor-core matmul (16 rows), and split-K only while
    the grid is too small to fill the GPU twice (over short tables on one-page steps);
    prefill-shaped batches get 64- or 128-row tiles.
    Block sizes, warps and stages are the best of the H100 sweep in BENCHMARKS.md. `itemsize`
    is the widest of q and the pools (shared-memory sizing), `kv_itemsize` the pools' own."""
    gp = _pow2(group)
    cfg = _choose(num_tokens, num_seqs, num_kv_heads, gp, head_dim, block_size, max_context, num_cores,
                  kv_itemsize or itemsize)
    # shrink the tiles until K/V stages and the q tile fit in shared memory (fp32, head dim 256)
    bq, bk = cfg.block_q, cfg.block_k
    while _smem_bytes(bq * gp, bk, head_dim, cfg.num_stages, itemsize) > SMEM_BUDGET and bk > 16:
        bk = _fit_block_k(bk // 2, block_size)
    while _smem_bytes(bq * gp, bk, head_dim, cfg.num_stages, itemsize) > SMEM_BUDGET and bq * gp > 16:
        bq = max(1, bq // 2)
    return dataclasses.replace(cfg, block_q=bq, block_k=bk)


SMEM_BUDGET = 160 * 1024  # of the H100's 227 KB per block, leaving room for Triton's own buffers


def _smem_bytes(rows: int, block_k: int, head_dim: int, stages: int, itemsize: int) -> int:
    return (stages * 2 * block_k + rows) * head_dim * itemsize


def _choose(num_tokens, num_seqs, num_kv_heads, gp, head_dim, block_size, max_context, num_cores,
            kv_itemsize) -> KernelConfig:
    if num_tokens <= max(num_seqs, 16):  # decode-shaped: about one token per sequence
        block_q = max(1, 16 // gp)
        block_k = _fit_block_k(64 if head_dim <= 128 else 32, block_size)
        tiles = min(num_tokens, -(-num_tokens // block_q) + num_seqs)
        splits = 1
        max_splits = max(1, max_context // (4 * block_k))
        while tiles * num_kv_heads * splits < 2 * num_cores and splits * 2 <= min(32, max_splits):
            splits *= 2
        short_k = _fit_block_k(16, block_size)
        if tiles * num_kv_heads * splits < 2 * num_cores and head_dim <= 128 and short_k < block_k:
            # few sequences over short contexts (batch 1 at a few hundred tokens): too few 64-key
            # steps to split, so the grid was 8 programs walking every key in turn (H100, 8B bf16
            # batch 1: 22 us per layer, 0.7 of the 6.6 ms step). One page per step lets split-K
            # spread the keys over the GPU, at least two steps per split.
            more = splits
            while tiles * num_kv_heads * more < 2 * num_cores and more * 2 <= min(32, max_context // (2 * short_k)):
                more *= 2
            if more > splits:
                return KernelConfig(block_q, short_k, more, num_warps=1, num_stages=1)
        if splits == 1 and head_dim <= 128:
            # a serving batch (the grid fills the GPU without split-K): K/V straight into registers,
            # no cp.async ring (num_stages 1). Under ncu the ring's fp8 tiles were read back from
            # shared memory with 8-way bank conflicts (L1 78% busy, DRAM 47%). H100, 512 sequences
            # (bench_decode_batch.py --wide in BENCHMARKS.md): fp8 ctx <= 256 154 -> 114 us, <= 1024
            # 505 -> 356 us; bf16 206 -> 176 us, 716 -> 634 us
            if kv_itemsize == 1:
                return KernelConfig(block_q, _fit_block_k(64, block_size), 1, num_warps=2, num_stages=1)
            return KernelConfig(block_q, short_k, 1, num_warps=1, num_stages=1)
        return KernelConfig(block_q, block_k, splits, num_warps=4, num_stages=3)
    # prefill-shaped
    if kv_itemsize == 1 and head_dim <= 128:
        # fp8 pools: 64-row tiles with K/V straight into registers (their fp8 tiles in a cp.async
        # ring conflict in shared memory, as in decode). H100 (bench_decode_batch.py --mixed):
        # 450 decodes + 28 x 128 tokens 262 -> 221 us, 420 + 7 x 128 201 -> 166 us, 2 x 1990
        # tokens 399 -> 334 us, one 1024-token chunk 83 -> 67 us; 50 + 8 x 120 76 -> 83 us
        return KernelConfig(max(1, 64 // gp), _fit_block_k(64, block_size), 1, num_warps=4, num_stages=1)
    # With many sequence rows per token (a throughput step: hundreds of decode tokens beside a
    # few prefill chunks) every decode token fills a tile alone: 64-row tiles waste half as much
    # (H100, 450 decodes + 28 x 128-token chunks: 327 -> 278 us), at a few percent on long
    # chunks (2 x 1990 tokens in the same shape: 316 -> 335 us)
    rows = 64 if head_dim > 128 or num_tokens <= 8 * num_seqs else 128
    block_q = max(1, rows // gp)
    block_k = _fit_block_k(64, block_size)
    return KernelConfig(block_q, block_k, 1, num_warps=4 if head_dim <= 128 else 8, num_stages=2)


def _fit_block_k(want: int, block_size: int) -> int:
    """`want` adjusted to a multiple of the page size (pages gathered) or a divisor of it."""
    if want >= block_size:
        return max(block_size, want // block_size * block_size)
    while block_size % want:
        want //= 2
    return want


def supported(head_dim: int, block_size: int, block_k: int | None = None) -> bool:
    """Shapes the Triton kernel handles: power-of-two head dims >= 16 and pages that tile."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    ok = pow2(head_dim) and head_dim >= 16 and pow2(block_size)
    return ok and (block_k is None or pow2(block_k) and block_k >= 16)


# --------------------------------------------------------------------------- host-side metadata


def tile_metadata(query_start_loc, context_lens, block_q: int, num_tiles: int):
    """Per q tile: (seq, first token, tokens in tile, position of first token), flat int32
    [num_tiles * 4]; tiles past the last real one have 0 tokens. Also `first_tile[S]`."""
    qsl = query_start_loc.astype(jnp.int32)
    s = context_lens.shape[0]
    qlen = qsl[1:s + 1] - qsl[:s]                         # [S]
    ntile = (qlen + block_q - 1) // block_q
    ends = jnp.cumsum(ntile)
    first = ends - ntile
    j = jnp.arange(num_tiles, dtype=jnp.int32)
    method = "compare_all" if num_tiles * s <= (1 << 22) else "scan"  # one fused op, not a loop
    seq = jnp.searchsorted(ends, j, side="right", method=method).astype(jnp.int32)
    valid = seq < s
    seq = jnp.minimum(seq, s - 1)
    local = (j - first[seq]) * block_q
    tok0 = qsl[seq] + local
    nq = jnp.clip(qsl[seq + 1] - tok0, 0, block_q)
    p0 = context_lens[seq].astype(jnp.int32) - qlen[seq] + local
    z = jnp.zeros_like(j)
    meta = jnp.stack([jnp.where(valid, seq, z), jnp.where(valid, tok0, z), jnp.where(valid, nq, z),
                      jnp.where(valid, p0, z)], axis=1)
    return meta.reshape(-1), first


# --------------------------------------------------------------------------- the kernel


def _kernel(meta_ref, bt_ref, scales_ref, q_ref, k_ref, v_ref, o_ref, *stat_refs, group: int, block_q: int,
            block_k: int, page: int, table_width: int, num_tables: int, num_tiles: int, splits: int,
            scale: float, sliding_window, soft_cap, exact: bool, longest_first: bool, fp8_f16: bool,
            in_place: bool, num_heads: int, real_group: int, prefetch_pages: bool):
    if longest_first:  # grid (kv head, tile, split), tiles walked from the last
        tile, split, kv_head = num_tiles - 1 - pl.program_id(1), pl.program_id(2), pl.program_id(0)
    else:              # grid (tile, kv head, split)
        tile, split, kv_head = pl.program_id(0), pl.program_id(2), pl.program_id(1)
    seq, tok0, nq, p0 = (meta_ref[4 * tile + i] for i in range(4))
    rows = block_q * group
    head_dim = q_ref.shape[-1]
    num_blocks = k_ref.shape[0]
    r = lax.broadcasted_iota(jnp.int32, (rows,), 0)  # tile row r: token r // group, group head r % group
    if in_place:  # row r: token tok0 + r // group, query head kv_head * real_group + r % group
        ok = (r // group < nq) & (r % group < real_group)
        qrow = (tok0 + r // group) * num_heads + kv_head * real_group + r % group
        q = q_ref[jnp.where(ok, qrow, 0), :]                             # [M, D], gathered rows
        orow = jnp.where(ok, qrow, o_ref.shape[0] - 1)                   # the last row takes the rest
    else:
        q = q_ref[pl.ds(tok0 * group, rows), :]                          # [M, D]
    row_pos = p0 + r // group
    sm_scale = scales_ref[0] * scale  # logits are kept in log2 units: exp2 is the native op
    kv_f16 = fp8_f16 and not exact and jnp.dtype(k_ref.dtype).itemsize == 1
    if kv_f16:  # fp8 K/V widen to f16 in one instruction; q pre-scaled so that f16 range suffices
        q = (q.astype(jnp.float32) * scale).astype(jnp.float16)
        sm_scale = scales_ref[0]
    precision = lax.Precision.HIGHEST if exact else None
    pages_per_step = max(1, block_k // page)
    last = num_tables * table_width - 1

    def page_ids(kb):  # the pool blocks of key step kb: [pages_per_step] (past the table: clamped, unused)
        if block_k >= page:
            idx = seq * table_width + kb * pages_per_step + lax.iota(jnp.int32, pages_per_step)
        else:
            idx = seq * table_width + (kb * block_k) // page + lax.iota(jnp.int32, 1)
        return jnp.clip(bt_ref[jnp.minimum(idx, last)], 0, num_blocks - 1)

    def load_kv(kb, pages):
        if block_k >= page:                                            # gather whole pages
            k = k_ref[pages].reshape(block_k, head_dim)
            v = v_ref[pages].reshape(block_k, head_dim)
        else:                                                          # a slice of one page
            start = (kb * block_k) % page
            k = k_ref[pages[0], pl.ds(start, block_k), :]
            v = v_ref[pages[0], pl.ds(start, block_k), :]
        return k.astype(q.dtype), v.astype(q.dtype)

    def step(kb, carry, masked: bool):
        if prefetch_pages:  # this step's pages came with the carry; the next step's load now
            o, m, l, pages = carry
            nxt = page_ids(kb + 1)
        else:
            (o, m, l), pages = carry, page_ids(kb)
        k, v = load_kv(kb, pages)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)              # [M, BK]
        if soft_cap:
            s = jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * LOG2E)
        else:
            s = s * (sm_scale * LOG2E)
        if masked:
            kpos = kb * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            ok = kpos <= row_pos[:, None]
            if sliding_window:
                ok = ok & (kpos > row_pos[:, None] - sliding_window)
            s = jnp.where(ok, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + p.sum(axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        out = (alpha[:, None] * o + pv, m_new, l)
        return out + (nxt,) if prefetch_pages else out

    # key range of this tile: [lo, hi); blocks fully inside the band for every row skip the mask
    hi = p0 + nq
    lo = jnp.maximum(p0 - sliding_window + 1, 0) if sliding_window else 0
    kb_lo, kb_hi = lo // block_k, (hi + block_k - 1) // block_k
    if sliding_window:
        f_lo = jnp.maximum(kb_lo, (jnp.maximum(hi - sliding_window, 0) + block_k - 1) // block_k)
    else:
        f_lo = kb_lo
    f_lo = jnp.minimum(f_lo, kb_hi)
    f_hi = jnp.clip((p0 + 1) // block_k, f_lo, kb_hi)
    per = (kb_hi - kb_lo + splits - 1) // splits
    s_lo = kb_lo + split * per
    s_hi = jnp.minimum(kb_hi, s_lo + per)

    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), NEG, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    for a, b, masked in ((kb_lo, f_lo, True), (f_lo, f_hi, False), (f_hi, kb_hi, True)):
        a, b = jnp.maximum(a, s_lo), jnp.minimum(b, s_hi)
        if prefetch_pages:
            carry = carry[:3] + (page_ids(a),)
        carry = lax.fori_loop(a, jnp.maximum(a, b), functools.partial(_flip, step, masked), carry)
    o, m, l = carry[:3]
    if splits == 1:
        l = jnp.where(l == 0.0, 1.0, l)
        out = (o * (scales_ref[1] / l)[:, None]).astype(o_ref.dtype)
        if in_place:
            o_ref[orow, :] = out
        else:
            o_ref[...] = out
    elif in_place:  # this split's partials, in token layout
        m_ref, l_ref = stat_refs
        o_ref[orow, :] = o
        m_ref[orow] = m
        l_ref[orow] = l
    else:
        m_ref, l_ref = stat_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def _flip(step, masked, kb, carry):
    return step(kb, carry, masked)


def combine_splits(o, m, l, v_scale):
    """Merge split-K partials: o [P, ..., D] unnormalised, m (log2 units)/l [P, ...] -> [..., D] f32."""
    m_max = m.max(axis=0)
    w = jnp.exp2(m - m_max[None])
    den = (w * l).sum(axis=0)
    den = jnp.where(den == 0.0, 1.0, den)
    return (w[..., None] * o).sum(axis=0) * (v_scale / den)[..., None]


def kernel_inputs(q, k_pool, block_tables, context_lens, query_start_loc, *, k_scale=None, v_scale=None,
                  config: KernelConfig | None = None, metadata=None):
    """The tile config and the kernel's operands (meta, tables, scales, q: token rows [T * H, D] in
    place, else by KV head (`q_by_kv_head`)) plus
    `first_tile`: the small XLA ops around the kernel, split out so the kernel can be timed alone.
    `metadata` = (meta, first_tile) from `tile_metadata` for this config's block_q, when the
    caller computed it once for several layers (XLA's CSE does the same inside one jit)."""
    t, h, d = q.shape
    kvh, nb, page, _ = k_pool.shape
    s, width = block_tables.shape
    group = h // kvh
    gp = _pow2(group)
    cfg = config or choose_config(t, s, kvh, group, d, page, width * page,
                                  itemsize=max(jnp.dtype(q.dtype).itemsize, jnp.dtype(k_pool.dtype).itemsize),
                                  kv_itemsize=jnp.dtype(k_pool.dtype).itemsize)
    bq, bk = cfg.block_q, cfg.block_k
    if not (bk % page == 0 or page % bk == 0):
        raise ValueError(f"block_k {bk} must be a multiple or a divisor of the page size {page}")
    num_tiles = max(1, min(t, -(-t // bq) + s))
    meta, first_tile = metadata or tile_metadata(query_start_loc, context_lens, bq, num_tiles)

    qg = q.reshape(t * h, d) if _in_place(cfg) else q_by_kv_head(q, kvh, bq, gp)

    one = jnp.ones((), jnp.float32)
    ks = one if k_scale is None else jnp.asarray(k_scale, jnp.float32).reshape(())
    vs = one if v_scale is None else jnp.asarray(v_scale, jnp.float32).reshape(())
    return cfg, (meta, block_tables.astype(jnp.int32), jnp.stack([ks, vs]), qg), first_tile


def _in_place(cfg: KernelConfig) -> bool:
    return cfg.in_place and (cfg.splits == 1 or cfg.in_place_split_k)


def kernel_call(cfg: KernelConfig, meta, tables, scales, qg, k_pool, v_pool, *, group: int, scale: float,
                sliding_window=None, soft_cap=None, interpret: bool = False):
    """The pallas_call alone. In place (one split, or split-K with `in_place_split_k`): q as
    [T * H, D] rows, the output the same rows plus one spare row [T * H + 1, D] that takes the
    writes of padding rows (padding tokens are left unwritten; split-K: f32 partials o [P, T * H
    + 1, D], m and l [P, T * H + 1] for `combine_splits`). Otherwise q by KV head
    (`q_by_kv_head`) and tile outputs [KVH, tiles, block_q * Gp, D] in q's dtype, or with split-K
    the f32 partials (o, m, l) by tile. Tables are clamped in the kernel."""
    kvh, nb, page, d = k_pool.shape
    s, width = tables.shape
    gp = _pow2(group)
    bq, bk = cfg.block_q, cfg.block_k
    rows = bq * gp
    num_tiles = meta.shape[0] // 4
    exact = jnp.dtype(qg.dtype) == jnp.float32

    in_place = _in_place(cfg)
    kernel = functools.partial(
        _kernel, group=gp, block_q=bq, block_k=bk, page=page, table_width=width, num_tables=s,
        num_tiles=num_tiles, splits=cfg.splits, scale=float(scale),
        sliding_window=int(sliding_window) if sliding_window else None,
        soft_cap=float(soft_cap) if soft_cap else None, exact=exact, longest_first=cfg.longest_first,
        fp8_f16=cfg.fp8_f16, in_place=in_place, num_heads=kvh * group, real_group=group,
        prefetch_pages=cfg.prefetch_pages)
    if cfg.longest_first:  # program ids (kv head, n, split) -> (tile, kv head, split)
        grid, ids = (kvh, num_tiles, cfg.splits), lambda a, b, c: (num_tiles - 1 - b, a, c)
    else:
        grid, ids = (num_tiles, kvh, cfg.splits), lambda a, b, c: (a, b, c)

    def spec(shape, index):  # a BlockSpec whose index map sees (tile, kv head, split)
        return pl.BlockSpec(shape, lambda a, b, c: index(*ids(a, b, c)))

    whole = lambda n: spec((n,), lambda i, j, k: (0,))  # noqa: E731
    q_spec = (spec(qg.shape, lambda i, j, k: (0, 0)) if in_place
              else spec((None, qg.shape[1], d), lambda i, j, k: (j, 0, 0)))
    in_specs = [
        whole(meta.shape[0]), whole(s * width), whole(2), q_spec,
        spec((None, nb, page, d), lambda i, j, k: (j, 0, 0, 0)),
        spec((None, nb, page, d), lambda i, j, k: (j, 0, 0, 0)),
    ]
    if in_place and cfg.splits == 1:
        out_shape = jax.ShapeDtypeStruct((qg.shape[0] + 1, d), qg.dtype)
        out_specs = spec(out_shape.shape, lambda i, j, k: (0, 0))
    elif in_place:  # split-K partials by split, rows in token layout
        p, n = cfg.splits, qg.shape[0] + 1
        out_shape = [jax.ShapeDtypeStruct((p, n, d), jnp.float32), jax.ShapeDtypeStruct((p, n), jnp.float32),
                     jax.ShapeDtypeStruct((p, n), jnp.float32)]
        out_specs = [spec((None, n, d), lambda i, j, k: (k, 0, 0)), spec((None, n), lambda i, j, k: (k, 0)),
                     spec((None, n), lambda i, j, k: (k, 0))]
    elif cfg.splits == 1:
        out_shape = jax.ShapeDtypeStruct((kvh, num_tiles, rows, d), qg.dtype)
        out_specs = spec((None, None, rows, d), lambda i, j, k: (j, i, 0, 0))
    else:
        p = cfg.splits
        out_shape = [jax.ShapeDtypeStruct((p, kvh, num_tiles, rows, d), jnp.float32),
                     jax.ShapeDtypeStruct((p, kvh, num_tiles, rows), jnp.float32),
                     jax.ShapeDtypeStruct((p, kvh, num_tiles, rows), jnp.float32)]
        out_specs = [spec((None, None, None, rows, d), lambda i, j, k: (k, j, i, 0, 0)),
                     spec((None, None, None, rows), lambda i, j, k: (k, j, i, 0)),
                     spec((None, None, None, rows), lambda i, j, k: (k, j, i, 0))]
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=None if interpret else _compiler_params(cfg.num_warps, cfg.num_stages),
        name=f"kiln_ragged_paged_attention_q{bq}_k{bk}_s{cfg.splits}",
    )(meta, tables.reshape(-1), scales, qg, k_pool, v_pool)


def ragged_paged_attention(q, k_pool, v_pool, seq_ids, block_tables, context_lens, query_start_loc, *,
                           scale: float, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None,
                           config: KernelConfig | None = None, interpret: bool = False, metadata=None):
    """Attention of a ragged flat batch over paged pools. q [T, H, D] -> [T, H, D] (q's dtype).

    Pools are [KVH, num_blocks, block_size, D], bf16/fp32/fp16 or float8_e4m3fn with scalar
    `k_scale`/`v_scale` (dequantised value = stored * scale). Tokens past
    `query_start_loc[-1]` (padding) come out as zeros. Reads the pools, writes nothing."""
    t, h, d = q.shape
    kvh = k_pool.shape[0]
    s = block_tables.shape[0]
    group = h // kvh
    gp = _pow2(group)
    cfg, args, first_tile = kernel_inputs(q, k_pool, block_tables, context_lens, query_start_loc,
                                          k_scale=k_scale, v_scale=v_scale, config=config, metadata=metadata)
    bq, num_tiles = cfg.block_q, args[0].shape[0] // 4
    out = kernel_call(cfg, *args, k_pool, v_pool, group=group, scale=scale, sliding_window=sliding_window,
                      soft_cap=soft_cap, interpret=interpret)
    if cfg.splits > 1:
        out = combine_splits(*out, args[2][1])
    if _in_place(cfg):  # rows never written (padding tokens) hold garbage: masked here
        valid = jnp.arange(t) < query_start_loc[s]
        return jnp.where(valid[:, None, None], out[:t * h].reshape(t, h, d), 0).astype(q.dtype)

    return tiles_to_tokens(out, q, seq_ids, query_start_loc, first_tile, bq, gp)


def q_by_kv_head(q, kvh: int, block_q: int, gp: int):
    """q [T, H, D] as [KVH, (T + block_q) * Gp, D]: a tile's rows (token-major, then the group's
    heads padded to Gp) are contiguous; the tail pad of block_q tokens keeps tile reads in bounds."""
    t, h, d = q.shape
    group = h // kvh
    qg = q.reshape(t, kvh, group, d)
    qg = jnp.pad(qg, ((0, block_q), (0, 0), (0, gp - group), (0, 0)))
    return jnp.transpose(qg, (1, 0, 2, 3)).reshape(kvh, (t + block_q) * gp, d)


def tiles_to_tokens(out, q, seq_ids, query_start_loc, first_tile, block_q: int, gp: int):
    """Tile outputs [KVH, tiles, block_q * Gp, D] -> [T, H, D] in q's dtype; padding tokens are zeros.
    Token t of sequence s sits in tile first_tile[s] + i // block_q, rows (i % block_q) * Gp + g."""
    t, h, d = q.shape
    kvh, num_tiles = out.shape[:2]
    s = first_tile.shape[0]
    out = out.reshape(kvh, num_tiles, block_q, gp, d)[:, :, :, :h // kvh]
    seq = seq_ids.astype(jnp.int32)
    local = jnp.arange(t, dtype=jnp.int32) - query_start_loc[seq]
    valid = jnp.arange(t) < query_start_loc[s]
    local = jnp.where(valid, local, 0)
    tile_of = jnp.where(valid, first_tile[seq] + local // block_q, 0)
    res = out[:, tile_of, local % block_q]                             # [KVH, T, G, D]
    res = jnp.transpose(res, (1, 0, 2, 3)).reshape(t, h, d)
    return jnp.where(valid[:, None, None], res, 0).astype(q.dtype)


__all__ = ["KernelConfig", "choose_config", "ragged_paged_attention", "kernel_inputs", "kernel_call",
           "combine_splits", "tile_metadata", "q_by_kv_head", "tiles_to_tokens", "supported", "NEG"]
