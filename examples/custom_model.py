"""A new architecture defined outside Kiln, registered, and generated with.

"ParallelReluLM" is a Llama variant with two changes: each layer runs attention and the MLP
in parallel off one norm (GPT-J / PaLM style), and the MLP is squared-ReLU (Primer) instead
of SwiGLU. The model file part needs no jax; the one new op (`squared_relu`) registers its
shape rule and JAX lowering here too. The script writes a tiny random-weight checkpoint in
Hugging Face layout, builds it into an engine directory, generates 16 greedy tokens from the
engine with `kiln.LLM`, and checks them against a plain numpy forward pass of the same model.

    python examples/custom_model.py

From the command line, name this file in KILN_PLUGINS so that `kiln` registers it first:

    KILN_PLUGINS=examples/custom_model.py kiln build CHECKPOINT -o ENGINE
    KILN_PLUGINS=examples/custom_model.py kiln generate ENGINE --prompt "..."
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from kiln import LLM, SamplingParams
from kiln.graph import register_op
from kiln.models import ModelFamily, WeightRule, blocks, register

# ---------------------------------------------------------------- 1. a new op (shape rule + lowering)


def _squared_relu(ctx, x):
    import jax.numpy as jnp

    return jnp.square(jnp.maximum(x, 0))


register_op("squared_relu", lambda attrs, x: x, _squared_relu, inputs=1)

# ---------------------------------------------------------------- 2. the architecture (Builder API)


def define(b, cfg):
    x, table = blocks.embed(b, cfg)                                   # [T, hidden]
    for i in range(cfg.num_layers):
        with b.scope(f"layers.{i}"):
            h = blocks.norm(b, "norm", x, cfg.rms_norm_eps)
            attn = blocks.self_attention(b, cfg, h, i)                # q/k/v/o_proj, RoPE, paged KV cache
            up = blocks.linear(b, "up_proj", h, cfg.intermediate_size, ("embed", "mlp"))
            mlp = blocks.linear(b, "down_proj", b.squared_relu(up), cfg.hidden_size, ("mlp", "embed"))
            x = b.add(x, b.add(attn, mlp))                            # parallel residual
    x = blocks.norm(b, "final_norm", x, cfg.rms_norm_eps)
    b.output(blocks.lm_head(b, cfg, x, table))


def weights(cfg):
    """Kiln parameter name -> checkpoint tensor name ("T": stored [out, in], Kiln wants [in, out])."""
    layer = "model.layers.{i}"
    rules = [WeightRule("embed", "model.embed_tokens.weight"), WeightRule("final_norm.w", "model.norm.weight"),
             WeightRule("lm_head.w", "lm_head.weight", "T"), WeightRule("layers.{i}.norm.w", f"{layer}.norm.weight")]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"):
        rules.append(WeightRule(f"layers.{{i}}.{p}.w", f"{layer}.{p}.weight", "T"))
    return rules


register("ParallelReluForCausalLM", ModelFamily("parallel_relu", define, weights))

# ---------------------------------------------------------------- 3. a checkpoint, and generation

CONFIG = dict(architectures=["ParallelReluForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False, dtype="float32")


def write_checkpoint(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    from safetensors.numpy import save_file

    c, rng = CONFIG, np.random.default_rng(seed)
    e, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], e), "lm_head.weight": (c["vocab_size"], e),
              "model.norm.weight": (e,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.norm.weight": (e,), f"{p}.q_proj.weight": (e, e), f"{p}.k_proj.weight": (kv, e),
                       f"{p}.v_proj.weight": (kv, e), f"{p}.o_proj.weight": (e, e),
                       f"{p}.up_proj.weight": (f, e), f"{p}.down_proj.weight": (e, f)})
    w = {k: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.1 * rng.standard_normal(s)).astype(np.float32)
         for k, s in shapes.items()}
    save_file(w, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return w


def reference_greedy(w: dict, ids: list[int], n: int) -> list[int]:
    """The same architecture in plain numpy: full recompute per token, no cache."""
    c = CONFIG
    h, kvh, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    d = c["hidden_size"] // h
    norm = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g  # noqa: E731

    def rope(x, pos):  # [T, heads, d], half-split rotation
        inv = 1.0 / c["rope_theta"] ** (np.arange(0, d, 2) / d)
        ang = pos[:, None, None] * inv[None, None, :]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

    ids = list(ids)
    for _ in range(n):
        t, pos = len(ids), np.arange(len(ids))
        x = w["model.embed_tokens.weight"][ids].astype(np.float64)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            y = norm(x, w[f"{p}.norm.weight"])
            q = rope((y @ w[f"{p}.q_proj.weight"].T).reshape(t, h, d), pos)
            k = np.repeat(rope((y @ w[f"{p}.k_proj.weight"].T).reshape(t, kvh, d), pos), h // kvh, axis=1)
            v = np.repeat((y @ w[f"{p}.v_proj.weight"].T).reshape(t, kvh, d), h // kvh, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + np.triu(np.full((t, t), -1e30), 1)
            a = np.exp(s - s.max(-1, keepdims=True))
            a = np.einsum("hts,shd->thd", a / a.sum(-1, keepdims=True), v).reshape(t, h * d)
            mlp = np.square(np.maximum(y @ w[f"{p}.up_proj.weight"].T, 0)) @ w[f"{p}.down_proj.weight"].T
            x = x + a @ w[f"{p}.o_proj.weight"].T + mlp
        logits = norm(x[-1], w["model.norm.weight"]) @ w["lm_head.weight"].T
        ids.append(int(np.argmax(logits)))
    return ids[-n:]


def main():
    from kiln.runtime.build import build
    from kiln.runtime.engine_dir import BuildConfig

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, engine = Path(tmp) / "checkpoint", Path(tmp) / "engine"
        ckpt.mkdir()
        w = write_checkpoint(ckpt)
        # what `KILN_PLUGINS=examples/custom_model.py kiln build CHECKPOINT -o ENGINE` runs
        build(str(ckpt), engine, BuildConfig(dtype="float32", max_num_seqs=4, max_num_tokens=32, num_kv_blocks=64),
              log=lambda *a: None)
        llm = LLM(str(engine))
        prompt = [1, 17, 42, 99, 5]
        out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].token_ids
        ref = reference_greedy(w, prompt, 16)
        print("kiln     ", out)
        print("reference", ref)
        assert out == ref, "Kiln and the numpy reference disagree"
        print("ParallelReluForCausalLM: built, and 16 greedy tokens equal to the numpy reference")


if __name__ == "__main__":
    main()
