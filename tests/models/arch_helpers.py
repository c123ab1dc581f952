"""Tiny random-weight checkpoints of the wider families (Qwen3, Gemma2/3, GPT-2, Phi-3, MoE),
and the checks every family must pass against transformers (fp32, eager attention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import Stepper, hf_greedy, hf_logits, load_hf, make_tokenizer

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1,
               rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# name -> (transformers config class, model class, config overrides)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=8, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": dict(_ROPE),
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_head=4, n_layer=2, n_positions=256, activation_function="gelu_new")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        max_position_embeddings=256, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 9.0],
                         "original_max_position_embeddings": 16})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
}


def _one_torch_thread():
    """transformers' tiny forwards are pure overhead on many threads: one thread ran the reference
    greedy loop 7x faster on the 2-core CI machine while JAX also runs."""
    import torch

    torch.set_num_threads(1)


def make_checkpoint(family: str, path: Path, seed: int = 0):
    """Save a tiny fp32 model of `family` with random weights, random biases and norm weights
    (transformers initialises those to 0 or 1, which would hide a wrong mapping), and a tokenizer."""
    import torch
    import transformers

    _one_torch_thread()
    cfg_cls, model_cls, overrides = FAMILIES[family]
    kw = dict(_COMMON)
    if family == "gpt2":
        kw = dict(vocab_size=320, initializer_range=0.1, layer_norm_epsilon=1e-5, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    cfg = getattr(transformers, cfg_cls)(**{**kw, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0, 0.1).add_(0.0 if ("bias" in name or family.startswith("gemma")) else 1.0)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return model


def prompts(lens, seed=1, vocab=300):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lens]


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class Family:
    """One family's checkpoint, its Kiln graph and params, transformers' model, and a
    Stepper of fixed padded shapes (one compile serves prefill and decode)."""

    PAD = dict(pad_tokens=64, pad_seqs=4, pad_logits=64)

    def __init__(self, family: str, path: Path, graph=None):
        from kiln.models.loader import load_params, open_checkpoint
        from kiln.models.registry import build_graph

        make_checkpoint(family, path)
        self.name, self.path = family, path
        ckpt = open_checkpoint(path)
        self.config = ckpt.config
        self.graph = graph or build_graph(ckpt.config, "float32")
        self.params = load_params(self.graph, ckpt.config, ckpt.source)
        self.hf = load_hf(path)

    def stepper(self, graph=None, params=None):
        """A Stepper with room for 16 sequences; the one over this family's own graph is made
        (and compiled) once."""
        if graph is None and params is None:
            if getattr(self, "_stepper", None) is None:
                self._stepper = Stepper(self.graph, self.params, num_blocks=256)
            return self._stepper
        return Stepper(graph or self.graph, self.params if params is None else params, num_blocks=256)

    def variant(self, kind: str):
        """A Stepper over this family under `kind` (made and compiled once): "plain" (no passes),
        "pipeline" (the default pass pipeline: fusion), "pipeline_tp2" (that, tensor parallel
        over 2 CPU devices), "pipeline_ep2" (that, experts split over the 2 devices)."""
        made = self.__dict__.setdefault("_variants", {})
        if kind not in made:
            made[kind] = self.stepper() if kind == "plain" else self._make_variant(kind)
        return made[kind]

    def _make_variant(self, kind):
        from kiln.passes.pipeline import compile_model
        from kiln.passes.sharding import EP_RULES, TP_RULES, shard_model
        from tests.passes.sharding_cases import use_sharded

        graph, params = compile_model(self.graph, dict(self.params))
        if kind == "pipeline":
            return Stepper(graph, params, num_blocks=256)
        model = shard_model(graph, params, tp=2, rules={"pipeline_tp2": TP_RULES, "pipeline_ep2": EP_RULES}[kind])
        return use_sharded(Stepper(graph, model.params, num_blocks=256), model)

    def batch_logits(self, ids_list, stepper=None):
        """All-position logits of several prompts prefilled together in one padded ragged step."""
        from kiln.runtime.batch import SeqChunk

        st = stepper or self.stepper()
        return st.step([SeqChunk(ids, 0, st.new_table(), all_logits=True) for ids in ids_list], **self.PAD)

    def batch_greedy(self, ids_list, n, stepper=None):
        """n greedy tokens per prompt, all sequences decoding together in one ragged step. A
        sequence growing past `graph.meta["kv_recompute_past"]` tokens is prefilled again whole."""
        from kiln.runtime.batch import SeqChunk

        st = stepper or self.stepper()
        recompute = self.graph.meta.get("kv_recompute_past")
        tables = [st.new_table() for _ in ids_list]
        chunks = [SeqChunk(ids, 0, t) for ids, t in zip(ids_list, tables)]
        gen = [[] for _ in ids_list]
        for _ in range(n):
            for g, row in zip(gen, st.step(chunks, **self.PAD)):
                g.append(int(np.argmax(row[-1])))
            chunks = [SeqChunk(p + g, 0, t) if len(p) + len(g) - 1 == recompute else
                      SeqChunk([g[-1]], len(p) + len(g) - 1, t) for p, g, t in zip(ids_list, gen, tables)]
        return gen

    def reference(self, what: str, ids, n: int = 0):
        """transformers' logits ("logits") or n greedy tokens ("greedy") for `ids`, computed once."""
        memo = self.__dict__.setdefault("_refs", {})
        key = (what, tuple(ids), n)
        if key not in memo:
            memo[key] = hf_logits(self.hf, ids) if what == "logits" else hf_greedy(self.hf, ids, n)
        return memo[key]

    def check_logits(self, ids_list, stepper=None, tol=1e-4):
        for ids, got in zip(ids_list, self.batch_logits(ids_list, stepper)):
            ref = self.reference("logits", ids)
            assert got.shape == ref.shape
            err = rel_err(got, ref)
            assert err < tol, f"prompt of {len(ids)} tokens: relative error {err:.2e}"

    def check_greedy(self, ids_list, n=32, stepper=None):
        for ids, got in zip(ids_list, self.batch_greedy(ids_list, n, stepper)):
            assert got == self.reference("greedy", ids, n)

    def check_llm(self, ids, n=32):
        """The public API end to end (checkpoint dir -> LLM -> generate) equals transformers' greedy."""
        from kiln import LLM, SamplingParams

        out = LLM(str(self.path), dtype="float32").generate([ids], SamplingParams(max_tokens=n, temperature=0.0))[0]
        assert out.outputs[0].token_ids == self.reference("greedy", ids, n)
