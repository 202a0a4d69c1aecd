"""The compiled batch-1 path-matching kernel (``prophet/pathmatch.c``) bound to a `PathMatchPredictor`'s arrays.

At batch 1 the predictor's numpy fast path is ~25 calls per layer at ~0.5 us each; the kernel does a layer's
observe + neighbour pick in one call, all of its scores in another, and a token's store + carry in two more.
The state stays in the predictor's numpy arrays, so the reference paths read the same memory; only the
similarity vector lives in a double buffer here (this token's and the previous token's, which the carry reads).
Addresses are fetched once per array (numpy's ``.ctypes.data`` costs ~2 us), kept in one int64 parameter block.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import numpy as np

from prophet import native
from prophet.errors import ConfigError

if TYPE_CHECKING:
    from prophet.predict.pathmatch import PathMatchPredictor

# The kernel's fixed buffers: at most this many neighbours and experts per layer.
MAX_NEIGHBOURS, MAX_EXPERTS = 256, 1024
# Slots of the parameter block (prophet/pathmatch.c states what each holds).
(_MEM, _L, _E, _CAP, _M, _SIM, _SUCC, _PRED, _TOP, _W, _N, _FOUND, _PRIOR_VOTES, _OUT, _IDS, _DIST, _TOK, _USES,
 _STEPS, _FREQ, _ROWIDS, _K1) = range(22)


def library() -> ctypes.CDLL | None:
    """``prophet/pathmatch.c`` compiled (`prophet.native`), or None: the numpy paths run instead.

    No argtypes: a call with them converts every argument (~0.8 us a call against ~0.5 us); pointers go as
    ready `ctypes.c_void_p` objects and small numbers as Python ints, which ctypes passes as C ints."""
    lib = native.library("pathmatch")
    if lib is not None:
        for f in (lib.prophet_pm_scores, lib.prophet_pm_carry):
            f.restype = None  # observe returns a C int (1: an id is not an expert), store too (1: sparse view lost)
    return lib


class PathMatchKernel:
    """The kernel's buffers and calls for one predictor ``p`` (made by `for_predictor`)."""

    def __init__(self, lib: ctypes.CDLL, p: PathMatchPredictor) -> None:
        L, E = p.num_layers, p.num_experts
        self.lib = lib
        self.params = np.zeros(22, np.int64)  # the parameter block
        self.floats = np.array([p.decay, p.power, p.prior, p.carry], np.float64)
        self.top = np.zeros(max(1, p.neighbours), np.int64)  # [n] neighbour rows, written by the kernel
        self.w = np.zeros(max(1, p.neighbours), np.float32)  # [n] their weights
        self.ids = np.zeros(max(p.top_k, E), np.int64)  # [k] a layer's experts when k > 2
        self.tok = np.zeros((L, E + 1), np.float32)  # [L, E+1] the current token's column
        self.p_addr = ctypes.c_void_p(self.params.ctypes.data)
        self.f_addr = ctypes.c_void_p(self.floats.ctypes.data)
        self.observe_call, self.scores_call = lib.prophet_pm_observe, lib.prophet_pm_scores
        for slot, arr in ((_TOP, self.top), (_W, self.w), (_IDS, self.ids), (_TOK, self.tok)):
            self.params[slot] = arr.ctypes.data
        self.params[[_L, _E, _N]] = L, E, p.neighbours
        self.dists: dict[int, tuple] = {}  # id -> (distances, their int64 copy, its address, out[:D])
        self.out = np.zeros((0, E))  # [D, E] scores, written by the kernel
        self.bound: tuple | None = None  # the arrays whose addresses the block holds (None: bind again)
        self.simbuf = np.zeros((2, 0), np.float32)  # [2, capacity]: this token's similarities and the last's
        self.sim_addr = (0, 0)
        self.cur = 0  # the half of simbuf that is this token's
        self.view: np.ndarray | None = None  # p.sim when it is simbuf[cur, :m]
        self.picked = -1  # the predictor version whose neighbours the kernel holds
        self.carry_on = bool(p.carry)
        self.room(2 * L)

    @staticmethod
    def for_predictor(p: PathMatchPredictor) -> PathMatchKernel | None:
        """The kernel for ``p``, or None when it is off, cannot be built, or ``p`` exceeds its buffers."""
        if p.neighbours > MAX_NEIGHBOURS or p.num_experts > MAX_EXPERTS:
            return None
        lib = library()
        return None if lib is None else PathMatchKernel(lib, p)

    # ---- binding ---------------------------------------------------------------------------------------------
    def room(self, d: int) -> None:
        """Room to score ``d`` distances in one call."""
        if d > len(self.out):
            self.out = np.zeros((2 * d, self.out.shape[1]))
            self.params[_OUT] = self.out.ctypes.data
            self.dists.clear()  # their views of the old buffer

    def bind(self, p: PathMatchPredictor) -> None:
        """Point the block at ``p``'s memory, links and frequencies (after any was replaced or resized), and at
        its sparse row ids while it keeps them (else 0: the scores read the dense memory)."""
        arrays = (p.mem, p.succ, p.pred, p.prior_votes, p.uses, p.steps, p.freq)
        for slot, arr in zip((_MEM, _SUCC, _PRED, _PRIOR_VOTES, _USES, _STEPS, _FREQ), arrays, strict=True):
            assert arr.flags.c_contiguous
            self.params[slot] = arr.ctypes.data
        ids = p.row_ids
        assert ids is None or (ids.flags.c_contiguous and ids.shape[1] == p.mem.shape[2])
        self.params[_ROWIDS], self.params[_K1] = (0, 0) if ids is None else (ids.ctypes.data, ids.shape[2])
        self.params[_CAP] = p.mem.shape[2]
        self.bound = (*arrays, ids)  # held, so no bound address is freed while the kernel may read it

    def _place(self, p: PathMatchPredictor, half: int) -> np.ndarray:
        """Make simbuf[half, :size] ``p``'s similarity vector (not filled here)."""
        if self.simbuf.shape[1] < p.mem.shape[2]:
            self.simbuf = np.zeros((2, p.mem.shape[2]), np.float32)
            base = self.simbuf.ctypes.data
            self.sim_addr = (base, base + 4 * self.simbuf.shape[1])
        self.cur = half
        self.view = p.sim = self.simbuf[half : half + 1, : p.size]
        self.params[_SIM], self.params[_M] = self.sim_addr[half], p.size
        return self.view

    def ready(self, p: PathMatchPredictor) -> bool:
        """True when ``p``'s batch-1 state is where the kernel reads it (moved there if it was not)."""
        if self.bound is not None and p.sim is self.view:
            return True
        if p.sim.shape != (1, p.size):
            return False
        if self.bound is None:
            self.bind(p)
        if p.sim is not self.view:
            old = p.sim
            self._place(p, self.cur)[:] = old
        return True

    def restore(self, path: list[list[int] | None]) -> None:
        """Rebuild the token's column from its path (after a copy: the column does not travel)."""
        for layer, row in enumerate(path):
            if row is not None:
                self.tok[layer, row] = 1.0
                self.tok[layer, -1] = 1.0

    # ---- calls -----------------------------------------------------------------------------------------------
    def observe(self, layer: int, row: list[int], version: int) -> None:
        """``sim = sim * decay + this layer's matches``; the neighbours picked; the layer kept for the store."""
        k = len(row)
        if k == 2:
            bad = self.observe_call(self.p_addr, self.f_addr, layer, 2, row[0], row[1])
        else:
            if k > 2:
                self.ids[:k] = row
            bad = self.observe_call(self.p_addr, self.f_addr, layer, k, row[0] if k else 0, 0)
        if bad:
            raise ConfigError(f"layer {layer} routed to experts {row}, but the predictor was built for "
                              f"{self.out.shape[1]} experts per layer: build it with the model's num_experts")
        self.picked = version

    def pick(self, version: int) -> None:
        """The neighbours of the similarities as they are (scores asked before any observation)."""
        if self.picked != version:
            self.observe_call(self.p_addr, self.f_addr, -1, 0, 0, 0)
            self.picked = version

    def neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.params[_FOUND])
        return self.top[:n].copy(), self.w[:n].copy()

    def scores(self, layer: int, distances: np.ndarray, version: int) -> list[list[float]]:
        """``[D][E]`` scores at ``distances`` from ``layer`` (the predictor's `_score_lists`)."""
        return self._run(layer, distances, version).tolist()

    def score_array(self, layer: int, distances: np.ndarray, version: int) -> np.ndarray:
        """`scores` as a fresh ``[D, E]`` array (the predictor's `_scores`: no round trip through lists)."""
        return self._run(layer, distances, version).copy()

    def _run(self, layer: int, distances: np.ndarray, version: int) -> np.ndarray:
        """Score ``distances`` into the out buffer; its ``[D, E]`` view (overwritten by the next call)."""
        if self.picked != version:
            self.pick(version)
        look = self.dists.get(id(distances))
        if look is None or look[0] is not distances:  # once per distances array (`predict` reuses its plans)
            d = len(distances)
            self.room(d)
            if len(self.dists) >= 4096:
                self.dists.clear()
            copy = np.ascontiguousarray(distances, np.int64)
            look = self.dists[id(distances)] = (distances, copy, ctypes.c_void_p(copy.ctypes.data), d,
                                                self.out[:d])
        self.scores_call(self.p_addr, self.f_addr, layer, look[3], look[2])
        return look[4]

    def store(self, p: PathMatchPredictor) -> None:
        """Write the finished token's column as memory row ``p.size`` (``p`` made room) and link it; a column
        the sparse ids cannot hold (`PathMatchPredictor.row_ids`) turns them off."""
        if self.bound is None:
            self.bind(p)
        self.params[_M] = p.size
        if self.lib.prophet_pm_store(self.p_addr, self.f_addr, p._last_row):
            p.row_ids = None
            self.bound = None

    def carry(self, p: PathMatchPredictor) -> None:
        """A new batch-1 token: its similarities start as ``carry`` times the last token's, through ``pred``."""
        old = p.sim
        if old is self.view:  # the last token's half (its buffer kept alive by the view until the call ends)
            old_addr, old_m = self.sim_addr[self.cur], old.shape[1]
        elif old.shape[0] == 1 and old.shape[1]:
            old = np.ascontiguousarray(old)
            old_addr, old_m = old.ctypes.data, old.shape[1]
        else:
            old_addr, old_m = 0, 0
        if self.bound is None:
            self.bind(p)
        self._place(p, 1 - self.cur)  # a grown simbuf leaves the old one alive while ``old`` holds it
        self.lib.prophet_pm_carry(self.p_addr, self.f_addr, ctypes.c_void_p(old_addr), old_m if self.carry_on else 0)
