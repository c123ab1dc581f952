"""Fused dequantizing matmuls for small M (decode and small mixed batches): one Pallas kernel
(Triton backend on the GPU, `interpret=True` on the CPU) beside its plain-JAX reference.

    y[M, N] = x[M, K] @ dequant(W[K, N])

    int8_wo, fp8   W i8 / f8e4m3 [K, N] (or [N, K]: `w_layout="nk"`), scale f32 [N]   w = q * scale[n]
    int4_wo        W u8 [K/2, N] (row 2i low nibble, 2i+1 high), scale, min f16 [K/g, N]
                                                               w = q * scale[k//g, n] + min[k//g, n]

Work decomposition. Each program owns a [block_m, block_n] output tile and one of `splits`
slices of K, walking it in steps of `block_k` rows: it loads the weight tile once, converts
it to the activation dtype in registers (int4: unpacks the nibbles and applies the group's
scale and min), and accumulates `x_tile @ w_tile` in fp32; per-channel scales are applied
once after the loop. The activations of int4 go in as their even and odd K columns (one
packed byte row = one even and one odd weight row), so no nibble interleaving happens::

    grid (m tile, n tile, split)     m fastest: tiles that share weights run side by side
    split s covers K steps [s * steps, (s + 1) * steps)  -> fp32 partials, summed outside

With few tokens N / block_n programs leave most of the H100's 132 SMs idle, hence split-K.
int4 up to 64 tokens takes the tensor-core form at every M (M = 1 pads to 16 rows) with the
codes fed as 16-bit 128 + code, built from the packed bytes by inline PTX (PRMT + LOP3, about
one instruction per weight), the 128 * sum(x) removed per group (`or_codes`).
The multiply-and-sum form (`gemv`, M <= 4) on [N, K] weights instead takes narrow tiles (8-16
output channels, 1 KB of K per step: every program streams long contiguous rows) and, with
`defer_sum`, adds the products into a tile-shaped fp32 partial, reduced over K once at the end.

Implementations (`impl`): "xla" (the reference: XLA converts the weight inside the dot),
"pallas" (the kernel), "interpret" (the kernel in Pallas interpret mode, for CPU tests) and
"auto": the kernel on a GPU for 16-bit activations when the shape tiles and M is at most
`AUTO_MAX_M[mode]` (where the kernel measured faster), XLA elsewhere.
`KILN_QMATMUL=xla|pallas|interpret|auto` overrides "auto". Before the static rule, "auto"
consults the engine's autotune table (`set_tuned_table`, runtime/autotune.py); an explicit
impl or `KILN_QMATMUL` value other than "auto" overrides the table too.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from kiln.errors import ConfigError
from kiln.runtime.kernels import requested_impl

IMPLS = ("auto", "xla", "pallas", "interpret")
MODES = ("fp8", "int8_wo", "int4_wo")
NUM_CORES = 132  # H100 SXM
# "auto" runs the kernel up to this many tokens, per mode: where it beat XLA's path on the H100
# (BENCHMARKS.md, "Fused dequantizing matmuls", "Decode matmuls profiled"): int4 at every M
# measured (XLA dequantizes the whole weight first, 0.15 TB/s); int8 and fp8 never: on [N, K]
# weights the kernel is within +-5% of XLA's convert-in-dot (M = 1: -5% to +4% by run; M = 16:
# +3%), below the run-to-run spread, so the build's autotune table decides per shape instead. fp8 runs
# the kernel at the 16-token bucket of batch-1 decode all the same: as fast, and XLA's Triton GEMM
# autotuning of its convert-in-dot fusions made the fp8 batch-1 engine's compile take over 300 s
AUTO_MAX_M = {"int4_wo": 256, "int8_wo": 0, "fp8": 16}


# --------------------------------------------------------------------------- reference


def unpack_int4(w, dtype):
    """u8[K/2, ...] (row 2i in the low nibble, 2i+1 in the high) -> dtype[K, ...], codes 0..15."""
    lo = w & 0xF
    hi = w >> 4
    return jnp.stack([lo, hi], axis=1).reshape((2 * w.shape[0],) + w.shape[1:]).astype(dtype)


def quant_matmul_reference(x, w, scale, minimum=None, *, mode: str, group_size: int | None = None,
                           w_layout: str = "kn"):
    """The XLA path: x [M, K] @ dequant(w) -> [M, N] in x's dtype. int8/fp8 convert the weight
    inside the dot and scale the product; int4 dequantizes the whole weight first."""
    k, n = x.shape[-1], scale.shape[-1]
    if mode in ("fp8", "int8_wo"):
        wt = w.astype(x.dtype)
        return jnp.matmul(x, wt.T if w_layout == "nk" else wt) * scale.reshape(1, n).astype(x.dtype)
    g = group_size
    wd = unpack_int4(w, x.dtype).reshape(k // g, g, n)
    wd = (wd * scale.reshape(k // g, 1, n).astype(x.dtype) + minimum.reshape(k // g, 1, n).astype(x.dtype))
    return jnp.matmul(x, wd.reshape(k, n))


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class QMatmulConfig:
    block_m: int      # token rows per tile (>= 16: the tensor-core matmul's smallest M)
    block_n: int      # output channels per tile
    block_k: int      # weight rows (unpacked) per inner step; int4: a multiple of the group
    splits: int = 1   # slices of K per tile (split-K), fp32 partials summed outside
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False        # no tensor cores: multiply-and-sum per row (block_m <= 4 rows)
    post_scale: bool = False  # int4: dot the raw codes, apply scale and min to each group's product
    magic: bool = False       # int8/int4 codes to fp32 by integer ops (2^23 trick), not the I2F unit
    defer_sum: bool = False   # gemv: keep a weight-tile-shaped fp32 partial per row, reduce over K once at the end
    or_codes: bool = False    # int4 tensor-core form, 16-bit activations: codes enter the dot as C + code, built by
                              # OR-ing them into the mantissa of C (128 bf16, 1024 f16); C * sum(x) removed per group
    f16_dot: bool = False     # tensor-core form (8-bit): weights and activations to f16 for the dot (fp8 -> f16
                              # is one conversion instruction; bf16 needs more), fp32 accumulation as before


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fit(want: int, dim: int, floor: int) -> int | None:
    """The largest power of two <= want (and >= floor) that divides dim."""
    b = _pow2(want) if _pow2(want) == want else _pow2(want) // 2
    while b >= floor and dim % b:
        b //= 2
    return b if b >= floor else None


# Defaults per (weight kind, M bucket), the best variant of the H100 sweep on the 32-layer
# Llama-3-8B projection stack (BENCHMARKS.md, "Fused dequantizing matmuls"); split-K is derived
# from the grid. "8bit" is int8 or fp8 with [K, N] weights, "8bit_nk" with [N, K].
_GEMV = dict(gemv=True, block_n=128, block_k=128, num_warps=4, num_stages=4)
TUNED = {
    ("8bit", 4): dict(_GEMV, block_n=256, block_k=64, num_warps=8, num_stages=3),
    ("8bit", 16): dict(block_n=128, block_k=128, num_warps=4, num_stages=4),
    ("8bit", 64): dict(block_n=64, block_k=256, num_warps=4, num_stages=4),
    ("8bit", 256): dict(block_n=128, block_k=128, num_warps=8, num_stages=3, block_m=64),
    # [N, K] (the fp8 pipeline's layout), sweeps 1-3 of 2026-11-24 (BENCHMARKS.md, "Decode matmuls
    # profiled"): M = 1 narrow 8-channel tiles over 1 KB of K, summed once; M = 16 split-K tensor-core tiles
    ("8bit_nk", 4): dict(_GEMV, block_n=8, block_k=1024, num_warps=4, num_stages=3, splits=1, defer_sum=True),
    ("8bit_nk", 16): dict(block_n=32, block_k=256, num_warps=4, num_stages=4),
    ("8bit_nk", 64): dict(block_n=64, block_k=128, num_warps=4, num_stages=4),
    # int4 up to 64 tokens (session 7, BENCHMARKS.md "int4 codes by inline PTX"): the tensor-core form fed
    # 128 + code from PRMT + LOP3, one group per step: M = 1 3.46 -> 2.99 ms, 16: 3.96 -> 3.08, 64: 8.27 -> 7.31
    ("int4", 4): dict(or_codes=True, block_n=128, block_k=128, num_warps=4, num_stages=4),
    ("int4", 16): dict(or_codes=True, block_n=128, block_k=128, num_warps=4, num_stages=4),
    ("int4", 64): dict(or_codes=True, block_n=128, block_k=128, num_warps=4, num_stages=4),
    ("int4", 256): dict(block_n=128, block_k=128, num_warps=8, num_stages=3),
}


def _bucket(m: int) -> int:
    return 4 if m <= 4 else 16 if m <= 16 else 64 if m <= 64 else 256


def auto_splits(tiles: int, steps: int, num_cores: int = NUM_CORES) -> int:
    """Split-K for a grid of `tiles` output tiles of `steps` K steps each: doubles while the grid
    would fill the GPU less than twice and every split keeps at least four K steps."""
    splits = 1
    while tiles * splits < 2 * num_cores and steps % (2 * splits) == 0 and steps // (2 * splits) >= 4:
        splits *= 2
    return splits


def choose_config(m: int, k: int, n: int, mode: str, group_size: int | None = None, *, w_layout: str = "kn",
                  num_cores: int = NUM_CORES, **override) -> QMatmulConfig | None:
    """Static tile choice from static shapes (None when the shape does not tile). Split-K
    doubles while the grid would fill the GPU less than twice and every split keeps at
    least four K steps. `override` replaces fields of the tuned default."""
    kind = "int4" if mode == "int4_wo" else "8bit"
    b = _bucket(m)
    o = {**TUNED.get((kind + "_" + w_layout, b), TUNED.get((kind, b), TUNED[(kind, 16)])), **override}
    gemv = o.get("gemv", False) and m <= 4
    bm = _pow2(m) if gemv else o.get("block_m") or min(max(16, _pow2(m)), 64 if m <= 64 else 128)
    # the multiply-and-sum form has no tensor-core minimum: [N, K] rows as narrow as 8 channels
    # (a narrow gemv tile asked for at M > 4 widens to the tensor-core form's 16 channels)
    floor_n = 8 if gemv and w_layout == "nk" and kind == "8bit" else 16
    bn = _fit(max(o["block_n"], floor_n), n, floor_n)
    floor = max(group_size or 16, 16) if kind == "int4" else 16
    # defer_sum keeps a [bn, bk] fp32 partial per row in registers: fewer K per step for more rows
    want_k = o["block_k"] // _pow2(m) if gemv and o.get("defer_sum") else o["block_k"]
    bk = _fit(max(want_k, floor), k, floor)
    if bn is None or bk is None or (kind == "int4" and (k % group_size or bk % group_size or group_size < 32)):
        return None
    steps = k // bk
    splits = o.get("splits")
    if splits is None:
        splits = auto_splits(-(-m // bm) * (n // bn), steps, num_cores)
    if steps % splits:
        return None
    return QMatmulConfig(bm, bn, bk, splits, o["num_warps"], o["num_stages"], gemv,
                         o.get("post_scale", False) and kind == "int4", o.get("magic", False) and mode != "fp8",
                         defer_sum=o.get("defer_sum", False) and gemv,
                         or_codes=o.get("or_codes", False) and kind == "int4" and (not gemv or o.get("defer_sum", False)),
                         f16_dot=o.get("f16_dot", False) and not gemv and kind == "8bit")


# --------------------------------------------------------------------------- the kernel


def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params across jax versions (`CompilerParams` was `TritonCompilerParams`)."""
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is not None:
        return cls(num_warps=num_warps, num_stages=num_stages)
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))


