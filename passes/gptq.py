"""GPTQ: round a weight one input row at a time and push each row's rounding error onto the
rows not yet rounded, weighted by the calibration inputs' second moment H = X^T X, so that
the layer's output x W (not the weight itself) stays close (Frantar et al., 2022).

    for i in input rows (blocks of 128, updates to later blocks applied lazily):
        q_i   = grid(W[i])                           fp8: e4m3 x per-output-channel scale
                                                     int4: the group's asymmetric 16 levels, the
                                                     group's scale/min taken from the rows as they
                                                     stand when the group starts
        e_i   = (W[i] - q_i) / U[i, i]               U: upper Cholesky factor of H^-1
        W[j] -= U[i, j] e_i   for j > i

Host numpy, fp32, on a weight [in, *out] (outputs flattened). `input_moments` collects the
H of every matmul input from calibration prompts in one compiled step per prompt.
"""

from __future__ import annotations

import numpy as np

from kiln.passes.ops import FP8_MAX

BLOCK = 32    # rows per lazy update (small: the per-row update in Python touches block x out)
DAMP = 0.1    # dampening: H + DAMP * mean(diag H) * I (0.01, the paper's, fits the calibration text closer but transfers worse)


def _e4m3(x: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with U^T U = (H + damp)^-1."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    from scipy.linalg import solve_triangular   # a jax dependency

    inv = solve_triangular(np.linalg.cholesky(h), np.eye(len(h)), lower=True)
    hinv = inv.T @ inv
    return np.linalg.cholesky(hinv).T.astype(np.float32)


class Fp8Grid:
    """e4m3 codes with a fixed per-output-channel scale (amax / 448 of the float weight)."""

    def __init__(self, w: np.ndarray):
        self.scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / FP8_MAX

    def start_group(self, rows: np.ndarray):
        pass

    def __call__(self, row: np.ndarray) -> np.ndarray:
        return _e4m3(np.clip(row / self.scale, -FP8_MAX, FP8_MAX)) * self.scale


class Int4Grid:
    """Asymmetric 16 levels per `group` input rows and output channel (f16 scale and min,
    as passes/quantize.py stores them); the range of each group is chosen when it starts: its
    min and max, or with `clip` the shrunk range [lo, hi] * f (f in 1, 0.95, .., 0.7 around the
    midpoint) that rounds the group's rows with the least squared error (per output channel)."""

    SHRINK = tuple(1.0 - 0.05 * i for i in range(7))

    def __init__(self, w: np.ndarray, group: int, clip: bool = False):
        self.group, self.clip = group, clip
        self.scales, self.mins = [], []

    @staticmethod
    def _params(lo, hi):
        scale = (np.maximum(hi - lo, 1e-8) / 15.0).astype(np.float16).astype(np.float32)
        return scale, lo.astype(np.float16).astype(np.float32)

    def start_group(self, rows: np.ndarray):
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        self.scale, self.lo = self._params(lo, hi)
        if self.clip:
            best = np.square(self._round(rows) - rows).sum(axis=0)
            mid = (lo + hi) / 2
            for f in self.SHRINK[1:]:
                scale, lo_f = self._params(mid - (mid - lo) * f, mid + (hi - mid) * f)
                err = np.square(np.clip(np.round((rows - lo_f) / scale), 0, 15) * scale + lo_f - rows).sum(axis=0)
                better = err < best
                best = np.where(better, err, best)
                self.scale, self.lo = np.where(better, scale, self.scale), np.where(better, lo_f, self.lo)
        self.scales.append(self.scale)
        self.mins.append(self.lo)

    def _round(self, row):
        return np.clip(np.round((row - self.lo) / self.scale), 0, 15) * self.scale + self.lo

    def __call__(self, row: np.ndarray) -> np.ndarray:
        return self._round(row)


def gptq(w: np.ndarray, h: np.ndarray, grid, *, group: int | None = None, block: int = BLOCK,
         damp: float = DAMP, act_order: bool = True) -> np.ndarray:
    """The weight [in, out] rounded onto `grid` row by row with GPTQ's error feedback; returns
    the rounded (float) weight. `group`: `grid.start_group` is called every `group` rows.
    `act_order` (no groups): rows in order of decreasing input energy diag(H), so the rows that
    matter most are rounded first and the rest absorb their error."""
    if act_order and not group:
        perm = np.argsort(-np.diag(h), kind="stable")
        q = gptq(np.asarray(w)[perm], h[perm][:, perm], grid, block=block, damp=damp, act_order=False)
        out = np.empty_like(q)
        out[perm] = q
        return out
    w = np.array(w, np.float32)
    n = w.shape[0]
    w[np.diag(h) <= 0] = 0.0
    u = _inverse_cholesky(h, damp)
    if group and group % block and block % group:
        block = group                          # a group starts a block or lies inside one
    q = np.zeros_like(w)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[b0:b1].copy()
        errs = np.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            r = b0 + i
            if group and r % group == 0:
                # the group's rows as they stand now (at a block start, the rows past the block
                # hold every earlier block's update already)
                grid.start_group(wb[i:i + group] if i + group <= len(wb) else w[r:r + group])
            qi = grid(wb[i])
            q[r] = qi
            e = (wb[i] - qi) / ub[i, i]
            wb[i + 1:] -= np.outer(ub[i, i + 1:], e)
            errs[i] = e
        w[b1:] -= u[b0:b1, b1:].T @ errs
    return q


def input_moments(graph, params, prompts, names, *, block_size: int = 16) -> dict[str, np.ndarray]:
    """H = sum over the real tokens of x^T x (fp32 host [in, in]) for each value in `names`,
    over the calibration `prompts` (token-id lists), one prefill step per prompt (all padded to
    the longest, so the step compiles once)."""
    import jax
    import jax.numpy as jnp

    from kiln.graph.lower import lower
    from kiln.runtime.batch import SeqChunk, prepare_inputs

    g = graph.copy()
    g.outputs = list(names)
    length = max(len(p) for p in prompts)
    nb = -(-length // block_size)
    step = lower(g)

    @jax.jit
    def moments(params, kv, inputs, n):
        vals, _ = step(params, kv, inputs)
        vals = vals if isinstance(vals, tuple) else (vals,)
        out = []
        for v in vals:
            x = v.reshape(v.shape[0], -1).astype(jnp.float32)
            x = jnp.where((jnp.arange(x.shape[0]) < n)[:, None], x, 0.0)
            out.append(x.T @ x)
        return out

    total = None
    for p in prompts:
        inputs, _ = prepare_inputs([SeqChunk(list(p), 0, list(range(nb)))], block_size, pad_tokens=length,
                                   pad_seqs=1, pad_blocks=nb)
        kv = [{"k": jnp.zeros((l.num_kv_heads, nb, block_size, l.head_dim), jnp.float32),
               "v": jnp.zeros((l.num_kv_heads, nb, block_size, l.head_dim), jnp.float32)} for l in graph.kv_layers]
        hs = moments(params, kv, inputs, len(p))
        total = [np.asarray(h) for h in hs] if total is None else [t + np.asarray(h) for t, h in zip(total, hs)]
    return dict(zip(names, total))


def gptq_quantize(mode: str, w: np.ndarray, h: np.ndarray, group: int | None = None, clip: bool = False, **kw):
    """`quantize_weight(mode, w, group)`'s codec parts, the codes chosen by GPTQ against the
    input moments `h` [in, in]; w is [in, *out]."""
    from kiln.passes import quantize as qz

    shape = w.shape
    w2 = np.asarray(w, np.float32).reshape(shape[0], -1)
    if mode == "int4_wo":
        grid = Int4Grid(w2, group, clip)
        q = gptq(w2, h, grid, group=group, **kw)
        scale, lo = np.stack(grid.scales), np.stack(grid.mins)
        out = shape[1:]
        return qz.encode_int4(q.reshape(shape), scale.reshape((-1,) + out), lo.reshape((-1,) + out), group)
    if mode == "fp8":
        grid = Fp8Grid(w2)
        q = gptq(w2, h, grid, **kw)
        codes = _e4m3(np.clip(q / grid.scale, -FP8_MAX, FP8_MAX))
        import ml_dtypes

        return codes.astype(ml_dtypes.float8_e4m3fn).reshape(shape), grid.scale.reshape(shape[1:]).astype(np.float32)
    # int8_wo: symmetric per output channel
    scale = np.maximum(np.abs(w2).max(axis=0), 1e-12) / 127.0
    grid = _Int8Grid(scale)
    q = gptq(w2, h, grid, **kw)
    return np.clip(np.round(q / scale), -127, 127).astype(np.int8).reshape(shape), scale.reshape(shape[1:]).astype(np.float32)


class _Int8Grid:
    def __init__(self, scale):
        self.scale = scale

    def start_group(self, rows):
        pass

    def __call__(self, row):
        return np.clip(np.round(row / self.scale), -127, 127) * self.scale
