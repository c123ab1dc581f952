"""Tiny GGUF files for tests, written with the `gguf` package the way llama.cpp's converter
writes them (metadata keys, tensor names, Q/K rows permuted for llama)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.models.gguf import _NAMES, permute_rows

_TO_GGUF = {hf: g for g, hf in _NAMES.items()}

# Types `gguf.quants.quantize` cannot write: random blocks with small finite fp16 scales.
# (block bytes, byte offsets of fp16 scale fields)
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        key = ".".join(["model", "layers", "{i}", *parts[3:]])
        return _TO_GGUF[key].format(i=parts[2])
    return _TO_GGUF[hf]


def encode(arr: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: `arr` quantized to `qtype`, or random
    valid blocks of the same shape for the K-quants."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    q = Q[qtype]
    if qtype in _K_BLOCKS:
        size, scale_at = _K_BLOCKS[qtype]
        rows, cols = arr.shape
        blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
        for off in scale_at:
            blocks[..., off:off + 2] = np.frombuffer(np.float16(2e-3).tobytes(), np.uint8)
        return blocks.reshape(rows, -1), q
    if qtype == "F32":
        return arr.astype(np.float32), None
    return quants.quantize(arr.astype(np.float32), q), q


def write_gguf(path: Path, hf_model, qtype: str = "F32", *, arch: str = "llama", seed: int = 0,
               extra_meta: dict | None = None, raw_tensors: dict | None = None) -> Path:
    """Write `hf_model` (a transformers Llama/Qwen2/Qwen3) as a GGUF of `arch` with every matrix in
    `qtype` (norms and biases stay F32); `raw_tensors` {gguf name: (bytes array, raw type)}
    replaces tensors as they are."""
    import gguf

    cfg = hf_model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "BF16": 32}.get(qtype, 7))
    for k, v in (extra_meta or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, v)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        g = gguf_name(name)
        if g in (raw_tensors or {}):
            data, raw = raw_tensors[g]
            w.add_tensor(g, data, raw_dtype=raw)
            continue
        arr = t.detach().float().numpy()
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            arr = permute_rows(arr, cfg.num_attention_heads if ".attn_q." in g else cfg.num_key_value_heads)
        if arr.ndim == 2:
            data, raw = encode(arr, qtype, rng)
        else:
            data, raw = arr.astype(np.float32), None
        w.add_tensor(g, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
