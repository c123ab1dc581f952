"""Test helpers: tiny random-weight checkpoints made with transformers, and a direct way to
run a Kiln graph step over a ragged batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ARCHS = ("llama", "mistral", "qwen2")

_CORPUS = ("the quick brown fox jumps over the lazy dog. " * 4 +
           "Kiln compiles language models into fast inference engines on JAX. "
           "Paged attention keeps the cache in blocks; the scheduler batches requests in flight.")


def make_tokenizer(path: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a tiny corpus, saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(path)
    return fast


def hf_config(arch: str, **overrides):
    import transformers

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.1, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == "llama":
        kw = dict(tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "rope_theta": 10000.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        kw, cls = dict(sliding_window=8, tie_word_embeddings=False), transformers.MistralConfig
    elif arch == "qwen2":
        kw = dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=1)
        cls = transformers.Qwen2Config
    else:
        raise ValueError(arch)
    return cls(**{**common, **kw, **overrides})


def make_hf_checkpoint(arch: str, path: Path, seed: int = 0, **overrides):
    """Save a tiny fp32 model with random weights (and a tokenizer) to `path`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[arch]
    model = cls(cfg).eval()
    with torch.no_grad():  # biases are zero-initialised; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return model


def load_hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype="float32").eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


class Stepper:
    """Runs a lowered graph directly on a KV pool large enough for several sequences."""

    def __init__(self, graph, params, *, num_blocks=64, block_size=4, blocks_per_seq=16, attention="reference"):
        import jax

        from kiln.graph import lower
        from kiln.runtime.kv_cache import allocate_kv_cache

        self.graph, self.params, self.block_size = graph, params, block_size
        self.blocks_per_seq = blocks_per_seq
        self.kv = allocate_kv_cache(graph, num_blocks, block_size, "float32")
        self.step_fn = jax.jit(lower(graph, attention=attention), donate_argnums=(1,))
        self.rng = np.random.default_rng(0)
        self.free = list(self.rng.permutation(num_blocks))  # shuffled: tables are non-contiguous

    def new_table(self):
        return [int(self.free.pop()) for _ in range(self.blocks_per_seq)]

    def step(self, chunks, **pad):
        from kiln.runtime.batch import prepare_inputs

        inputs, rows = prepare_inputs(chunks, self.block_size, pad_blocks=self.blocks_per_seq, **pad)
        logits, self.kv = self.step_fn(self.params, self.kv, inputs)
        logits = np.asarray(logits)
        out, r = [], 0
        for n in rows:
            out.append(logits[r:r + n])
            r += n
        return out


def hf_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of a transformers model over the windows Kiln's
    `runtime/evaluate.py` uses: the reference for `kiln eval`."""
    import math

    import torch

    from kiln.runtime.evaluate import window_spans

    total, count = 0.0, 0
    for begin, end, first in window_spans(len(ids), window, stride):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].float(), -1).numpy()
        rows = np.arange(first - begin - 1, end - begin - 1)
        total -= float(logp[rows, np.asarray(ids[first:end])].sum())
        count += len(rows)
    return math.exp(total / count), count
