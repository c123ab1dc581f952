"""Train a small byte-level Llama on Python source text, on the CPU, through Kiln's own lowered step
(reference attention; gradients flow through the paged KV write and read), for the full-model
kernel check (`check_kernel_model.py --params`): a random model's bf16 logits have exact top-2
ties (BENCHMARKS.md, issue #4), a trained model's next-token margins are those of a real model.

    python3 benchmarks/train_tiny_model.py --out .tinymodel [--steps 400]
    python3 benchmarks/train_tiny_model.py --out .tinymodel2 --init .tinymodel/model.npz --seed 1 --lr 1e-3

Writes model.npz (f32 params, Kiln names), config.json (the HF-style config) and prompts.json
(held-out byte prompts: the first bytes of every held-out file, lengths fixed below, none
chosen after looking at outputs). Data: the sorted `*.py` files of this Python's standard
library; files whose index is a multiple of 10 are held out."""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kiln.graph import lower
from kiln.models.config import ModelConfig
from kiln.models.loader import random_params
from kiln.models.registry import build_graph
from kiln.runtime.batch import SeqChunk, prepare_inputs
from kiln.runtime.kv_cache import allocate_kv_cache

CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=256, intermediate_size=704,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32",
              bos_token_id=1, eos_token_id=2)
PAGE = 16
PROMPT_LENS = (300, 257, 400, 333, 280, 361, 310, 290)  # 2531 tokens: the prefill step takes the Mosaic kernel


def corpus() -> tuple[bytes, list[bytes]]:
    """(training bytes, held-out file contents): stdlib sources, sorted, every 10th held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        data = f.read_bytes()
        (held if i % 10 == 0 else train).append(data)
    return b"\n".join(train), [h for h in held if len(h) >= max(PROMPT_LENS)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".tinymodel")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", help="continue from this model.npz (a fresh optimizer state and schedule)")
    ap.add_argument("--seed", type=int, default=0, help="batch order")
    args = ap.parse_args()
    cfg = ModelConfig.from_hf_dict(CONFIG, source="tiny byte-level llama")
    graph = build_graph(cfg, "float32")
    params = {k: v.astype(jnp.float32) for k, v in random_params(graph, 0, std=0.02).items()}
    if args.init:
        with np.load(args.init) as z:
            params = {k: jnp.asarray(z[k], jnp.float32) for k in params}
    step = lower(graph, attention="reference")
    text, held = corpus()
    data = np.frombuffer(text, np.uint8).astype(np.int32)
    n, ln = args.seqs, args.len
    width = ln // PAGE
    tables = [list(range(i * width, (i + 1) * width)) for i in range(n)]

    def batch_inputs(starts):
        chunks = [SeqChunk(data[s:s + ln].tolist(), 0, t, all_logits=True) for s, t in zip(starts, tables)]
        inputs, _ = prepare_inputs(chunks, PAGE)
        targets = np.stack([data[s + 1:s + ln + 1] for s in starts]).reshape(-1)
        return {k: jnp.asarray(v) for k, v in inputs.items()}, jnp.asarray(targets)

    def loss_fn(p, inputs, targets):
        kv = allocate_kv_cache(graph, n * width, PAGE, "float32")
        logits, _ = step(p, kv, inputs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, targets[:, None], 1).mean()

    @jax.jit
    def train_step(p, m, v, i, inputs, targets):  # Adam, cosine-decayed learning rate, no weight decay
        loss, g = jax.value_and_grad(loss_fn)(p, inputs, targets)
        lr = args.lr * 0.5 * (1 + jnp.cos(jnp.pi * i / args.steps))
        m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree.map(lambda a, b: 0.99 * a + 0.01 * b * b, v, g)
        c1, c2 = 1 - 0.9 ** (i + 1), 1 - 0.99 ** (i + 1)
        p = jax.tree.map(lambda w, a, b: w - lr * (a / c1) / (jnp.sqrt(b / c2) + 1e-8), p, m, v)
        return p, m, v, loss

    rng = np.random.default_rng(args.seed)
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    t0 = time.time()
    for i in range(args.steps):
        inputs, targets = batch_inputs(rng.integers(0, len(data) - ln - 1, n))
        params, m, v, loss = train_step(params, m, v, jnp.float32(i), inputs, targets)
        if i % 20 == 0 or i == args.steps - 1:
            print(f"step {i} loss {float(loss):.3f} ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "model.npz"), **{k: np.asarray(x) for k, x in params.items()})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    prompts = [list(np.frombuffer(h[:n], np.uint8).tolist()) for h, n in zip(held, PROMPT_LENS)]
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    print(f"saved {len(params)} params, {len(prompts)} held-out prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
