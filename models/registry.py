"""Architecture registry, keyed by the Hugging Face `architectures` name.

A family registers a `ModelFamily`: `define(builder, cfg)` writes the graph, and
`weights(cfg)` lists `WeightRule`s that map each declared parameter to its checkpoint
tensor. Users register their own families from outside the package with `register`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from kiln.errors import UnsupportedArchitectureError
from kiln.graph import Builder, Graph
from kiln.models.config import ModelConfig


@dataclass(frozen=True)
class WeightRule:
    """`param` and `source` are patterns with `{i}` for the layer index; `transform` is
    None, "T" (transpose a [out, in] matrix to [in, out]) or a callable(array, cfg).
    A tuple `source` names several tensors, stacked on a new leading axis before the
    transform (a mixture-of-experts layer's per-expert matrices -> one [experts, ...])."""
    param: str
    source: str | tuple[str, ...]
    transform: str | Callable | None = None


@dataclass(frozen=True)
class ModelFamily:
    name: str
    define: Callable[[Builder, ModelConfig], None]
    weights: Callable[[ModelConfig], list[WeightRule]]


_FAMILIES: dict[str, ModelFamily] = {}


def register(architecture: str, family: ModelFamily) -> None:
    _FAMILIES[architecture] = family


def supported() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(architecture: str) -> ModelFamily:
    _load_builtin()
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(_FAMILIES))}") from None


def build_graph(cfg: ModelConfig, dtype: str | None = None) -> Graph:
    """The model's graph with parameters in `dtype` (default: the checkpoint's)."""
    family = get_family(cfg.architecture)
    b = Builder(cfg.architecture, dtype or cfg.dtype)
    family.define(b, cfg)
    b.meta.update(architecture=cfg.architecture, num_layers=cfg.num_layers, vocab_size=cfg.vocab_size)
    return b.build()


def resolve_weights(cfg: ModelConfig, param_names) -> dict[str, tuple[str, str | Callable | None]]:
    """Map every declared parameter name to (checkpoint tensor name, transform)."""
    rules = get_family(cfg.architecture).weights(cfg)
    compiled = [(re.compile("^" + re.escape(r.param).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), r) for r in rules]
    out = {}
    for name in param_names:
        for rx, rule in compiled:
            m = rx.match(name)
            if m:
                g = m.groupdict()
                src = rule.source.format(**g) if isinstance(rule.source, str) else tuple(s.format(**g) for s in rule.source)
                out[name] = (src, rule.transform)
                break
    return out


def load_plugins(spec: str | None) -> None:
    """Import user modules that register families or ops (`KILN_PLUGINS` for the CLI): a
    `os.pathsep`-separated list of Python files or importable module names."""
    import importlib
    import importlib.util
    import os

    for item in filter(None, (spec or "").split(os.pathsep)):
        try:
            if item.endswith(".py"):
                name = "kiln_plugin_" + re.sub(r"\W", "_", os.path.basename(item)[:-3])
                mod_spec = importlib.util.spec_from_file_location(name, item)
                if mod_spec is None or not os.path.isfile(item):
                    raise FileNotFoundError(item)
                mod_spec.loader.exec_module(importlib.util.module_from_spec(mod_spec))
            else:
                importlib.import_module(item)
        except Exception as e:
            from kiln.errors import ConfigError

            raise ConfigError(f"plugin {item!r} failed to load ({type(e).__name__}: {e}); KILN_PLUGINS lists "
                              f"Python files or module names that register models") from None


_loaded = False


def _load_builtin():
    global _loaded
    if not _loaded:
        _loaded = True
        from kiln.models import llama  # noqa: F401  (registers its architectures)
        from kiln.models import gemma, gpt2, moe, phi3, qwen3  # noqa: F401