def _dot(a, b, exact: bool, nk: bool = False):
    return lax.dot_general(a, b, (((1,), (1 if nk else 0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if exact else None)


def _codes_f32(q, magic: bool, offset: int = 0):
    """Integer codes (int8, or uint8 0..255) -> exact fp32. `magic`: OR the code (shifted to
    0..255) into the mantissa of 2^23 and subtract, integer and FMA-pipe ops only."""
    if not magic:
        return q.astype(jnp.float32)
    i = q.astype(jnp.int32) + offset
    return lax.bitcast_convert_type(i | 0x4B000000, jnp.float32) - (8388608.0 + offset)


def _to_f32(w, magic: bool):
    return _codes_f32(w, magic, 128) if w.dtype == jnp.int8 else w.astype(jnp.float32)


def _kernel_8bit(x_ref, w_ref, s_ref, o_ref, *, block_k: int, steps: int, exact: bool, nk: bool, magic: bool,
                 f16_dot: bool = False):
    from jax.experimental import pallas as pl

    split = pl.program_id(2)
    bm, bn = o_ref.shape[-2:]

    def body(i, acc):
        k0 = pl.multiple_of((split * steps + i) * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]                                   # [bm, bk]
        w = w_ref[:, pl.ds(k0, block_k)] if nk else w_ref[pl.ds(k0, block_k), :]
        w = _to_f32(w, magic) if magic else w
        if f16_dot and not exact:
            x = x.astype(jnp.float16)
        return acc + _dot(x, w.astype(x.dtype), exact, nk)                 # [bk, bn] / [bn, bk] in registers

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _kernel_8bit_gemv(x_ref, w_ref, s_ref, o_ref, *, block_k: int, steps: int, exact: bool, nk: bool,
                      magic: bool, defer_sum: bool = False):
    """block_m (<= 4) rows, each a multiply-and-sum over the weight tile on the CUDA cores.
    `defer_sum`: the products accumulate elementwise in a weight-tile-shaped fp32 partial per
    row, summed over K once after the loop (no cross-thread reduction inside the loop)."""
    from jax.experimental import pallas as pl

    split = pl.program_id(2)
    bm, bn = o_ref.shape[-2:]
    if defer_sum:
        tile = (bn, block_k) if nk else (block_k, bn)

        def body2(i, accs):
            k0 = pl.multiple_of((split * steps + i) * block_k, block_k)
            w = _to_f32(w_ref[:, pl.ds(k0, block_k)] if nk else w_ref[pl.ds(k0, block_k), :], magic)
            xs = [x_ref[r, pl.ds(k0, block_k)].astype(jnp.float32) for r in range(bm)]
            return tuple(a + (x[None, :] if nk else x[:, None]) * w for a, x in zip(accs, xs))

        accs = lax.fori_loop(0, steps, body2, tuple(jnp.zeros(tile, jnp.float32) for _ in range(bm)))
        s = s_ref[0, :].astype(jnp.float32)
        for r, a in enumerate(accs):
            o_ref[r, :] = (jnp.sum(a, axis=1 if nk else 0) * s).astype(o_ref.dtype)
        return

    def body(i, accs):
        k0 = pl.multiple_of((split * steps + i) * block_k, block_k)
        if nk:
            w = _to_f32(w_ref[:, pl.ds(k0, block_k)], magic)              # [bn, bk]
            return tuple(a + jnp.sum(x_ref[r, pl.ds(k0, block_k)].astype(jnp.float32)[None, :] * w, axis=1)
                         for r, a in enumerate(accs))
        w = _to_f32(w_ref[pl.ds(k0, block_k), :], magic)                  # [bk, bn]
        return tuple(a + jnp.sum(x_ref[r, pl.ds(k0, block_k)].astype(jnp.float32)[:, None] * w, axis=0)
                     for r, a in enumerate(accs))

    accs = lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm)))
    s = s_ref[0, :].astype(jnp.float32)
    for r, a in enumerate(accs):
        o_ref[r, :] = (a * s).astype(o_ref.dtype)


