"""The scoped caching CPU allocator (fastcount.inference.memory, csrc/cpu/memory_pool.cpp)."""
import threading

import pytest
import torch

from fastcount.inference import memory
from fastcount.inference.cpu import build
from fastcount.model import CountCeption
from fastcount.testing import randomize_bn

MB = 1 << 20


@pytest.fixture(autouse=True)
def _clean_pool():
    memory.release()
    limit = memory.stats()["limit"]
    yield
    memory.set_limit(limit)
    memory.release()


def test_default_limit_is_a_quarter_of_memory():
    import os

    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory.stats()["limit"] == phys // 4


def test_idle_cache_bounded_by_twice_the_working_set():
    import gc

    gc.collect()
    for _ in range(4):  # forget the working sets of earlier tests' scopes
        with memory.pooled():
            pass
    live = memory.stats()["live_bytes"]  # pooled tensors other tests still hold count as working set
    with memory.pooled():
        for i in range(1, 11):  # each freed before the next: working set 20 MB, 110 MB passed through
            t = torch.empty(2 * i * MB, dtype=torch.uint8)  # (sizes in whole 2 MiB pages: no reuse)
            del t
        assert memory.stats()["idle_bytes"] >= 110 * MB
    idle = memory.stats()["idle_bytes"]
    assert 0 < idle <= 2 * (20 * MB + live), idle
    # the newest blocks are the ones kept (the oldest go first)
    with memory.pooled():
        s0 = memory.stats()["hits"]
        t = torch.empty(20 * MB, dtype=torch.uint8)
        assert memory.stats()["hits"] == s0 + 1
        del t


def test_pool_is_built():
    # CI builds fastcount._C: the pool must be there (the backend's speed depends on it).
    assert memory.available()


