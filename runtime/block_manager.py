"""The KV block pool (plain Python, no jax): allocation, reference counts, prefix caching.

A sequence's `BlockTable` lists its blocks in order; token `i` lives in block
`block_ids[i // block_size]` at offset `i % block_size`::

    tokens:   | 0 1 2 3 | 4 5 6 7 | 8 9 . . |        block_size = 4
    blocks:     b17       b3        b40            b17, b3 full: hashed, shareable
                └─ key(None, [0..3]) ─┘└ key(h17, [4..7])

Prefix caching: once a block is full and its tokens are known, it is registered under a key
of (hash of the previous block's key, its tokens), so the same prefix maps to the same chain
of keys. A later sequence with that prefix takes the blocks instead of recomputing them.
Blocks with no reference sit in the free pool in LRU order; a cached one keeps its key
there and can be revived until it is handed out again (evicted). Blocks are shared by
reference count (prefix hits, `fork` for n > 1) and only ever written past the shared part.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class BlockTable:
    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0             # leading full blocks registered in the prefix cache
    last_hash: int | None = None    # chain hash of block num_hashed - 1
    salt: int | None = None         # the chain's root: K/V computed another way (LongRoPE's short or
                                    # long factors) never share prefix-cache keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # front = evict first
        self.cached: dict[tuple, int] = {}
        self.query_tokens = 0
        self.hit_tokens = 0

    # -- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, token_ids: list[int], salt: int | None = None) -> list[int]:
        """Blocks caching the longest full-block prefix of `token_ids` (in tables of that `salt`),
        leaving at least one token to compute (its logits are needed). Takes no reference; pass
        them to `allocate`."""
        if not self.enable_prefix_caching:
            return []
        bs, found, parent = self.block_size, [], salt
        for i in range((len(token_ids) - 1) // bs):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            b = self.cached.get(key)
            if b is None:
                break
            found.append(b)
            parent = hash(key)
        self.query_tokens += len(token_ids)
        self.hit_tokens += len(found) * bs
        return found

    # -- changes
    def allocate(self, table: BlockTable, num_tokens: int, cached: list[int] = ()) -> bool:
        """Grow `table` to hold `num_tokens` tokens, first taking the prefix-cache blocks
        `cached` (only when the table is empty). All or nothing: returns False, changing
        nothing, when the pool is short."""
        need = self.blocks_needed(num_tokens) - len(table.block_ids) - len(cached)
        if need <= 0 and not cached:
            return True
        assert not cached or not table.block_ids
        revive = sum(1 for b in cached if self.ref[b] == 0)
        if max(need, 0) + revive > len(self.free):
            return False
        for b in cached:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
            table.block_ids.append(b)
        if cached:
            table.num_hashed, table.last_hash = len(cached), hash(self.key[cached[-1]])
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            k = self.key[b]
            if k is not None:  # evict
                if self.cached.get(k) == b:
                    del self.cached[k]
                self.key[b] = None
            self.ref[b] = 1
            table.block_ids.append(b)
        return True

    def commit(self, table: BlockTable, token_ids: list[int], num_tokens: int) -> None:
        """Register the full blocks among the first `num_tokens` tokens (whose values are
        `token_ids[:num_tokens]`, K/V written or queued) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while (table.num_hashed + 1) * bs <= num_tokens:
            i = table.num_hashed
            key = (table.last_hash if i else table.salt, tuple(token_ids[i * bs:(i + 1) * bs]))
            b = table.block_ids[i]
            if key not in self.cached and self.key[b] is None:
                self.cached[key] = b
                self.key[b] = key
            table.num_hashed, table.last_hash = i + 1, hash(key)

    def fork(self, table: BlockTable, num_tokens: int) -> BlockTable:
        """A new table sharing the full blocks that hold the first `num_tokens` tokens."""
        n = num_tokens // self.block_size
        shared = table.block_ids[:n]
        for b in shared:
            assert self.ref[b] > 0
            self.ref[b] += 1
        return BlockTable(list(shared), salt=table.salt)  # `commit` re-derives the key chain from the tokens

    def free_table(self, table: BlockTable) -> None:
        """Drop the table's references; blocks nobody holds go back to the pool (a sequence's
        tail first in line for eviction, blocks without a cache key before all others)."""
        for b in reversed(table.block_ids):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} freed twice"
            if self.ref[b] == 0:
                self.free[b] = None
                if self.key[b] is None:
                    self.free.move_to_end(b, last=False)
        table.block_ids, table.num_hashed, table.last_hash = [], 0, None

    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
