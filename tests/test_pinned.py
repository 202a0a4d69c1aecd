"""The host store locks its layers at their exact size (torch's pinned allocator would round up to 2^n)."""

import io

import pytest
import torch

from prophet import pinned
from prophet.models.adapter import ExpertFormat
from prophet.store import HostStore

FMT = ExpertFormat(hidden_size=1024, intermediate_size=1024)  # 3 MiB per fp32 expert


class FakeCudart:
    """Records cudaHostRegister/Unregister calls; ``fail`` makes registration return a CUDA error code."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def fake(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: cudart.unregistered.append("sync"))
    monkeypatch.setattr(pinned, "EXACT_MIN_BYTES", 1 << 20)
    return cudart


def test_large_layers_are_registered_at_their_exact_size_and_unregistered_on_close(fake):
    store = HostStore(num_layers=2, num_experts=5, fmt=FMT, dtype=torch.float32, pin=True)  # 15 MiB a layer
    a, b = store.allocate(0), store.allocate(1)
    assert fake.registered == {a.data_ptr(): 5 * FMT.numel * 4, b.data_ptr(): 5 * FMT.numel * 4}
    assert store.allocate(0) is a  # allocated once
    store.write(0, 3, {k: torch.full(v, 2.0) for k, v in FMT.shapes.items()})
    store.close()
    assert fake.unregistered[0] == "sync"  # no copy may still read the memory when it is unlocked
    assert sorted(fake.unregistered[1:]) == sorted(fake.registered)
    assert torch.all(store.read(0, 3)["w1"] == 2.0)  # the memory outlives the lock
    store.close()
    assert len(fake.unregistered) == 3  # close is idempotent


def test_a_dropped_store_unlocks_its_memory(fake):
    store = HostStore(num_layers=1, num_experts=5, fmt=FMT, dtype=torch.float32, pin=True)
    ptr = store.allocate(0).data_ptr()
    del store
    assert fake.unregistered == ["sync", ptr]


def test_unpinned_stores_never_touch_cuda(fake):
    store = HostStore(num_layers=1, num_experts=5, fmt=FMT, dtype=torch.float32, pin=False)
    store.allocate(0)
    assert not fake.registered


def test_a_refused_registration_falls_back_to_torch_pinning(monkeypatch, fake):
    fake.fail = True
    calls = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        calls.append(kwargs.get("pin_memory", False))
        kwargs.pop("pin_memory", None)  # this CPU build cannot pin; record that it was asked to
        return real_empty(*args, **kwargs)

    cleared = []
    monkeypatch.setattr(pinned, "_clear_cuda_error", cleared.append)
    monkeypatch.setattr(torch, "empty", empty)
    with pytest.warns(RuntimeWarning, match="power of two"):
        t, registered = pinned.pinned_empty((5, FMT.numel), torch.float32)
    assert not registered and calls[-1] is True and t.shape == (5, FMT.numel)
    assert cleared == [2]  # the failed call's error is cleared, or torch would raise it at a later kernel


def test_an_uncleared_cuda_error_or_a_failed_fallback_is_a_capacity_error(monkeypatch, fake):
    from prophet.errors import CapacityError

    maps = "7f00-7f01 r-xp 0 0:0 0 /usr/lib/libc.so.6\n"
    monkeypatch.setattr(pinned, "open", lambda *a, **k: io.StringIO(maps), raising=False)
    with pytest.raises(CapacityError, match="pin_memory=False"):
        pinned._clear_cuda_error(2)  # no libcudart in the process: say so instead of failing later
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(pinned, "EXACT_MIN_BYTES", 1 << 40)
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(CapacityError, match="ulimit -l"):
        pinned.pinned_empty((5, FMT.numel), torch.float32)


@pytest.mark.gpu
def test_registered_store_is_pinned_and_copies_asynchronously():
    store = HostStore(num_layers=1, num_experts=8, fmt=ExpertFormat(4096, 4096), dtype=torch.bfloat16, pin=True)
    slab = store.allocate(0)  # 8 x 96 MiB: registered
    assert store._registered and slab.is_pinned()
    slab.normal_()
    dev = torch.empty_like(slab, device="cuda")
    dev.copy_(slab, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), slab)
    store.close()


@pytest.mark.gpu
def test_a_refused_registration_leaves_no_cuda_error_behind():
    t = torch.empty(16 << 20, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0)) == 0
    err = int(cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0))  # already registered: refused
    assert err != 0
    pinned._clear_cuda_error(err)
    x = torch.ones(4, device="cuda") * 2  # a kernel launch checks the last error: it must be clear
    torch.cuda.synchronize()
    assert x.sum().item() == 8
    pinned.unregister(t)
