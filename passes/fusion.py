"""Fusion rules: fewer, larger matmuls and one pass over the hidden state per norm.

Per Llama layer the matmuls go 7 -> 4 (q, k, v, o, gate, up, down -> qkv, o, gate_up, down);
QK-norm layers (Qwen3, Qwen3-MoE, Gemma3) fuse QKV alike, the per-head norms moving into
`qkv_attention` after its split; Phi-3's LongRoPE folds into attention like plain RoPE.
Fused weight layouts (tensor parallelism splits them on the named axes without breaking
heads; passes/sharding.py relies on them):

    qkv_proj.w   [embed, kv_heads, group + 2, head_dim]   axes ("embed", "kv_heads", None, None)
                 (the group's q heads, then its k head, then its v head)
    gate_up.w    [embed, 2, mlp]                          axes ("embed", None, "mlp")

Each rule concatenates the weights once, at build time, through its weight transform.
"""

from __future__ import annotations

from kiln.passes.rewrite import Any_, Input_, Match, Param_, Pat, Rewriter, Rule, array_module as _xp


def _prefix(param_name: str) -> str:
    """'layers.3.q_proj.w' -> 'layers.3.'"""
    parts = param_name.split(".")
    return ".".join(parts[:-2]) + "." if len(parts) > 2 else ""


# --------------------------------------------------------------------------- RoPE into attention

def _rope(x: str, name: str) -> Pat:
    return Pat("rope", Any_(x), Input_("positions"), rest=f"{name}_extra", name=name)


def _fold_rope(rw: Rewriter, m: Match):
    q_rope, k_rope, attn = m.node("q_rope"), m.node("k_rope"), m.node("attn")
    if q_rope.attrs != k_rope.attrs:
        return False
    ctx = m.ctx  # positions, seq_ids, slot_mapping, block_tables, context_lens, query_start_loc
    for extra in (m.q_rope_extra, m.k_rope_extra):  # dynamic rope reads seq_ids, context_lens
        if extra and tuple(extra) != (ctx[1], ctx[4]):
            return False
    out = rw.node("rope_attention", m.q, m.k, m.v, *ctx, name=attn.name, **attn.attrs, rope=q_rope.attrs)
    rw.replace(attn.name, out)
    rw.remove(attn.name)


def _longrope(x: str, name: str) -> Pat:
    return Pat("longrope", Any_(x), Input_("positions"), Input_("seq_ids"), Any_("lens"), name=name)


def _fold_longrope(rw: Rewriter, m: Match):
    q_rope, k_rope, attn = m.node("q_rope"), m.node("k_rope"), m.node("attn")
    if q_rope.attrs != k_rope.attrs:
        return False
    out = rw.node("rope_attention", m.q, m.k, m.v, *m.ctx, m.lens, name=attn.name, **attn.attrs,
                  rope={"op": "longrope", **q_rope.attrs})
    rw.replace(attn.name, out)
    rw.remove(attn.name)


FOLD_ROPE = [
    # attention(rope(q, pos), rope(k, pos), v, ...) -> rope_attention(q, k, v, ...){rope}
    Rule("fold_rope", Pat("attention", _rope("q", "q_rope"), _rope("k", "k_rope"), Any_("v"), rest="ctx", name="attn"),
         _fold_rope),
    # attention(longrope(q, pos, seq_ids, lens), longrope(k, ..), v, ...)
    #   -> rope_attention(q, k, v, ..., lens){rope: op=longrope}        (Phi-3)
    Rule("fold_longrope", Pat("attention", _longrope("q", "q_rope"), _longrope("k", "k_rope"), Any_("v"), rest="ctx",
                              name="attn"), _fold_longrope),
]


# --------------------------------------------------------------------------- QKV

def _proj(x: str, w: str, b: str, lin: str) -> Pat:
    return Pat("reshape", Pat("linear", Any_(x), Param_(w), Param_(b, optional=True), name=lin))


def fuse_qkv_weights(wq, wk, wv, kvh: int, d: int):
    """[E, H*D], [E, KVH*D], [E, KVH*D] -> [E, KVH, G + 2, D] (also biases: leading dim absent)."""
    xp = _xp(wq)
    lead = wq.shape[:-1]
    q = wq.reshape(lead + (kvh, -1, d))
    k = wk.reshape(lead + (kvh, 1, d))
    v = wv.reshape(lead + (kvh, 1, d))
    return (xp.concatenate([q, k, v], axis=len(lead) + 1),)