def _codes_16(q, dtype):
    """u8 codes 0..15 -> dtype (bf16 / f16) values C + code, integer ops only: the code OR-ed into
    the mantissa of C = 128 (bf16, 7 mantissa bits) or 1024 (f16, 10), where one unit is 1."""
    magic = 0x4300 if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else 0x6400
    return lax.bitcast_convert_type(q.astype(jnp.uint16) | magic, dtype)


# One nibble of four packed bytes to 16-bit C + code (the GPU form of `_codes_16` on `q & 0xF`,
# or on `q >> 4` after the leading shift): PRMT spreads bytes 0, 1 (2, 3) into the low bytes of
# two 16-bit halves, LOP3 keeps a nibble per half and ORs in C's bits. $0 $1 the four results,
# $2 the four bytes. (One asm per nibble: jax lowers an inline asm with one result only.)
_NIBBLE_ASM = """{{
.reg .b32 a, t0, t1;
{shift}
prmt.b32 t0, a, 0, 0x4140;
prmt.b32 t1, a, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, {c}, 0xEA;
lop3.b32 $1, t1, 0x000F000F, {c}, 0xEA;
}}"""


def _nibbles_16(q, dtype, asm: bool):
    """u8 [...] packed codes -> (C + low nibble, C + high nibble) in dtype (bf16 / f16); `asm`: the
    PTX above (Triton backend only), else the same values by `_codes_16` (interpret mode)."""
    if not asm:
        return _codes_16(q & 0xF, dtype), _codes_16(q >> 4, dtype)
    from jax.experimental.pallas import triton as plgpu

    c = "0x43004300" if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else "0x64006400"
    out = [jax.ShapeDtypeStruct(q.shape, dtype)]
    return tuple(plgpu.elementwise_inline_asm(_NIBBLE_ASM.format(c=c, shift=shift), args=[q], constraints="=r,=r,r",
                                              pack=4, result_shape_dtypes=out)[0]
                 for shift in ("mov.b32 a, $2;", "shr.u32 a, $2, 4;"))


