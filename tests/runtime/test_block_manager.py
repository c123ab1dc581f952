"""The block manager: allocation, sharing, prefix caching, and property tests (hypothesis)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.block_manager import BlockManager, BlockTable

BS = 4


def test_allocate_grows_and_free_returns():
    bm = BlockManager(8, BS)
    t = BlockTable()
    assert bm.allocate(t, 5) and len(t.block_ids) == 2
    assert bm.allocate(t, 8) and len(t.block_ids) == 2
    assert bm.allocate(t, 9) and len(t.block_ids) == 3
    assert not bm.allocate(t, 100) and len(t.block_ids) == 3  # all or nothing
    bm.free_table(t)
    assert bm.num_free_blocks == 8


def test_prefix_cache_hit_leaves_one_token_and_survives_free():
    bm = BlockManager(8, BS)
    toks = list(range(12))  # 3 full blocks
    a = BlockTable()
    bm.allocate(a, 12)
    bm.commit(a, toks, 12)
    assert bm.lookup(toks) == a.block_ids[:2]  # the last block holds the token to recompute
    assert bm.lookup(toks + [99]) == a.block_ids[:3]
    assert bm.lookup([1] + toks[1:]) == []  # the key chains from the first block
    ids = list(a.block_ids)
    bm.free_table(a)
    b = BlockTable()
    cached = bm.lookup(toks + [5, 6])
    assert cached == ids and bm.allocate(b, 14, cached)  # revived from the free pool
    assert b.block_ids[:3] == ids and bm.num_free_blocks == 4


def test_eviction_prefers_uncached_then_lru():
    bm = BlockManager(4, BS)
    a, b = BlockTable(), BlockTable()
    bm.allocate(a, 4)
    bm.commit(a, [1, 2, 3, 4], 4)
    bm.allocate(b, 4)  # never committed
    bm.free_table(a)
    bm.free_table(b)
    c = BlockTable()
    bm.allocate(c, 12)  # takes 3 of the 4: the cached block must be the one left
    assert len(bm.lookup([1, 2, 3, 4, 0])) == 1


def test_fork_shares_full_blocks_only():
    bm = BlockManager(10, BS)
    a = BlockTable()
    bm.allocate(a, 10)
    f = bm.fork(a, 9)
    assert f.block_ids == a.block_ids[:2]
    assert [bm.ref[x] for x in a.block_ids] == [2, 2, 1]
    bm.free_table(a)
    assert [bm.ref[x] for x in f.block_ids] == [1, 1]
    bm.free_table(f)
    assert bm.num_free_blocks == 10


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free", "commit"]), st.integers(0, 1000),
                         st.integers(1, 12)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops, st.booleans(), st.integers(1, 3))
def test_random_operations_never_double_allocate(seq, caching, vocab_bits):
    """Random new / append / fork / commit / free: every block is held exactly by the tables
    that reference it, no block is both free and held, and everything comes back."""
    bm = BlockManager(16, BS, enable_prefix_caching=caching)
    tables: list[tuple[BlockTable, list[int]]] = []  # (table, tokens it holds)
    for op, pick, n in seq:
        if op == "new" or not tables:
            toks = [(pick + i) % (1 << vocab_bits) for i in range(n)]
            t = BlockTable()
            cached = bm.lookup(toks)
            if bm.allocate(t, len(toks), cached):
                tables.append((t, toks))
        else:
            i = pick % len(tables)
            t, toks = tables[i]
            if op == "append":
                more = toks + [pick % (1 << vocab_bits)] * n
                if bm.allocate(t, len(more)):
                    tables[i] = (t, more)
            elif op == "fork":
                f = bm.fork(t, len(toks))
                tables.append((f, toks[:len(f.block_ids) * BS]))
            elif op == "commit":
                bm.commit(t, toks, len(toks))
            else:
                bm.free_table(t)
                tables.pop(i)
        held: dict[int, int] = {}
        for t, toks in tables:
            assert len(t.block_ids) == bm.blocks_needed(len(toks)) or len(t.block_ids) * BS >= len(toks)
            for b in t.block_ids:
                held[b] = held.get(b, 0) + 1
        assert all(bm.ref[b] == c for b, c in held.items())
        assert not set(held) & set(bm.free)
        assert len(held) + bm.num_free_blocks == bm.num_blocks
    for t, _ in tables:
        bm.free_table(t)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref)
