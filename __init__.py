"""Kiln: an LLM inference compiler on JAX/XLA.

    from kiln import LLM, SamplingParams
    llm = LLM("path/to/hf-checkpoint")
    print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].text)
"""

from kiln.errors import (CheckpointError, ConfigError, GraphError, KilnError, RequestError,
                         UnsupportedArchitectureError)

__version__ = "0.1.0"

_LAZY = {
    "LLM": "kiln.runtime.llm",
    "SamplingParams": "kiln.runtime.sampling",
    "RequestOutput": "kiln.runtime.outputs",
    "CompletionOutput": "kiln.runtime.outputs",
}


def __getattr__(name):  # the runtime imports jax: load it only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "KilnError", "GraphError", "ConfigError",
           "CheckpointError", "RequestError", "UnsupportedArchitectureError", "__version__"]