def _kernel_int4(xe_ref, xo_ref, w_ref, s_ref, m_ref, *refs, block_k: int, steps: int, group: int,
                 exact: bool, gemv: bool, post_scale: bool, magic: bool, defer_sum: bool = False,
                 or_codes: bool = False, asm: bool = False):
    """Per group: dequantize in registers and dot (default); or dot the raw codes and apply the
    group's scale and min to the [bm, bn] product (`post_scale`: x @ (q s + m) = (x @ q) s +
    sum(x) m; `or_codes`: the codes as C + q in 16 bits, so x @ (C + q) = x @ q + C sum(x)); or,
    `gemv`, multiply-and-sum each row on the CUDA cores (`defer_sum`: into a [g/2, bn] fp32 partial
    per row and per nibble, summed over K once after the loop; with `or_codes` too, the 16-bit
    C + q codes widened and dequantized by one FMA against the bias m - C s). In the tensor-core
    form with `post_scale` or `or_codes` the first of `refs` holds sum(x) per row and group,
    [bm, K/g] fp32 (summed outside the kernel); the last is the output. `asm`: the nibbles of
    `or_codes` by inline PTX (the GPU)."""
    from jax.experimental import pallas as pl

    xs_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    split = pl.program_id(2)
    bm, bn = o_ref.shape[-2:]
    half, per_step = group // 2, block_k // group                         # packed rows per group
    or_codes = or_codes and not exact and (not gemv or defer_sum)
    c = 128.0 if jnp.dtype(xe_ref.dtype) == jnp.dtype(jnp.bfloat16) else 1024.0     # or_codes' offset

    def group_rows(gi):
        p0 = pl.multiple_of(gi * half, half)
        q = w_ref[pl.ds(p0, half), :]                                      # u8 [g/2, bn]
        s = s_ref[pl.ds(gi, 1), :].astype(jnp.float32)                     # [1, bn]
        mn = m_ref[pl.ds(gi, 1), :].astype(jnp.float32)
        if or_codes:                                                       # 16-bit C + code of rows 2i, 2i + 1
            return (p0, *_nibbles_16(q, xe_ref.dtype, asm), s, mn)
        if magic:
            q = q.astype(jnp.int32)
        # fp32 codes of rows 2i, 2i + 1
        return p0, _codes_f32(q & 0xF, magic), _codes_f32(q >> 4, magic), s, mn

    def body(i, acc):
        step = split * steps + i
        for j in range(per_step):                                          # one dot pair per group
            gi = step * per_step + j
            p0, lo, hi, s, mn = group_rows(gi)
            if gemv and defer_sum:
                if or_codes:   # (c + q) s + (m - c s): one FMA per weight, the offset folded into the bias
                    bias = mn - c * s
                    wlo, whi = lo.astype(jnp.float32) * s + bias, hi.astype(jnp.float32) * s + bias
                else:
                    wlo, whi = lo * s + mn, hi * s + mn                    # [g/2, bn] dequantized, fp32
                acc = tuple(a + xe_ref[r, pl.ds(p0, half)].astype(jnp.float32)[:, None] * wlo
                            + xo_ref[r, pl.ds(p0, half)].astype(jnp.float32)[:, None] * whi
                            for r, a in enumerate(acc))
                continue
            if gemv:
                new = []
                for r in range(bm):
                    xe = xe_ref[r, pl.ds(p0, half)].astype(jnp.float32)[:, None]   # [g/2, 1]
                    xo = xo_ref[r, pl.ds(p0, half)].astype(jnp.float32)[:, None]
                    dq = jnp.sum(xe * lo + xo * hi, axis=0)
                    new.append(acc[r] + dq * s[0] + (jnp.sum(xe) + jnp.sum(xo)) * mn[0])
                acc = tuple(new)
                continue
            xe = xe_ref[:, pl.ds(p0, half)]                                # [bm, g/2] rows 2i
            xo = xo_ref[:, pl.ds(p0, half)]                                # rows 2i + 1
            if post_scale or or_codes:
                lo, hi = (lo, hi) if or_codes else (lo.astype(xe.dtype), hi.astype(xe.dtype))
                prod = _dot(xe, lo, exact) + _dot(xo, hi, exact)
                xsum = xs_ref[:, pl.ds(gi, 1)]                                # [bm, 1]
                acc = acc + prod * s + xsum * (mn - (c if or_codes else 0.0) * s)
            else:
                lo = (lo * s + mn).astype(xe.dtype)
                hi = (hi * s + mn).astype(xe.dtype)
                acc = acc + _dot(xe, lo, exact) + _dot(xo, hi, exact)
        return acc

    if gemv:
        shape = (half, bn) if defer_sum else (bn,)
        accs = lax.fori_loop(0, steps, body, tuple(jnp.zeros(shape, jnp.float32) for _ in range(bm)))
        for r, a in enumerate(accs):
            o_ref[r, :] = (jnp.sum(a, axis=0) if defer_sum else a).astype(o_ref.dtype)
        return
    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def quant_matmul_pallas(x, w, scale, minimum=None, *, mode: str, group_size: int | None = None,
                        config: QMatmulConfig | None = None, interpret: bool = False, w_layout: str = "kn"):
    """The kernel: x [M, K] @ dequant(w) -> [M, N] in x's dtype (shapes as in the module doc)."""
    from jax.experimental import pallas as pl

    m, k = x.shape
    n = scale.shape[-1]
    nk = w_layout == "nk"
    if nk and mode == "int4_wo":
        raise ConfigError("the int4 kernel reads [K/2, N] weights only")
    cfg = config or choose_config(m, k, n, mode, group_size, w_layout=w_layout)
    if cfg is None:
        raise ConfigError(f"the quantized matmul kernel does not tile {mode} [{m}, {k}] x [{k}, {n}]"
                          f" (group {group_size}); use KILN_QMATMUL=xla")
    bm, bn, bk, sp = cfg.block_m, cfg.block_n, cfg.block_k, cfg.splits
    mp = -(-m // bm) * bm
    steps = k // bk // sp
    grid = (mp // bm, n // bn, sp)
    exact = jnp.dtype(x.dtype) == jnp.float32
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    if mode == "int4_wo":
        xe, xo = xp[:, 0::2], xp[:, 1::2]                                  # [Mp, K/2] each
        ng = k // group_size
        kernel = functools.partial(_kernel_int4, block_k=bk, steps=steps, group=group_size, exact=exact,
                                   gemv=cfg.gemv, post_scale=cfg.post_scale, magic=cfg.magic,
                                   defer_sum=cfg.defer_sum, or_codes=cfg.or_codes, asm=not interpret)
        args = (xe, xo, w, scale.reshape(ng, n), minimum.reshape(ng, n))
        in_specs = [pl.BlockSpec((bm, k // 2), lambda i, j, s: (i, 0))] * 2 + [
            pl.BlockSpec((k // 2, bn), lambda i, j, s: (0, j)),
            pl.BlockSpec((ng, bn), lambda i, j, s: (0, j)),
            pl.BlockSpec((ng, bn), lambda i, j, s: (0, j))]
        if (cfg.post_scale or cfg.or_codes) and not cfg.gemv:               # sum(x) per row and group
            args += (xp.astype(jnp.float32).reshape(mp, ng, group_size).sum(-1),)
            in_specs.append(pl.BlockSpec((bm, ng), lambda i, j, s: (i, 0)))
    else:
        kernel = (functools.partial(_kernel_8bit_gemv, defer_sum=cfg.defer_sum) if cfg.gemv
                  else functools.partial(_kernel_8bit, f16_dot=cfg.f16_dot))
        kernel = functools.partial(kernel, block_k=bk, steps=steps, exact=exact, nk=nk, magic=cfg.magic)
        args = (xp, w, scale.reshape(1, n))
        in_specs = [pl.BlockSpec((bm, k), lambda i, j, s: (i, 0)),
                    pl.BlockSpec((bn, k), lambda i, j, s: (j, 0)) if nk
                    else pl.BlockSpec((k, bn), lambda i, j, s: (0, j)),
                    pl.BlockSpec((1, bn), lambda i, j, s: (0, j))]
    if sp == 1:
        out_shape = jax.ShapeDtypeStruct((mp, n), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((sp, mp, n), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=None if interpret else _compiler_params(cfg.num_warps, cfg.num_stages),
        name=(f"kiln_qmatmul_{mode}{'_nk' * nk}_m{bm}_n{bn}_k{bk}_s{sp}"
              f"{'_gemv' * cfg.gemv}{'_post' * cfg.post_scale}{'_magic' * cfg.magic}{'_defer' * cfg.defer_sum}"
              f"{'_f16' * cfg.f16_dot}{'_or' * cfg.or_codes}"),
    )(*args)
    if sp > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out[:m]


# --------------------------------------------------------------------------- dispatch

# The build's autotune table (runtime/autotune.py), set process-wide by `LLM(ENGINE_DIR)` before
# any step is traced: (mode, K, N, group, w_layout, M, dtype) -> ("xla" | "pallas" | "interpret",
# QMatmulConfig or None). "auto" consults it first; shapes it does not hold keep the static rule.
_TUNED_TABLE: dict[tuple, tuple[str, QMatmulConfig | None]] = {}


def set_tuned_table(table: dict[tuple, tuple[str, QMatmulConfig | None]] | None) -> None:
    """Replace the process-wide autotune table (None or {}: the static rule everywhere). Steps
    traced afterwards see it; executables already compiled keep the choice they were traced with."""
    _TUNED_TABLE.clear()
    _TUNED_TABLE.update(table or {})


def tuned_choice(m: int, k: int, n: int, mode: str, group_size: int | None, w_layout: str, dtype
                 ) -> tuple[str, QMatmulConfig | None] | None:
    """The table's (impl, config) for this exact shape, or None when it holds none."""
    return _TUNED_TABLE.get((mode, k, n, group_size, w_layout, m, jnp.dtype(dtype).name))


def resolve_impl(impl: str, m: int, k: int, n: int, mode: str, group_size: int | None, dtype,
                 w_layout: str = "kn") -> str:
    """The implementation that runs: "auto" (or `KILN_QMATMUL`) is the kernel on a GPU for
    16-bit activations with M <= AUTO_MAX_M[mode] where the shape tiles, XLA elsewhere; an explicit
    "pallas"/"interpret" is checked, never changed."""
    impl = requested_impl(impl, IMPLS, "KILN_QMATMUL", "quantized matmul")
    tiles = choose_config(m, k, n, mode, group_size, w_layout=w_layout) is not None
    if impl == "auto":
        ok = (jax.default_backend() == "gpu" and m <= AUTO_MAX_M[mode] and tiles
              and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))
        return "pallas" if ok else "xla"
    if impl in ("pallas", "interpret") and not tiles:
        raise ConfigError(f"the quantized matmul kernel does not tile {mode} [{m}, {k}] x [{k}, {n}] "
                          f"(needs K, N multiples of 16, int4 groups >= 32); use KILN_QMATMUL=xla")
    return impl


def quant_matmul(x, w, scale, minimum=None, *, mode: str, group_size: int | None = None, impl: str = "auto",
                 config: QMatmulConfig | None = None, w_layout: str = "kn"):
    """x [M, K] @ dequant(w) -> [M, N] in x's dtype, by `impl` (see IMPLS). w is [K, N] (int4:
    [K/2, N] packed) or, int8/fp8 with `w_layout="nk"`, [N, K]."""
    if mode not in MODES:
        raise ConfigError(f"quantized matmul mode must be one of {MODES}, got {mode!r}")
    m, k = x.shape
    n = scale.shape[-1]
    explicit = impl != "auto" or os.environ.get("KILN_QMATMUL", "auto") != "auto"
    tuned = None if explicit or config is not None else tuned_choice(m, k, n, mode, group_size, w_layout, x.dtype)
    if tuned is not None and (tuned[0] != "pallas" or jax.default_backend() == "gpu"):
        impl, config = tuned
    impl = resolve_impl(impl, m, k, n, mode, group_size, x.dtype, w_layout)
    if impl == "xla":
        return quant_matmul_reference(x, w, scale, minimum, mode=mode, group_size=group_size, w_layout=w_layout)
    return quant_matmul_pallas(x, w, scale, minimum, mode=mode, group_size=group_size, config=config,
                               interpret=impl == "interpret", w_layout=w_layout)


__all__ = ["QMatmulConfig", "choose_config", "quant_matmul", "quant_matmul_pallas", "quant_matmul_reference",
           "resolve_impl", "set_tuned_table", "tuned_choice", "unpack_int4", "IMPLS", "AUTO_MAX_M"]