def test_freed_block_is_reused_in_scope():
    with memory.pooled():
        a = torch.empty(3 * MB, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        s0 = memory.stats()
        assert s0["idle_bytes"] >= 3 * MB
        b = torch.empty(3 * MB, dtype=torch.uint8)
        assert b.data_ptr() == ptr
        assert memory.stats()["hits"] == s0["hits"] + 1
        b.fill_(7)
        assert int(b.sum()) == 7 * 3 * MB
        del b


def test_outside_scope_default_allocator_and_small_blocks_not_pooled():
    live = memory.stats()["live_bytes"]
    a = torch.empty(4 * MB, dtype=torch.uint8)  # no scope: PyTorch's allocator
    assert memory.stats()["live_bytes"] == live
    with memory.pooled():
        small = torch.empty(MB // 2, dtype=torch.uint8)  # under 1 MiB: default allocator too
        assert memory.stats()["live_bytes"] == live
        big = torch.empty(4 * MB, dtype=torch.uint8)
        assert memory.stats()["live_bytes"] >= live + 4 * MB
    del a, small
    # A pooled tensor may outlive its scope; freeing it returns it to the pool.
    big.fill_(1)
    del big
    assert memory.stats()["live_bytes"] == live
    assert memory.stats()["idle_bytes"] >= 4 * MB
    assert memory.stats()["depth"] == 0


def test_unused_sizes_trimmed_and_release_and_limit():
    with memory.pooled():
        torch.empty(5 * MB, dtype=torch.uint8)
    assert memory.stats()["idle_bytes"] >= 5 * MB
    for _ in range(5):  # scopes that never ask for that size again
        with memory.pooled():
            pass
    assert memory.stats()["idle_bytes"] == 0
    with memory.pooled():
        torch.empty(5 * MB, dtype=torch.uint8)
    memory.release()
    assert memory.stats()["idle_bytes"] == 0
    memory.set_limit(0)  # nothing kept: freed blocks go straight back to the OS
    with memory.pooled():
        torch.empty(5 * MB, dtype=torch.uint8)
    assert memory.stats()["idle_bytes"] == 0
    with pytest.raises(ValueError, match="nbytes"):
        memory.set_limit(-1)


def test_disabled_by_env_and_without_extension(monkeypatch):
    monkeypatch.setenv("FASTCOUNT_MEMORY_POOL", "0")
    assert not memory.available()
    with memory.pooled():
        assert memory.stats()["depth"] == 0
    monkeypatch.delenv("FASTCOUNT_MEMORY_POOL")
    monkeypatch.setattr(memory, "has_compiled_ops", lambda: False)
    assert not memory.available()
    with memory.pooled():
        torch.empty(4 * MB, dtype=torch.uint8)
    assert memory.stats() == {"idle_bytes": 0, "live_bytes": 0, "hits": 0, "misses": 0, "depth": 0, "limit": 0}


def test_nested_scope_and_exception_restore():
    with pytest.raises(KeyError):
        with memory.pooled():
            with memory.pooled():
                assert memory.stats()["depth"] == 2
                raise KeyError("boom")
    assert memory.stats()["depth"] == 0
    live = memory.stats()["live_bytes"]
    t = torch.empty(4 * MB, dtype=torch.uint8)
    assert memory.stats()["live_bytes"] == live  # the default allocator is back
    del t


def _model():
    torch.manual_seed(3)
    m = CountCeption(width=0.25)
    randomize_bn(m, seed=4)
    return m.eval()


def test_backend_same_result_with_and_without_pool_repeated():
    m = _model()
    x = torch.rand(2, 3, 61, 47) * 255
    plain = build(m, "fp32", reuse_memory=False)
    pooled = build(m, "fp32")
    ref = plain(x)
    for _ in range(3):  # later calls run on reused (dirty) blocks
        y = pooled(x)
        assert torch.equal(y, ref)
    assert memory.stats()["hits"] > 0
    with torch.inference_mode():
        eager = m(x)
    rel = float((y - eager).abs().max() / eager.abs().max())
    assert rel < 1e-4, rel
    with pytest.raises(ValueError, match="reuse_memory"):
        build(m, "fp32", reuse_memory="yes")


def test_backend_threads_share_the_pool():
    m = _model()
    be = build(m, "fp32", threads=1)
    xs = [torch.rand(1, 3, 50 + 7 * i, 64) * 255 for i in range(4)]
    refs = [build(m, "fp32", reuse_memory=False, threads=1)(x) for x in xs]
    out = [None] * len(xs)
    errors = []

    def work(i):
        try:
            for _ in range(3):
                out[i] = be(xs[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for y, r in zip(out, refs):
        assert torch.equal(y, r)
    assert memory.stats()["depth"] == 0


def test_compile_passes_reuse_memory_and_rejects_unknown_options():
    from fastcount.inference import compile as fc_compile

    m = _model()
    assert fc_compile(m, backend="cpu", reuse_memory=False).reuse_memory is False
    assert fc_compile(m, backend="cpu").reuse_memory is True
    with pytest.raises(TypeError, match="no options"):
        fc_compile(m, backend="eager", reuse_memory=False)
    with pytest.raises(TypeError):
        fc_compile(m, backend="cpu", reuse_memroy=False)


def test_best_fit_and_cap_keeps_the_blocks_it_has():
    with memory.pooled():
        a = torch.empty(4 * MB, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        b = torch.empty(3 * MB, dtype=torch.uint8)  # a 4 MB block serves up to 1.5x the request
        assert b.data_ptr() == ptr
        del b
        s0 = memory.stats()
        c = torch.empty(2 * MB, dtype=torch.uint8)  # 4 MB is more than 1.5x 2 MB: fresh block
        assert memory.stats()["misses"] == s0["misses"] + 1 and c.data_ptr() != ptr
        del c
    memory.release()
    memory.set_limit(5 * MB)
    with memory.pooled():
        x, y = torch.empty(4 * MB, dtype=torch.uint8), torch.empty(4 * MB, dtype=torch.uint8)
        px = x.data_ptr()
        del x, y  # the first returned stays, the second would pass the cap and is freed
        assert memory.stats()["idle_bytes"] == 4 * MB
        z = torch.empty(4 * MB, dtype=torch.uint8)
        assert z.data_ptr() == px
