"""Mixture-of-experts families: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM.

    x = x + attention(norm(x))                       Llama's (Qwen3-MoE: with QK-norm)
    x = x + moe(norm(x))                             top-k of softmax(router(x)) SwiGLU experts
            (+ sigmoid(gate(x)) * shared_mlp(x))     Qwen2-MoE's shared expert

Expert weights are stacked [experts, in, out] (logical axis `experts`, which expert
parallelism splits); the checkpoint's per-expert matrices are stacked on load. Qwen
layers listed in `mlp_only_layers` (or off the `decoder_sparse_step`) use a dense MLP.
"""

from __future__ import annotations

from kiln.graph import Builder
from kiln.models import blocks, llama, qwen3
from kiln.models.config import ModelConfig
from kiln.models.registry import ModelFamily, WeightRule, register


def num_experts(cfg: ModelConfig) -> int:
    x = cfg.extra
    return int(x.get("num_experts") or x.get("num_local_experts"))


def is_sparse(cfg: ModelConfig, i: int) -> bool:
    x = cfg.extra
    step = x.get("decoder_sparse_step") or 1
    return i not in (x.get("mlp_only_layers") or ()) and (i + 1) % step == 0


def mlp(cfg: ModelConfig, i: int):
    """The feed-forward block of layer i as a function (b, cfg, x) -> Value."""
    x = cfg.extra
    mixtral = cfg.architecture == "MixtralForCausalLM"
    if not mixtral and not is_sparse(cfg, i):
        return blocks.swiglu_mlp
    size = cfg.intermediate_size if mixtral else int(x["moe_intermediate_size"])
    top_k, norm_topk = int(x["num_experts_per_tok"]), mixtral or bool(x.get("norm_topk_prob", False))

    def ffn(b: Builder, cfg: ModelConfig, h):
        out = blocks.moe_mlp(b, cfg, h, num_experts=num_experts(cfg), top_k=top_k, size=size, norm_topk=norm_topk)
        if x.get("shared_expert_intermediate_size"):
            with b.scope("shared_expert"):
                shared = blocks.gated_mlp(b, cfg, h, size=int(x["shared_expert_intermediate_size"]))
                gate = b.linear(h, b.param("gate.w", (cfg.hidden_size, 1), ("embed", None)), name="gate")
                out = b.add(out, b.sigmoid_gate(shared, gate))
        return out
    return ffn


def define(b: Builder, cfg: ModelConfig) -> None:
    x, table = blocks.embed(b, cfg)
    for i in range(cfg.num_layers):
        with b.scope(f"layers.{i}"):
            if cfg.architecture == "Qwen3MoeForCausalLM":
                x = qwen3.decoder_layer(b, cfg, x, i, mlp(cfg, i))
                continue
            h = blocks.norm(b, "attn_norm", x, cfg.rms_norm_eps)
            x = b.add(x, blocks.self_attention(b, cfg, h, i))
            h = blocks.norm(b, "mlp_norm", x, cfg.rms_norm_eps)
            x = b.add(x, mlp(cfg, i)(b, cfg, h))
    x = blocks.norm(b, "final_norm", x, cfg.rms_norm_eps)
    b.output(blocks.lm_head(b, cfg, x, table))


def _experts_T(a, cfg):
    return a.transpose(0, 2, 1).copy()  # [experts, out, in] -> [experts, in, out]


_LAYER = "model.layers.{i}"


def weights(cfg: ModelConfig) -> list[WeightRule]:
    n = num_experts(cfg)
    if cfg.architecture == "MixtralForCausalLM":
        moe, names = f"{_LAYER}.block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        moe, names = f"{_LAYER}.mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    rules = [WeightRule("layers.{i}.router.w", f"{moe}.gate.weight", "T")]
    for ours, theirs in names.items():
        rules.append(WeightRule(f"layers.{{i}}.experts.{ours}.w",
                                tuple(f"{moe}.experts.{j}.{theirs}.weight" for j in range(n)), _experts_T))
    rules.append(WeightRule("layers.{i}.shared_expert.gate.w", f"{moe}.shared_expert_gate.weight", "T"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(WeightRule(f"layers.{{i}}.shared_expert.{proj}.w", f"{moe}.shared_expert.{proj}.weight", "T"))
    rules += llama.weights(cfg)
    return rules + (qwen3.QK_NORM_RULES if cfg.architecture == "Qwen3MoeForCausalLM" else [])


MOE = ModelFamily("moe", define, weights)
for _arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
    register(_arch, MOE)
