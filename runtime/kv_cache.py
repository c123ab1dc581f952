"""The paged KV cache on the device: one `{"k", "v"}` pool pair per attention layer, each
`[kv_heads, num_blocks, block_size, head_dim]` (see `runtime/kernels/attention.py`)."""

from __future__ import annotations

import jax.numpy as jnp

from kiln.graph import Graph


def kv_cache_bytes_per_block(graph: Graph, block_size: int, dtype: str) -> int:
    item = jnp.dtype(dtype).itemsize
    return sum(2 * kv.num_kv_heads * block_size * kv.head_dim * item for kv in graph.kv_layers)


def allocate_kv_cache(graph: Graph, num_blocks: int, block_size: int, dtype: str) -> list[dict]:
    return [{"k": jnp.zeros((kv.num_kv_heads, num_blocks, block_size, kv.head_dim), dtype),
             "v": jnp.zeros((kv.num_kv_heads, num_blocks, block_size, kv.head_dim), dtype)}
            for kv in graph.kv_layers]
