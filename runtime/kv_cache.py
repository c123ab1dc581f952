"""The paged KV cache on the device: one `{"k", "v"}` pool pair per attention layer, each
`[kv_heads, num_blocks, block_size, head_dim]` (see `runtime/kernels/attention.py`).

The pools take the graph's KV cache dtype (`graph.meta["kv_cache_dtype"]`, set by the
`kv_cache_*` pass) or else the model dtype. FP8 entries also carry scalar f32 `k_scale` /
`v_scale` (stored value = value / scale).
"""

from __future__ import annotations

import jax.numpy as jnp

from kiln.graph import Graph


def kv_dtype(graph: Graph, dtype: str) -> str:
    return graph.meta.get("kv_cache_dtype") or dtype


def kv_cache_bytes_per_block(graph: Graph, block_size: int, dtype: str) -> int:
    item = jnp.dtype(kv_dtype(graph, dtype)).itemsize
    return sum(2 * kv.num_kv_heads * block_size * kv.head_dim * item for kv in graph.kv_layers)


def allocate_kv_cache(graph: Graph, num_blocks: int, block_size: int, dtype: str, *, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> list[dict]:
    dt = kv_dtype(graph, dtype)
    out = []
    for kv in graph.kv_layers:
        shape = (kv.num_kv_heads, num_blocks, block_size, kv.head_dim)
        e = {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
        if dt.startswith("float8"):
            e.update(k_scale=jnp.float32(k_scale), v_scale=jnp.float32(v_scale))
        out.append(e)
    return out
