"""How expert slabs move from host to device: the one place that knows about streams and events.

Three engines share one interface so the cache and the prefetcher never branch on hardware:
- `CudaCopyEngine`: copies on a dedicated side stream, one event per load; the compute stream waits on a
  load's event only when it needs that slot, and a load into a slot waits for the last compute that read it.
- `SyncCopyEngine`: plain synchronous copies (CPU, or a GPU when asynchrony is unwanted).
- the replay simulator's engine (`prophet.sim`) advances a modelled clock instead of copying.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Load:
    """One host->device copy into a slot; ``event`` is set on CUDA, ``done_at`` by the simulator."""

    slot: int
    nbytes: int
    event: torch.cuda.Event | None = None
    done_at: float = 0.0
    meta: dict = field(default_factory=dict)


class CopyEngine:
    """Interface of a copy engine. Slots are named by their device tensor (its address is unique across pools)."""

    blocking = False  # copy() returns only once the copy is done: the host waits for every copy

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> Load:
        """Start copying ``src`` (host slab) into ``dst`` (device slot ``slot``)."""
        raise NotImplementedError

    def done(self, load: Load) -> bool:
        """True once the copy has finished, without blocking."""
        raise NotImplementedError

    def wait(self, load: Load) -> None:
        """Make the compute that follows see the copy (stream wait on CUDA; nothing when synchronous)."""

    def finish(self, load: Load) -> None:
        """Block the host until the copy is done (needed before evicting a slot that is still loading)."""

    def released(self, pool: torch.Tensor, slots: Sequence[int]) -> None:
        """Compute that reads ``slots`` of ``pool [S, numel]`` has been issued; a later copy into one of them
        must wait for it."""

    def stall_seconds(self) -> float:
        """Compute time lost waiting for copies so far (resolved lazily on CUDA)."""
        return 0.0

    def mean_copy_ms(self) -> float | None:
        """Mean duration of the copies finished so far, in ms (None before the first): the prefetcher's
        measured link cost."""
        return None


class SyncCopyEngine(CopyEngine):
    """Synchronous copies; the time a copy takes is stall, since nothing overlaps it."""

    blocking = True

    def __init__(self) -> None:
        self._stall = 0.0
        self._copies = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> Load:
        start = time.perf_counter()
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.current_stream(dst.device).synchronize()
        self._stall += time.perf_counter() - start
        self._copies += 1
        return Load(slot=slot, nbytes=src.numel() * src.element_size())

    def done(self, load: Load) -> bool:
        return True

    def stall_seconds(self) -> float:
        return self._stall

    def mean_copy_ms(self) -> float | None:
        return self._stall / self._copies * 1e3 if self._copies else None


class CudaCopyEngine(CopyEngine):
    """Asynchronous copies on a side stream; never synchronizes the compute stream with the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._slot_free: dict[int, torch.cuda.Event] = {}  # slot address -> last compute reading it
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall = 0.0
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # copies not yet measured
        self._copy_ms, self._copies = 0.0, 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> Load:
        free = self._slot_free.pop(dst.data_ptr(), None)
        with torch.cuda.stream(self.stream):
            if free is not None:
                self.stream.wait_event(free)
            start = torch.cuda.Event(enable_timing=True)  # after the wait: the copy's own time only
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
        self._timed.append((start, event))
        if len(self._timed) > 64:  # nobody asked lately: fold finished timings in, so the list stays short
            self.mean_copy_ms()
        return Load(slot=slot, nbytes=src.numel() * src.element_size(), event=event)

    def done(self, load: Load) -> bool:
        return load.event is None or load.event.query()

    def wait(self, load: Load) -> None:
        if load.event is None or load.event.query():
            return
        compute = torch.cuda.current_stream(self.device)
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(load.event)
        after.record(compute)
        self._stalls.append((before, after))

    def finish(self, load: Load) -> None:
        if load.event is not None:
            load.event.synchronize()

    def released(self, pool: torch.Tensor, slots: Sequence[int]) -> None:
        event = torch.cuda.Event(enable_timing=False)  # one event for the step's slots, keyed like copy()'s dst
        event.record(torch.cuda.current_stream(self.device))
        base, stride = pool.data_ptr(), pool.stride(0) * pool.element_size()
        for s in slots:
            self._slot_free[base + s * stride] = event

    def stall_seconds(self) -> float:
        pending = []
        for before, after in self._stalls:
            if after.query():
                self._stall += before.elapsed_time(after) / 1e3
            else:
                pending.append((before, after))
        self._stalls = pending
        return self._stall

    def mean_copy_ms(self) -> float | None:
        pending = []
        for start, end in self._timed:
            if end.query():
                self._copy_ms += start.elapsed_time(end)
                self._copies += 1
            else:
                pending.append((start, end))
        self._timed = pending
        return self._copy_ms / self._copies if self._copies else None
