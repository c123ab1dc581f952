"""llama.cpp's GGUF files as a Kiln checkpoint, read with the `gguf` package.

    GGUFFile(path)            header, metadata and tensor table (memory-mapped; nothing dequantized)
      .metadata               key -> value (scalars and short arrays; the tokenizer's big arrays left out)
      .config()               ModelConfig, through ModelConfig.from_gguf (the one place that builds configs)
      .source()               a WeightSource with Hugging Face tensor names: `load_params` streams it

Weights are dequantized one tensor at a time (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
Q6_K and the other block types `gguf.quants` implements) into fp32 numpy, which `load_params`
casts to the build dtype before it reads the next one: the model is never in host memory
twice. GGUF stores a linear weight [out, in] like Hugging Face (ne0 = in is its fastest axis),
so after renaming the family's `WeightRule`s apply unchanged. llama.cpp's converter permutes
the rows of Q and K in llama-type models (it interleaves each head's two rotary halves); that
permutation is undone here so the weights equal the Hugging Face checkpoint's.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from kiln.errors import CheckpointError
from kiln.models.config import ModelConfig

# GGUF tensor name -> Hugging Face name ({i} = layer), shared by the llama-style families.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_NAME_RX = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), hf) for g, hf in _NAMES.items()]

# GGUF architectures whose converter permuted Q/K rows (llama.cpp's LlamaModel.permute).
_PERMUTED_QK = ("llama",)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def hf_name(gguf_name: str) -> str | None:
    for rx, hf in _NAME_RX:
        m = rx.match(gguf_name)
        if m:
            return hf.format(**m.groupdict())
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation on the first axis ([heads * head_dim, ...]): it stored
    each head's rows as (head_dim/2, 2) pairs where Hugging Face has (2, head_dim/2) halves."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute_rows`); tests write GGUFs with it."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFFile:
    """One GGUF file: metadata and tensor table. Raises `CheckpointError` naming the file when
    it is not GGUF, is truncated or corrupted, or holds a tensor type Kiln cannot dequantize."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
            raise CheckpointError(f"{self.path}: not a readable GGUF file, truncated or corrupted "
                                  f"({_one_line(e)})") from None
        size = self.path.stat().st_size
        self.metadata: dict = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if key.startswith("tokenizer.ggml.") and len(field.data) > 64:
                continue  # vocab, merges, scores: the tokenizer reads them itself
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise CheckpointError(f"{self.path}: metadata field {key!r} is corrupted ({_one_line(e)})") from None
        self.tensors = {}
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(f"{self.path}: truncated: tensor {t.name!r} needs bytes up to {end}, "
                                      f"the file has {size}")
            if not _can_dequantize(t.tensor_type):
                raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which Kiln "
                                      f"cannot read (supported: {', '.join(readable_types())})")
            self.tensors[t.name] = t

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Numpy (row-major) shape: GGUF lists dimensions fastest first."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as fp32 numpy in its numpy shape."""
        from gguf import quants

        t = self.tensors[name]
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
            return np.asarray(arr, np.float32).reshape(self.tensor_shape(name))
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {name!r} ({t.tensor_type.name}): "
                                  f"{_one_line(e)}") from None

    def config(self) -> ModelConfig:
        shapes = {n: self.tensor_shape(n) for n in self.tensors}
        rope_freqs = self.dequantize("rope_freqs.weight") if "rope_freqs.weight" in self.tensors else None
        return ModelConfig.from_gguf(self.metadata, shapes, source=str(self.path), rope_freqs=rope_freqs)

    def source(self, cfg: ModelConfig) -> "GGUFSource":
        return GGUFSource(self, cfg)


class GGUFSource:
    """A `WeightSource` over a GGUF file with Hugging Face tensor names and layouts."""

    def __init__(self, file: GGUFFile, cfg: ModelConfig):
        self.file, self.cfg = file, cfg
        self._names = {}
        for g in file.tensors:
            hf = hf_name(g)
            if hf is not None:
                self._names[hf] = g
        self._unpermute = file.architecture in _PERMUTED_QK

    def names(self):
        return self._names.keys()

    def get(self, name: str) -> np.ndarray:
        g = self._names[name]
        arr = self.file.dequantize(g)
        if self._unpermute and (".attn_q." in g or ".attn_k." in g):
            heads = self.cfg.num_heads if ".attn_q." in g else self.cfg.num_kv_heads
            arr = unpermute_rows(arr, heads)
        return arr


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype) -> bool:
    """Whether `gguf.quants` dequantizes this type (probed on one zero block)."""
    from gguf import GGML_QUANT_SIZES, quants

    if qtype not in GGML_QUANT_SIZES:
        return False
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except Exception:
        return False
    return True


def readable_types() -> list[str]:
    from gguf import GGMLQuantizationType

    return [q.name for q in GGMLQuantizationType if _can_dequantize(q)]


def open_gguf(path: str | Path):
    """(ModelConfig, GGUFSource) of a GGUF file."""
    f = GGUFFile(path)
    cfg = f.config()
    return cfg, f.source(cfg)


def load_tokenizer(path: str | Path):
    """The tokenizer and chat template in a GGUF file's metadata, through transformers' GGUF
    support. Converting it takes seconds, so the result is saved once per file (keyed by
    path, size and mtime) under `$KILN_CACHE_DIR` (default `~/.cache/kiln`) and reloaded."""
    import hashlib
    import os
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / "gguf-tokenizers"
    cached = root / key
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)  # a broken cache entry: convert again
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer from the GGUF metadata ({_one_line(e)})") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home: no cache, same tokenizer
    return tok
