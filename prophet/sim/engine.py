"""`SimCopyEngine`: the runtime's copy-engine interface over a modelled clock instead of a CUDA stream.

One copy queue, as on the GPU's side stream: copies run one after another on the link, each taking the
profile's fixed cost plus the *modelled* bytes over its bandwidth (the store's slabs are one element; the real
expert size is charged). The compute clock ``now`` belongs to the replay driver; `wait` moves it forward to a
copy's completion and counts the difference as stall. Without overlap every copy blocks the clock, as
`prophet.transfer.SyncCopyEngine` does.
"""

from __future__ import annotations

import torch

from prophet.hardware import HardwareProfile
from prophet.transfer import CopyEngine, Load


class SimCopyEngine(CopyEngine):
    """Modelled host->device link; ``now`` is the compute clock in seconds, set by the replay driver."""

    def __init__(self, profile: HardwareProfile | None, expert_bytes: int, overlap: bool = True) -> None:
        self.expert_bytes = expert_bytes
        self.seconds_per_copy = profile.copy_seconds(expert_bytes) if profile is not None else 0.0  # None: free
        self.overlap = overlap
        self.now = 0.0
        self.issue_at: float | None = None  # host time copies are issued at when it lags ``now`` (see replay)
        self.link_free = 0.0  # when the link finishes its last queued copy
        self.busy = 0.0  # link seconds spent copying
        self.copies = 0
        self._stall = 0.0
        self._reading: dict[int, float] = {}  # slot address -> end of the compute reading it

    def computing(self, pool: torch.Tensor, slots: list[int], until: float) -> None:
        """Compute reading ``slots`` of ``pool`` runs until ``until``: a copy into one of them starts after.

        The driver calls this before `release`: the end of the compute is what `CudaCopyEngine.released`
        learns from an event, and only the driver's cost model knows it here.
        """
        base, stride = pool.data_ptr(), pool.stride(0) * pool.element_size()  # pool [S, numel]
        for s in slots:
            self._reading[base + s * stride] = until

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> Load:
        reader_done = self._reading.pop(dst.data_ptr(), 0.0)
        issued = self.now if self.issue_at is None or not self.overlap else self.issue_at
        start = max(issued, self.link_free, reader_done)
        self.link_free = start + self.seconds_per_copy
        self.busy += self.seconds_per_copy
        self.copies += 1
        load = Load(slot=slot, nbytes=self.expert_bytes, done_at=self.link_free)
        if not self.overlap:
            self._advance(load.done_at)
        return load

    def done(self, load: Load) -> bool:
        return load.done_at <= self.now

    def mean_copy_ms(self) -> float | None:
        return self.seconds_per_copy * 1e3 if self.copies else None

    def wait(self, load: Load) -> None:
        self._advance(load.done_at)

    def finish(self, load: Load) -> None:
        self._advance(load.done_at)

    def stall_seconds(self) -> float:
        return self._stall

    def restart(self) -> None:
        """Zero the clock and the link: what was copied so far happened before the replay (`Runtime.settle`'s
        preload at wrap time), not during it."""
        self.now = self.link_free = self.busy = self._stall = 0.0
        self.issue_at = None
        self.copies = 0
        self._reading.clear()

    def _advance(self, t: float) -> None:
        """Block compute until ``t``: the gap is stall."""
        if t > self.now:
            self._stall += t - self.now
            self.now = t