def _fuse_qkv(rw: Rewriter, m: Match):
    attn = m.node("attn")
    lins = [m.node(n) for n in ("lq", "lk", "lv")]
    if any(not rw.single_use(n.name) for n in lins):
        return False
    qk_norm = None
    if "qn" in m:  # QK-norm: the same norm on q and k heads, nothing else reading the unnormed heads
        qn, kn = m.node("qn"), m.node("kn")
        if qn.attrs != kn.attrs or not all(rw.single_use(x) for x in (m.qn, m.kn, *qn.inputs[:1], *kn.inputs[:1])):
            return False
        qk_norm = dict(qn.attrs)
    has_bias = [m.get(b) is not None for b in ("bq", "bk", "bv")]
    if any(has_bias) and not all(has_bias):
        return False
    wq, wk, wv = (rw.type_of(m[w]) for w in ("wq", "wk", "wv"))
    if any(t.rank != 2 for t in (wq, wk, wv)):
        return False
    (t, h, d), (_, kvh, dk) = rw.type_of(attn.inputs[0]).shape, rw.type_of(attn.inputs[1]).shape
    e, g = wq.shape[0], h // kvh
    if dk != d or wq.shape[1] != h * d or wk.shape[1] != kvh * d or wv.shape[1] != kvh * d:
        return False
    pre = _prefix(m.wq)
    w = rw.param(pre + "qkv_proj.w", (e, kvh, g + 2, d), wq.dtype, (wq.axes[0], "kv_heads", None, None))
    rw.weights([w], [m.wq, m.wk, m.wv], lambda a, b, c: fuse_qkv_weights(a, b, c, kvh, d))
    b = None
    if all(has_bias):
        b = rw.param(pre + "qkv_proj.b", (kvh, g + 2, d), rw.type_of(m.bq).dtype, ("kv_heads", None, None), init="zeros")
        rw.weights([b], [m.bq, m.bk, m.bv], lambda a, b_, c: fuse_qkv_weights(a, b_, c, kvh, d))
    qkv = rw.node("linear", m.x, w, b, name=pre + "qkv_proj")               # [T, KVH, G + 2, D]
    attrs = dict(attn.attrs)
    attrs.setdefault("rope", None)
    norms = ()
    if qk_norm is not None:
        attrs["qk_norm"], norms = qk_norm, (m.nq, m.nk)
    out = rw.node("qkv_attention", qkv, *m.ctx, *norms, name=attn.name, **attrs)
    rw.replace(attn.name, out)
    rw.remove(attn.name)


def _normed(x: str, w: str, b: str, lin: str, norm_w: str, norm: str) -> Pat:
    return Pat("rms_norm", _proj(x, w, b, lin), Param_(norm_w), name=norm)


FUSE_QKV = [
    # (rope_)attention(reshape(x @ wq), reshape(x @ wk), reshape(x @ wv), ...)
    #   -> qkv_attention(x @ w_qkv[E, KVH, G + 2, D], ...)
    Rule("fuse_qkv", Pat(("attention", "rope_attention"), _proj("x", "wq", "bq", "lq"), _proj("x", "wk", "bk", "lk"),
                         _proj("x", "wv", "bv", "lv"), rest="ctx", name="attn"), _fuse_qkv),
    # (rope_)attention(rms_norm(reshape(x @ wq), nq), rms_norm(reshape(x @ wk), nk), reshape(x @ wv), ...)
    #   -> qkv_attention(x @ w_qkv, ..., nq, nk){qk_norm}        (QK-norm after the split)
    Rule("fuse_qkv_norm", Pat(("attention", "rope_attention"), _normed("x", "wq", "bq", "lq", "nq", "qn"),
                              _normed("x", "wk", "bk", "lk", "nk", "kn"), _proj("x", "wv", "bv", "lv"),
                              rest="ctx", name="attn"), _fuse_qkv),
]


# --------------------------------------------------------------------------- gate + up

def fuse_gate_up_weights(wg, wu):
    """[E, M], [E, M] -> [E, 2, M] (biases [M] -> [2, M])."""
    xp = _xp(wg)
    return (xp.stack([wg, wu], axis=-2),)


def _fuse_gate_up(rw: Rewriter, m: Match):
    if not (rw.single_use(m.lg) and rw.single_use(m.lu) and rw.single_use(m.act)):
        return False
    has_bias = (m.get("bg") is not None, m.get("bu") is not None)
    wg, wu = rw.type_of(m.wg), rw.type_of(m.wu)
    if has_bias[0] != has_bias[1] or wg.shape != wu.shape or wg.rank != 2:
        return False
    pre = _prefix(m.wg)
    w = rw.param(pre + "gate_up_proj.w", (wg.shape[0], 2, wg.shape[1]), wg.dtype, (wg.axes[0], None, wg.axes[1]))
    rw.weights([w], [m.wg, m.wu], fuse_gate_up_weights)
    b = None
    if has_bias[0]:
        b = rw.param(pre + "gate_up_proj.b", (2, wg.shape[1]), rw.type_of(m.bg).dtype, (None, wg.axes[1]), init="zeros")
        rw.weights([b], [m.bg, m.bu], fuse_gate_up_weights)
    gu = rw.node("linear", m.x, w, b, name=pre + "gate_up_proj")            # [T, 2, M]
    act = m.node("act")
    op = "swiglu" if act.op == "silu" else "geglu"
    rw.replace(m.swiglu, rw.node(op, gu, name=m.node("swiglu").name, **act.attrs))


FUSE_GATE_UP = [
    # mul(silu(x @ wg), x @ wu) -> swiglu(x @ w_gu[E, 2, M]);  mul(gelu(..), ..) -> geglu(..) (Gemma)
    Rule("fuse_gate_up",
         Pat("mul", Pat(("silu", "gelu"), Pat("linear", Any_("x"), Param_("wg"), Param_("bg", optional=True), name="lg"),
                        name="act"),
             Pat("linear", Any_("x"), Param_("wu"), Param_("bu", optional=True), name="lu"), name="swiglu"),
         _fuse_gate_up),
]


# --------------------------------------------------------------------------- residual add + RMSNorm

def _fuse_add_norm(rw: Rewriter, m: Match):
    norm = m.node("norm")
    y = rw.node("add_rms_norm", m.a, m.b, m.w, name=norm.name + ".fused", **norm.attrs)  # [2, T, E]
    rw.replace(m.sum, rw.node("part", y, name=m.sum, index=0))
    rw.replace(m.norm, rw.node("part", y, name=norm.name, index=1))


FUSE_ADD_NORM = [
    # rms_norm(add(a, b), w) -> part(add_rms_norm(a, b, w), 1); other readers of the sum -> part(.., 0)
    Rule("fuse_add_norm", Pat("rms_norm", Pat("add", Any_("a"), Any_("b"), name="sum"), Param_("w"), name="norm"),
         _fuse_add_norm),
]
