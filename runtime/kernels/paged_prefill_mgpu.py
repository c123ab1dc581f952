"""Paged prefill attention for Hopper as a Mosaic GPU Pallas kernel (wgmma from shared memory,
TMA copies, one producer and two consumer warpgroups): the prefill-heavy case of
`ragged_paged_attention.py`, where the Triton-lowered kernel stops near half the tensor-core rate.

Work decomposition. A tile is 128 rows = `bq = 128 // Gp` new tokens of one sequence x the Gp
query heads of one KV head, so every K/V byte serves the whole group (GQA). One CUDA block per
(kv head, tile), tiles from the last (longest causal range first). By default (`direct_q`,
`direct_out`) q is read and the output written in place, as [T, H * D]: each sequence's tiles
start at its first token rounded down to a multiple of 8 (`aligned_tile_metadata`; rows outside
the sequence are computed and never written) and rows are head-major, row g * bq + t; a
warpgroup copies one [tokens, D] q slab per head and writes back only its valid rows::

    warpgroup 0   rows   0..63  (heads 0 .. Gp/2 - 1, all bq tokens; Gp = 1: tokens 0..63)   QK^T, softmax, PV
    warpgroup 1   rows  64..127 (heads Gp/2 .. Gp - 1; Gp = 1: tokens 64..127)              QK^T, softmax, PV
    warpgroup 2   producer: per key step, block_kv // page whole pages of K and of V, each
                  one TMA copy [page, D] gathered through the block table into a `stages`-deep
                  ring of shared-memory buffers; a buffer is refilled once both consumers
                  arrived on its "consumed" barrier.

The two consumers take turns on the tensor cores (a shared two-arrival barrier), so one's
softmax overlaps the other's matmuls. Keys fully below a warpgroup's first token skip the
causal mask. Positions are not read: a sequence's new tokens sit at
`context_len - q_len ... context_len - 1` (as `runtime/batch.py` lays them out). The other layout
(`direct_q=False`, also where T is not a multiple of 8) gathers q tile by tile beforehand
(`q_by_tile`, token-major rows t * Gp + g, every q TMA copy at a multiple of 128 rows) and the
output afterwards: two passes over q-sized arrays, whose removal made the op 18% faster at 2k
tokens on the H100 (BENCHMARKS.md).

Interpret mode (`interpret=True`, jax's Mosaic GPU CPU simulator) runs this same kernel except
QK^T and PV, which it takes as register dot products: the simulator has no `layout_cast`,
`run_state` or wgmma with a transposed or register operand (jax 0.10.2).

Scope: bf16/f16 q and pools of the same dtype, head dim 64 or 128, pages of a multiple of 8
tokens, no sliding window, soft-cap or fp8 (the Triton kernel covers those). Written for the
Mosaic GPU API of jax 0.11 (also present in 0.10); when `jax.experimental.pallas.mosaic_gpu`
is missing, `available()` is False and nothing else here is used.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # jax builds without Mosaic GPU still import this module
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jax build
    plgpu = None

ROWS = 64        # wgmma M of one consumer warpgroup
CONSUMERS = 2
TILE_ROWS = ROWS * CONSUMERS
NEG = -1e30      # masked logit: finite, so no inf - inf
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    block_kv: int = 128      # keys per step: whole pages (a multiple of the page) or a slice of one page
    stages: int = 2          # depth of the K/V shared-memory ring (128 x 2: the H100 sweep's best, BENCHMARKS.md)
    direct_q: bool = True    # q read by TMA straight from [T, H * D] (8-aligned tiles, head-major rows), no relayout
    direct_out: bool = True  # with direct_q: the output written by TMA straight into [T, H * D], valid rows only


def available() -> bool:
    return plgpu is not None and all(hasattr(plgpu, n) for n in ("kernel", "wgmma", "copy_gmem_to_smem", "ACC"))


def supported(*, q_dtype, kv_dtype, head_dim: int, block_size: int, group: int, sliding_window=None,
              soft_cap=None, block_kv: int = 128) -> bool:
    """Whether this kernel computes the case (the dispatcher falls back to the Triton kernel)."""
    half = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    gp = 1 << max(0, (group - 1).bit_length())
    return (available() and jnp.dtype(q_dtype) in half and jnp.dtype(kv_dtype) == jnp.dtype(q_dtype)
            and head_dim in (64, 128) and block_size % 8 == 0 and gp <= ROWS
            and (block_kv % block_size == 0 or block_size % block_kv == 0)
            and not sliding_window and not soft_cap)


def interpret_params():
    """Mosaic GPU interpret mode (a CPU simulation of warpgroups, barriers and TMA) where jax has it.
    TMA reads past the end of q (the last tile of `direct_q`) fill the simulator's NaNs, where the
    GPU fills zeros: either way only rows that are never read back."""
    from jax._src.pallas.mosaic_gpu.interpret import params

    return params.InterpretGPUParams(out_of_bounds_reads="uninitialized_value")


def _kernel(meta_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, scoped, *, gp: int, group: int, block_kv: int, page: int,
            width: int, num_tiles: int, stages: int, scale_log2: float, gpu: bool, direct: bool, direct_out: bool):
    (q_smem2, k_smem, v_smem, *o_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    head_dim = k_ref.shape[-1]
    num_blocks = k_ref.shape[1]
    dtype = q_ref.dtype
    kvh = lax.axis_index("head")
    tile = num_tiles - 1 - lax.axis_index("tile")
    wg = lax.axis_index("wg")
    if direct:  # (seq, tile start / 8, first and end valid row, position of row 0); rows g * bq + t
        seq, a8, lo, hi, pa = (meta_ref[5 * tile + i] for i in range(5))
        tile_steps = jnp.where(hi > lo, jnp.maximum((pa + hi + block_kv - 1) // block_kv, 0), 0)
    else:       # (seq, first token, tokens, position of the first); rows t * gp + g
        seq, _, nq, p0 = (meta_ref[4 * tile + i] for i in range(4))
        tile_steps = (p0 + nq + block_kv - 1) // block_kv    # key steps the tile needs (0 for an empty tile)
    tokens_per_wg = ROWS // gp

    def wgmma_layout(x, reduce: bool = False):  # register layouts; interpret mode has no layout_cast
        if not gpu:
            return x
        return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1) if reduce else plgpu.Layout.WGMMA)

    def iota(dim):
        if not gpu:
            return lax.broadcasted_iota(jnp.int32, (ROWS, block_kv), dim)
        return plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), dim, layout=plgpu.Layout.WGMMA)

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        if gpu:
            plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        if direct:  # this warpgroup: tokens [t0, t0 + wn) of the tile x heads_wg heads, one TMA copy per head
            bq = TILE_ROWS // gp
            wn = min(ROWS, bq)
            t0 = wg * ROWS if bq > ROWS else 0
            g0 = 0 if bq > ROWS else wg * (ROWS // wn)
            row0 = a8 * 8 + t0                                 # a visible multiple of 8 (TMA into tiled smem)
            for j in range(ROWS // wn):
                head = kvh * group + jnp.minimum(g0 + j, group - 1)   # padding heads repeat a real one
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, wn), pl.ds(head * head_dim, head_dim)],
                                        q_smem.at[pl.ds(j * wn, wn)], q_ready.at[wg])
            pos0 = pa + t0                                     # position of this warpgroup's row 0
            v_lo, v_hi = jnp.maximum(lo, t0), jnp.minimum(hi, t0 + wn)
            steps = jnp.where(v_hi > v_lo, jnp.maximum((pa + v_hi + block_kv - 1) // block_kv, 0), 0)
            full = jnp.clip((pa + v_lo + 1) // block_kv, 0, steps)   # below the first valid row: no mask
        else:
            plgpu.copy_gmem_to_smem(q_ref.at[kvh, pl.ds(tile * TILE_ROWS + wg * ROWS, ROWS)], q_smem, q_ready.at[wg])
            pos0 = p0 + wg * tokens_per_wg                        # position of this warpgroup's first token
            n_wg = jnp.clip(nq - wg * tokens_per_wg, 0, tokens_per_wg)
            steps = jnp.where(n_wg > 0, (pos0 + n_wg + block_kv - 1) // block_kv, 0)
            full = jnp.clip((pos0 + 1) // block_kv, 0, steps)    # steps below the first token: no mask
        plgpu.barrier_wait(q_ready.at[wg])

        m_i = wgmma_layout(jnp.full((ROWS,), NEG, jnp.float32), reduce=True)
        l_i = wgmma_layout(jnp.full((ROWS,), 0.0, jnp.float32), reduce=True)
        acc = wgmma_layout(jnp.full((ROWS, head_dim), 0.0, jnp.float32))

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(take_turn)

        def kv_step(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.array(stages, step.dtype))

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                take_turn()
                return acc_ref[...]

            if gpu:
                s = pl.run_scoped(qk_scope, plgpu.ACC((ROWS, block_kv), jnp.float32))
            else:  # interpret mode cannot read a transposed wgmma operand: the same product from registers
                s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
                take_turn()
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * scale_log2                                                    # logits in log2 units
            if masked and direct:  # row r is token pos0 + r % wn (head-major rows)
                s = jnp.where(iota(1) + (step * block_kv - pos0) <= lax.rem(iota(0), jnp.int32(wn)), s, NEG)
            elif masked:  # key k visible to row r iff k - pos0 <= r // gp  <=>  (k - pos0) * gp <= r
                s = jnp.where((iota(1) + (step * block_kv - pos0)) * gp <= iota(0), s, NEG)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(turn)               # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(turn)                 # the tensor cores are ours again

            def wait_next_k():
                nxt = step + 1

                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.array(stages, step.dtype))])

            if gpu:
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:  # interpret mode has neither run_state nor a register wgmma operand
                acc = acc + lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
                wait_next_k()
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        def drain(step, _):  # steps only the other warpgroup needs: pass the buffers on, keep turns paired
            slot = lax.rem(step, jnp.array(stages, step.dtype))
            plgpu.barrier_wait(k_ready.at[slot])  # every phase observed by both consumers: no stale parity
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()
            take_turn()

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, full, functools.partial(_flip, kv_step, False), carry)
        carry = lax.fori_loop(full, steps, functools.partial(_flip, kv_step, True), carry)
        lax.fori_loop(steps, tile_steps, drain, None)
        pl.when(wg == 0)(take_turn)

        acc, m_i, l_i = carry
        l_i = jnp.where(l_i == 0.0, 1.0, l_i)
        acc = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
        if direct_out:  # valid rows only (other tiles own the rest): power-of-two runs from an untiled buffer
            o_smem = o_smem2[0].at[wg]
            o_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            n = jnp.maximum(v_hi - v_lo, 0)
            off = v_lo - t0
            size = wn
            while size >= 1:
                @pl.when(n & size != 0)
                def _(size=size, off=off):
                    for j in range(ROWS // wn):
                        def put(j=j):
                            head = kvh * group + g0 + j
                            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(j * wn + off, size)],
                                                    o_ref.at[pl.ds(a8 * 8 + t0 + off, size),
                                                             pl.ds(head * head_dim, head_dim)])
                        if group == gp:
                            put()
                        else:  # padding heads are not written
                            pl.when(g0 + j < group)(put)
                off = off + jnp.where(n & size != 0, size, 0)
                size //= 2
        else:
            q_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[kvh, tile, pl.ds(wg * ROWS, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        if gpu:
            plgpu.set_max_registers(40, action="decrease")
        copies = max(1, block_kv // page)
        rows_per_copy = min(page, block_kv)

        def fetch(pool_ref, smem, ready, step, slot):
            for i in range(copies):
                if block_kv >= page:   # whole pages
                    entry = jnp.minimum(step * copies + i, width - 1)
                    blk, off = bt_ref[seq * width + entry], 0
                else:                  # a slice of one page (offset written as a visible multiple of block_kv)
                    per_page = page // block_kv
                    blk = bt_ref[seq * width + jnp.minimum(step // per_page, width - 1)]
                    off = (step % per_page) * block_kv
                blk = jnp.clip(blk, 0, num_blocks - 1)
                plgpu.copy_gmem_to_smem(pool_ref.at[kvh, blk, pl.ds(off, rows_per_copy)],
                                        smem.at[slot, pl.ds(i * rows_per_copy, rows_per_copy)], ready.at[slot])

        for i in range(stages):
            @pl.when(i < tile_steps)
            def _():
                fetch(k_ref, k_smem, k_ready, i, i)
                fetch(v_ref, v_smem, v_ready, i, i)

        @pl.loop(0, tile_steps - stages)
        def _(step):
            nxt = step + stages
            slot = lax.rem(step, jnp.array(stages, step.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            fetch(k_ref, k_smem, k_ready, nxt, slot)
            plgpu.barrier_wait(v_free.at[slot])
            fetch(v_ref, v_smem, v_ready, nxt, slot)

        @pl.loop(jnp.maximum(tile_steps - stages, 0), tile_steps)
        def _(step):  # the last buffers' release: every barrier phase is observed (interpret mode checks)
            slot = lax.rem(step, jnp.array(stages, step.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _flip(step_fn, masked, step, carry):
    return step_fn(step, carry, masked)


def paged_prefill(q, k_pool, v_pool, seq_ids, block_tables, context_lens, query_start_loc, *, scale: float,
                  config: MgpuConfig | None = None, interpret: bool = False, metadata=None):
    """Causal attention of a ragged flat batch over paged pools. q [T, H, D] -> [T, H, D] (q's dtype).
    Same contract as `ragged_paged_attention` for the cases `supported` accepts. `metadata`, where
    given, is (meta, first_tile) of the layout that runs: `aligned_tile_metadata` (with `tokens=T`
    under `direct_out`) for the in-place layout, `tile_metadata` for the other."""
    from kiln.runtime.kernels.ragged_paged_attention import tile_metadata, tiles_to_tokens

    config = config or MgpuConfig()
    t, h, d = q.shape
    kvh, nb, page, _ = k_pool.shape
    s, width = block_tables.shape
    group = h // kvh
    gp = 1 << max(0, (group - 1).bit_length())
    bq = TILE_ROWS // gp
    tables = block_tables.astype(jnp.int32).reshape(-1)
    if config.direct_q and t % 8 == 0 and bq >= 8:  # tiles then start at multiples of 8 (Gp <= 16)
        pad = t if config.direct_out else None  # the padding tokens get tiles of their own, written as zeros
        num_tiles = max(1, min(-(-t // bq) + 2 * s + (2 if pad else 0), t))
        meta, first_tile = metadata or aligned_tile_metadata(query_start_loc, context_lens, bq, num_tiles, pad)
        out = tile_call(meta, tables, q.reshape(t, h * d), k_pool, v_pool, width=width, group=group, scale=scale,
                        config=config, interpret=interpret)
        if config.direct_out:
            return out.reshape(t, h, d)
        return aligned_tiles_to_tokens(out, q, seq_ids, query_start_loc, first_tile, bq, gp)
    config = dataclasses.replace(config, direct_q=False)
    num_tiles = max(1, min(-(-t // bq) + s, t))
    meta, first_tile = metadata or tile_metadata(query_start_loc, context_lens, bq, num_tiles)
    out = tile_call(meta, tables, q_by_tile(q, meta, kvh, gp), k_pool, v_pool,
                    width=width, group=group, scale=scale, config=config, interpret=interpret)
    return tiles_to_tokens(out, q, seq_ids, query_start_loc, first_tile, bq, gp)


def aligned_tile_metadata(query_start_loc, context_lens, block_q: int, num_tiles: int, tokens: int | None = None):
    """Tiles for `direct_q`: each sequence's tiles start at its first token rounded down to a multiple
    of 8 and step by block_q, so every q TMA copy starts at a row offset known to be a multiple of 8
    (rows before the sequence's first token or past its last are computed and never read back).
    Per tile (seq, start // 8, first valid row, end of the valid rows, position of row 0 (may be
    negative)), flat int32 [num_tiles * 5]; tiles past the last real one have no valid rows.
    With `tokens` (T), the padding tokens `query_start_loc[S] .. T - 1` form one more sequence whose
    rows see no keys (written as zeros by `direct_out`). Also `first_tile[S]`::

        flat tokens   ... s0 | s1: 13 14 15 16 ... 52 | s2 ...        (block_q 32)
        s1's tiles        [8 .. 40)  rows 5..31 valid,  [40 .. 72)  rows 0..12 valid
    """
    qsl = query_start_loc.astype(jnp.int32)
    s = context_lens.shape[0]
    start, end = qsl[:s], qsl[1:s + 1]
    ctx = context_lens.astype(jnp.int32)
    if tokens is not None:  # positions of the padding "sequence" far below 0: no key steps
        start, end = jnp.append(start, qsl[s]), jnp.append(end, tokens)
        ctx = jnp.append(ctx, -(1 << 30) + tokens)
        s += 1
    qlen = end - start
    a0 = start // 8 * 8
    ntile = jnp.where(qlen > 0, (end - a0 + block_q - 1) // block_q, 0)
    ends = jnp.cumsum(ntile)
    first = ends - ntile
    j = jnp.arange(num_tiles, dtype=jnp.int32)
    method = "compare_all" if num_tiles * s <= (1 << 22) else "scan"
    seq = jnp.searchsorted(ends, j, side="right", method=method).astype(jnp.int32)
    valid = seq < s
    seq = jnp.minimum(seq, s - 1)
    a = a0[seq] + (j - first[seq]) * block_q
    lo = jnp.clip(start[seq] - a, 0, block_q)
    hi = jnp.clip(end[seq] - a, 0, block_q)
    pa = ctx[seq] - qlen[seq] + a - start[seq]
    z = jnp.zeros_like(j)
    seq = jnp.minimum(seq, context_lens.shape[0] - 1)  # the padding tiles read no block table
    meta = jnp.stack([jnp.where(valid, x, z) for x in (seq, a // 8, lo, hi, pa)], axis=1)
    return meta.reshape(-1), first[:context_lens.shape[0]]


def aligned_tiles_to_tokens(out, q, seq_ids, query_start_loc, first_tile, block_q: int, gp: int):
    """`direct_q` tile outputs [KVH, tiles, Gp * block_q, D] (row g * block_q + t) -> [T, H, D];
    padding tokens are zeros."""
    t, h, d = q.shape
    kvh, num_tiles = out.shape[:2]
    s = first_tile.shape[0]
    out = out.reshape(kvh, num_tiles, gp, block_q, d)
    seq = seq_ids.astype(jnp.int32)
    i = jnp.arange(t, dtype=jnp.int32)
    valid = i < query_start_loc[s]
    local = jnp.where(valid, i - query_start_loc[seq] // 8 * 8, 0)
    tile_of = jnp.where(valid, first_tile[seq] + local // block_q, 0)
    res = out[:, tile_of, :h // kvh, local % block_q]                  # [T, KVH, G, D]
    return jnp.where(valid[:, None, None], res.reshape(t, h, d), 0).astype(q.dtype)


def q_by_tile(q, meta, kvh: int, gp: int):
    """q [T, H, D] gathered tile by tile: [KVH, tiles * 128, D], row r of tile j = token
    tok0_j + r // Gp, head r % Gp of the kv head's group. Every tile then starts at a multiple of 128
    rows, which TMA copies of the swizzled q tile need (jax 0.11's layout inference rejects q
    copies at offsets it cannot prove to be multiples of 8)."""
    t, h, d = q.shape
    group = h // kvh
    tok0 = meta.reshape(-1, 4)[:, 1]
    rows = jnp.arange(TILE_ROWS, dtype=jnp.int32)
    tok = jnp.minimum(tok0[:, None] + rows // gp, t - 1)                     # [tiles, 128]
    qp = jnp.pad(q.reshape(t, kvh, group, d), ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    qt = qp[tok, :, rows % gp]                                               # [tiles, 128, KVH, D]
    return jnp.transpose(qt, (2, 0, 1, 3)).reshape(kvh, -1, d)


def tile_call(meta, tables, qg, k_pool, v_pool, *, width: int, group: int, scale: float,
              config: MgpuConfig = MgpuConfig(), interpret: bool = False):
    """The kernel alone: tile outputs [KVH, tiles, 128, D] in q's dtype (row r of a tile = token
    r // Gp, head r % Gp). `meta` from `tile_metadata` with block_q = 128 // Gp, `tables` flat
    [S * width], `qg` = `q_by_tile(q, meta, KVH, Gp)`. With `config.direct_q`: `meta` from
    `aligned_tile_metadata`, `qg` = q as [T, H * D] (T a multiple of 8), rows g * block_q + t."""
    kvh, nb, page, d = k_pool.shape
    gp = 1 << max(0, (group - 1).bit_length())
    direct = config.direct_q
    direct_out = direct and config.direct_out
    num_tiles = meta.shape[0] // (5 if direct else 4)
    q_copies = ROWS // min(ROWS, TILE_ROWS // gp) if direct else 1
    bkv, stages = config.block_kv, config.stages
    copies = max(1, bkv // page)
    dtype = qg.dtype
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    smem = lambda shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))  # noqa: E731
    body = functools.partial(_kernel, gp=gp, group=group, block_kv=bkv, page=page, width=width, num_tiles=num_tiles,
                             stages=stages, scale_log2=float(scale) * LOG2E, gpu=not interpret, direct=direct,
                             direct_out=direct_out)

    def entry(meta_ref, bt_ref, q_ref, k_ref, v_ref, o_ref):
        pl.run_scoped(
            lambda *scoped: body(meta_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, scoped),
            (smem((CONSUMERS, ROWS, d)), smem((stages, bkv, d)), smem((stages, bkv, d)),
             *([plgpu.SMEM((CONSUMERS, ROWS, d), dtype)] if direct_out else [])),
            (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
             plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
             plgpu.Barrier(num_arrivals=q_copies, num_barriers=CONSUMERS)),
            (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=CONSUMERS),
            collective_axes="wg",
        )

    kw = dict(interpret=interpret_params()) if interpret else {}
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(qg.shape if direct_out else (kvh, num_tiles, TILE_ROWS, d), dtype),
        grid=(kvh, num_tiles),
        grid_names=("head", "tile"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(meta, tables, qg, k_pool, v_pool)


__all__ = ["MgpuConfig", "available", "supported", "paged_prefill", "tile_call", "q_by_tile", "interpret_params",
           "aligned_tile_metadata", "aligned_tiles_to_tokens"]
