"""GPT2LMHeadModel: learned positions, LayerNorm, GELU, biases everywhere.

    x = wte(tokens) + wpe(positions)
    for each layer:
        x = x + c_proj(attention(q, k, v))      q, k, v = split(c_attn(ln_1(x)))
        x = x + c_proj(gelu(c_fc(ln_2(x))))
    logits = ln_f(x) @ wte.T

The checkpoint stores Conv1D weights already [in, out]; the fused c_attn [E, 3E] is split
into q/k/v on load (a weight transform), so the graph has the same three projections as
every other family and the fusion pass may fuse them again.
"""

from __future__ import annotations

from kiln.graph import Builder
from kiln.models import blocks
from kiln.models.config import ModelConfig
from kiln.models.registry import ModelFamily, WeightRule, register

_ACTS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


def prepare(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(qkv_bias=True, o_bias=True, mlp_bias=True,
                       tie_word_embeddings=bool(cfg.extra.get("tie_word_embeddings", True)))


def define(b: Builder, cfg: ModelConfig) -> None:
    cfg = prepare(cfg)
    x = cfg.extra
    act = x.get("activation_function", "gelu_new")
    if act not in _ACTS:
        from kiln.errors import ConfigError

        raise ConfigError(f"GPT-2 activation {act!r} is not supported (supported: {', '.join(_ACTS)})")
    h, table = blocks.embed(b, cfg)
    wpe = b.param("pos_embed", (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"))
    h = b.add(h, b.embedding(wpe, b.input("positions"), name="pos"))
    scale = cfg.head_dim ** -0.5 if x.get("scale_attn_weights", True) else 1.0
    for i in range(cfg.num_layers):
        with b.scope(f"layers.{i}"):
            layer_scale = scale / (i + 1) if x.get("scale_attn_by_inverse_layer_idx") else scale
            a = blocks.attention(b, cfg, blocks.layer_norm(b, "attn_norm", h, cfg.rms_norm_eps), i,
                                 rope=None, scale=layer_scale)
            h = b.add(h, a)
            m = blocks.plain_mlp(b, cfg, blocks.layer_norm(b, "mlp_norm", h, cfg.rms_norm_eps),
                                 act="gelu", approximate=_ACTS[act])
            h = b.add(h, m)
    h = blocks.layer_norm(b, "final_norm", h, cfg.rms_norm_eps)
    b.output(blocks.lm_head(b, cfg, h, table))


def _third(j: int):
    """The j-th of q, k, v along c_attn's last axis (weight [E, 3E] or bias [3E])."""
    def take(a, cfg):
        e = cfg.hidden_size
        return a[..., j * e:(j + 1) * e].copy()
    return take


_H = "transformer.h.{i}"


def weights(cfg: ModelConfig) -> list[WeightRule]:
    rules = [WeightRule("embed", "transformer.wte.weight"),
             WeightRule("pos_embed", "transformer.wpe.weight"),
             WeightRule("lm_head.w", "lm_head.weight", "T")]
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        rules += [WeightRule(f"layers.{{i}}.{ours}.{p}", f"{_H}.{theirs}.{hf}") for p, hf in (("w", "weight"), ("b", "bias"))]
    rules += [WeightRule(f"final_norm.{p}", f"transformer.ln_f.{hf}") for p, hf in (("w", "weight"), ("b", "bias"))]
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rules += [WeightRule(f"layers.{{i}}.{proj}.{p}", f"{_H}.attn.c_attn.{hf}", _third(j))
                  for p, hf in (("w", "weight"), ("b", "bias"))]
    for ours, theirs in (("o_proj", "attn.c_proj"), ("up_proj", "mlp.c_fc"), ("down_proj", "mlp.c_proj")):
        rules += [WeightRule(f"layers.{{i}}.{ours}.{p}", f"{_H}.{theirs}.{hf}") for p, hf in (("w", "weight"), ("b", "bias"))]
    return rules


register("GPT2LMHeadModel", ModelFamily("gpt2", define, weights))
