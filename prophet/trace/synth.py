"""Synthetic router traces for models nobody recorded, driven by statistics fitted on real traces.

The generative model is a conditional logit per MoE layer l: a token's K experts are K draws without
replacement (Plackett-Luce) from softmax(score) with

    score(e) = log popularity_l(e) + b_cross,l * mean_{i in A} PMI_l(i, e) + b_time,l * 1[e in B]

where A is this token's experts at layer l-1, B the previous token's experts at layer l (same sequence) and
``PMI_l(i, e) = log T_l(i, e) / popularity_l(e)`` with ``T_l`` the layer l-1 -> l transition matrix
(row-normalized co-occurrence counts, smoothed toward popularity). The two coefficients per layer are fitted
by maximum likelihood (Newton's method) on the source trace, taking each token's listed order as its draw
order; a feature with no context (first layer, first token) contributes nothing. ``b_time`` is the log-odds
boost of reusing an expert of the previous token: the temporal reuse statistic. Router weights are a
symmetric Dirichlet over the K picks (sorted, largest to the first pick) times a Beta-distributed total,
both fitted per layer by the method of moments.

Other shapes (`SynthParams.adapt`): layers are resampled by relative depth (target layer l uses source layer
round(l*(Ls-1)/(L-1))); a different expert count keeps each layer's popularity *rank profile* (sorted
popularity interpolated in log space over rank quantiles, assigned to experts by a seeded permutation) and
the cross-layer information (pop-weighted KL of transition rows from popularity, divided by log E) by
drawing random transition rows ``pop * exp(sigma * z)`` with sigma solved to match, then balancing them so
layer l-1's popularity flows into layer l's; a different top-k keeps the coefficients (the cross-layer
feature is a mean over A, so its scale does not grow with K) and the per-pick Dirichlet concentration. Generated tokens are marked as decode.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from prophet.errors import TraceError
from prophet.trace import stats
from prophet.trace.format import Phase, Trace, TraceModel

FEATURES = ("cross_layer", "temporal", "within_layer")  # the columns of SynthParams.coef
BUILTIN = {
    "mixtral-8x7b": "mixtral-8x7b.npz",
    "flame-moe-290m": "flame-moe-290m.npz",
    "tiny-mixtral": "tiny-mixtral.npz",
}
REAL = ("mixtral-8x7b", "flame-moe-290m")  # fitted on trained models: the ones `for_shape` picks from
_SMOOTH = 1.0  # pseudo-count pulling each transition row toward the layer's popularity
_ARRAY_FIELDS = ("popularity", "logit", "transition", "within", "coef", "weight_conc", "weight_total")


@dataclass(frozen=True)
class SynthParams:
    """Fitted generator parameters (L layers, E experts, source top-k K); small enough to ship as data."""

    name: str
    source: str
    top_k: int
    popularity: np.ndarray  # [L, E] float, rows sum to 1
    transition: np.ndarray  # [L-1, E, E] float, rows sum to 1: expert at layer l -> expert at layer l+1
    within: np.ndarray  # [L, E, E] float, rows sum to 1: expert i in a token's set -> another expert e in it
    logit: np.ndarray  # [L, E] per-expert score intercepts
    coef: np.ndarray  # [L, 3] score coefficients of FEATURES
    weight_conc: np.ndarray  # [L] symmetric Dirichlet concentration of the K router weights
    weight_total: np.ndarray  # [L, 2] mean and std of the sum of a token's K router weights
    source_stats: dict[str, Any] = field(
        default_factory=dict
    )  # statistics of the source (validation targets)

    @property
    def num_layers(self) -> int:
        return int(self.popularity.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.popularity.shape[1])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as one compressed ``.npz`` of float arrays plus a JSON string (no pickle)."""
        meta = {
            "name": self.name,
            "source": self.source,
            "top_k": self.top_k,
            "source_stats": self.source_stats,
        }
        p = Path(path)
        np.savez_compressed(
            p,
            meta=np.array(json.dumps(meta, sort_keys=True)),
            popularity=self.popularity.astype(np.float32),
            transition=self.transition.astype(np.float16),  # E x E tables dominate the size; 3 digits suffice
            within=self.within.astype(np.float16),
            logit=self.logit.astype(np.float32),
            coef=self.coef.astype(np.float32),
            weight_conc=self.weight_conc.astype(np.float32),
            weight_total=self.weight_total.astype(np.float32),
        )
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SynthParams:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k].astype(np.float64) for k in _ARRAY_FIELDS}
        except (OSError, ValueError, KeyError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
            raise TraceError(f"{path}: not a readable synthetic-trace parameter file ({exc})") from exc
        return cls(
            name=meta["name"],
            source=meta["source"],
            top_k=meta["top_k"],
            source_stats=meta["source_stats"],
            **arrays,
        )

    def adapt(
        self, num_layers: int, num_experts: int, top_k: int, seed: int = 0, calibrate_rounds: int = 2
    ) -> SynthParams:
        """These statistics carried over to another shape (see the module docstring for how)."""
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise TraceError(f"cannot adapt to L={num_layers}, E={num_experts}, K={top_k}: need 1 <= K <= E")
        if (num_layers, num_experts, top_k) == (self.num_layers, self.num_experts, self.top_k):
            return self
        ls, e = self.num_layers, num_experts
        # [L] source layer of each target layer, by relative depth
        src = np.round(np.arange(num_layers) * (ls - 1) / max(num_layers - 1, 1)).astype(int)
        into = np.clip(src, 1, None) - 1  # [L] source transition feeding each target layer (for layers >= 1)
        rng = np.random.default_rng(seed)
        if e == self.num_experts:
            pop, logit, within = self.popularity[src], self.logit[src], self.within[src]
            trans = [
                _balance(self.transition[into[i]], pop[i - 1], pop[i]) if ls > 1 else np.tile(pop[i], (e, 1))
                for i in range(1, num_layers)
            ]
        else:
            pop = np.stack([_rank_profile(self.popularity[s], e, rng) for s in src])
            logit = np.log(pop)
            scale = np.log(e) / np.log(self.num_experts)  # information is kept relative to its maximum, log E
            info_t = [
                _information(self.popularity[i], self.popularity[i + 1], t) * scale
                for i, t in enumerate(self.transition)
            ]
            info_w = [
                _information(p, p, w) * scale for p, w in zip(self.popularity, self.within, strict=True)
            ]
            trans = [
                _random_transition(pop[i - 1], pop[i], info_t[into[i]], rng)
                if ls > 1
                else np.tile(pop[i], (e, 1))
                for i in range(1, num_layers)
            ]
            within = np.stack(
                [_random_transition(pop[i], pop[i], info_w[src[i]], rng) for i in range(num_layers)]
            )
        params = SynthParams(
            name=f"{self.name}->{num_layers}x{e}k{top_k}",
            source=self.source,
            top_k=top_k,
            popularity=pop,
            transition=np.stack(trans).reshape(num_layers - 1, e, e),
            within=within,
            logit=logit,
            coef=self.coef[src],
            weight_conc=self.weight_conc[src],
            weight_total=self.weight_total[src],
        )
        return _calibrate(params, None, rounds=calibrate_rounds, seed=seed)


# -- adaptation helpers ------------------------------------------------------------------------------------


def _rank_profile(pop: np.ndarray, e: int, rng: np.random.Generator) -> np.ndarray:
    """[e] popularity with the same sorted shape as ``pop`` (interpolated over rank quantiles), shuffled."""
    srt = np.sort(pop)[::-1]
    u_src = (np.arange(len(srt)) + 0.5) / len(srt)
    u_dst = (np.arange(e) + 0.5) / e
    prof = np.exp(np.interp(u_dst, u_src, np.log(np.maximum(srt, 1e-12))))
    return rng.permutation(prof / prof.sum())


def _information(src_pop: np.ndarray, dst_pop: np.ndarray, rows: np.ndarray) -> float:
    """sum_i src_pop(i) KL(rows(i, .) || dst_pop) in nats: how much knowing expert i tells about the other."""
    kl = (rows * np.log(np.maximum(rows, 1e-12) / np.maximum(dst_pop, 1e-12)[None, :])).sum(1)
    return float((src_pop * kl).sum())


def _balance(t: np.ndarray, src_pop: np.ndarray, dst_pop: np.ndarray, iters: int = 20) -> np.ndarray:
    """Scale columns and rows (Sinkhorn) so rows sum to 1 and src_pop @ t == dst_pop."""
    for _ in range(iters):
        t = t * (dst_pop / np.maximum(src_pop @ t, 1e-12))[None, :]
        t = t / t.sum(1, keepdims=True)
    return t


def _random_transition(
    src_pop: np.ndarray, dst_pop: np.ndarray, target: float, rng: np.random.Generator
) -> np.ndarray:
    """[E, E] random transition rows ``dst_pop * exp(sigma * z)`` whose `_information` is about ``target`` nats
    (sigma by bisection before balancing, which changes the information only a little)."""
    z = rng.standard_normal((len(src_pop), len(dst_pop)))

    def rows(sigma: float) -> np.ndarray:
        t = dst_pop[None, :] * np.exp(sigma * z)
        return t / t.sum(1, keepdims=True)

    lo, hi = 0.0, 8.0
    for _ in range(25):  # information grows with sigma: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _information(src_pop, dst_pop, rows(mid)) < target else (lo, mid)
    return _balance(rows((lo + hi) / 2), src_pop, dst_pop)


# -- fitting -----------------------------------------------------------------------------------------------


def _complete_rows(trace: Trace) -> np.ndarray:
    """[N, L] True where all K experts were recorded."""
    return (np.asarray(trace.experts) >= 0).all(-1)


def _all_exact(trace: Trace) -> Trace:
    """The trace with every row treated as aligned (what `fit` assumes)."""
    return Trace(trace.model, trace.experts, trace.weights, trace.seq_offsets, validate=False)


def _log_ratio(rows: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """log(rows / pop) with pop broadcast over the last axis: a PMI table from row-normalized counts."""
    return np.log(np.maximum(rows, 1e-12)) - np.log(np.maximum(pop, 1e-12))


def _normalize_counts(counts: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """Row-normalize co-occurrence counts ``[..., E, E]``, smoothed toward ``pop [..., E]``."""
    return (counts + _SMOOTH * pop[..., None, :]) / (counts.sum(-1, keepdims=True) + _SMOOTH)


def within_counts(trace: Trace) -> np.ndarray:
    """[L, E, E] tokens whose top-k set holds both i and e (i != e) at each layer."""
    L, E = trace.num_layers, trace.num_experts
    out = np.zeros((L, E, E), np.int64)
    for layer in range(L):
        occ = stats.occupancy(trace, layer).astype(np.int64)  # [N, E]
        out[layer] = occ.T @ occ
        np.fill_diagonal(out[layer], 0)
    return out


def fit(
    trace: Trace,
    name: str,
    source: str | None = None,
    max_rows: int = 8000,
    calibrate_rounds: int = 2,
    seed: int = 0,
) -> SynthParams:
    """Fit generator parameters to ``trace`` (at most ``max_rows`` tokens per layer for the coefficients),
    then `_calibrate` the intercepts over ``calibrate_rounds`` rounds of generation.

    Cross-layer counts use every recorded row: a converted trace's inexact rows are approximately aligned,
    and some of its layers have no exact rows at all.
    """
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    ex = np.asarray(trace.experts).astype(np.int64)  # [N, L, K]
    ok = _complete_rows(trace)  # [N, L]
    n_sel = ok.sum(0)[:, None] * K
    pop = (stats.popularity(trace) * n_sel + 0.5) / (n_sel + 0.5 * E)  # [L, E] add-half smoothing
    trans = _normalize_counts(stats.cooccurrence(_all_exact(trace), 1), pop[1:])  # [L-1, E, E]
    within = _normalize_counts(within_counts(trace), pop)  # [L, E, E]
    seq = trace.sequence_ids()
    has_prev = np.zeros(len(trace), bool)
    has_prev[1:] = seq[1:] == seq[:-1]
    rng = np.random.default_rng(seed)
    coef = np.zeros((L, len(FEATURES)))
    logit = np.log(pop)
    for layer in tqdm(range(L), desc=f"fit {name}", unit=" layer", leave=False):
        rows = ok[:, layer] & has_prev & np.roll(ok[:, layer], 1)
        if layer > 0:
            rows &= ok[:, layer - 1]
        idx = np.flatnonzero(rows)
        if len(idx) > max_rows:
            idx = np.sort(rng.choice(idx, max_rows, replace=False))
        x = np.zeros((len(idx), E, 2))  # [n, E, 2] features that do not change between picks
        if layer > 0:
            x[..., 0] = _log_ratio(trans[layer - 1], pop[layer])[ex[idx, layer - 1]].mean(1)
        np.put_along_axis(x[..., 1], ex[idx - 1, layer], 1.0, axis=1)
        pw = _log_ratio(within[layer], pop[layer])
        logit[layer], coef[layer] = _fit_plackett_luce(x, pw, ex[idx, layer], init=np.log(pop[layer]))
    conc, total = _fit_weights(trace, ok)
    params = SynthParams(
        name=name,
        source=source or trace.model.name,
        top_k=K,
        popularity=pop,
        logit=logit,
        transition=trans,
        within=within,
        coef=coef,
        weight_conc=conc,
        weight_total=total,
    )
    reuse = np.nan_to_num(stats.reuse_rate(trace, 1), nan=0.0)
    params = _calibrate(params, reuse, rounds=calibrate_rounds, seed=seed)
    src_stats = {
        "tokens": len(trace),
        "entropy_normalized": stats.entropy(trace, normalized=True).round(4).tolist(),
        "reuse_rate": stats.reuse_rate(trace, 1).round(4).tolist(),
        "popularity": stats.popularity(trace).round(5).tolist(),
        "next_layer_recall": np.round(stats.next_layer_recall(_all_exact(trace)), 4).tolist(),
    }
    return replace(params, source_stats=src_stats)


def _logodds(p: np.ndarray, floor: float) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1 (a rate measured on a finite sample can hit either)."""
    q = np.clip(np.nan_to_num(p, nan=0.5), floor, 1 - floor)
    return np.log(q / (1 - q))


def _calibrate(
    params: SynthParams,
    reuse: np.ndarray | None,
    rounds: int,
    seed: int,
    num_sequences: int = 128,
    seq_len: int = 32,
) -> SynthParams:
    """Shift the intercepts and the temporal coefficient until generated popularity and (when given) reuse
    rate ``reuse [L]`` match the source's. Maximum likelihood matches them on the source's own contexts, but generated
    contexts differ a little and the difference compounds over depth and time. Many short sequences keep
    the simulation cheap: generation is sequential in time but vectorized over sequences."""
    for r in range(rounds):
        gen = generate(params, num_sequences, seq_len, seed=seed + 1 + r, progress=False)
        floor = 0.5 / (len(gen) * params.top_k)
        got = stats.popularity(gen)
        logit = params.logit + np.log(params.popularity) - np.log(np.maximum(got, floor))
        coef = params.coef.copy()
        if reuse is not None:
            coef[:, 1] += _logodds(reuse, floor) - _logodds(stats.reuse_rate(gen, 1), floor)
        params = replace(params, logit=logit - logit.max(1, keepdims=True), coef=coef)
    return params


def _stage_features(x: np.ndarray, pw: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """[n, E, 3]: the fixed features ``x [n, E, 2]`` plus the mean within-layer PMI ``pw [E, E]`` of the
    experts ``picked [n, k]`` so far (0 before the first pick)."""
    within = pw[picked].mean(1) if picked.shape[1] else np.zeros(x.shape[:2])
    return np.concatenate([x, within[..., None]], axis=-1)


def _fit_plackett_luce(
    x: np.ndarray, pw: np.ndarray, picks: np.ndarray, init: np.ndarray, iters: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert intercepts a [E] and coefficients b [3] maximising the Plackett-Luce likelihood of the
    ordered ``picks [n, K]`` under ``score_k = a + _stage_features(x, pw, picks[:, :k]) @ b`` (Newton's
    method; the log-likelihood is concave). Free intercepts make the expected expert counts match the
    observed ones, so the features shape *which* expert is picked, not each expert's overall share."""
    n, e = x.shape[:2]
    f = len(FEATURES)
    a, b = init.astype(np.float64).copy(), np.zeros(f)
    if n == 0:
        return a, b
    ar = np.arange(n)
    stages = [_stage_features(x, pw, picks[:, :k]) for k in range(picks.shape[1])]  # K x [n, E, F]
    for _ in range(iters):
        avail = np.ones((n, e), bool)
        g_a, g_b = np.zeros(e), np.zeros(f)
        h_aa, h_ab, h_bb = np.zeros((e, e)), np.zeros((e, f)), np.zeros((f, f))
        for k, xk in enumerate(stages):
            sm = np.where(avail, a[None, :] + xk @ b, -np.inf)
            p = np.exp(sm - sm.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)  # [n, E]
            px = p[..., None] * xk  # [n, E, F]
            mean_x = px.sum(1)  # [n, F]
            g_a += np.bincount(picks[:, k], minlength=e) - p.sum(0)
            g_b += (xk[ar, picks[:, k]] - mean_x).sum(0)
            h_aa += np.diag(p.sum(0)) - p.T @ p
            h_ab += px.sum(0) - p.T @ mean_x
            h_bb += px.reshape(-1, f).T @ xk.reshape(-1, f) - mean_x.T @ mean_x
            avail[ar, picks[:, k]] = False
        hess = np.block([[h_aa, h_ab], [h_ab.T, h_bb]]) + 1e-6 * np.eye(e + f)  # negated Hessian (PSD)
        hess[0, :] = 0.0
        hess[:, 0] = 0.0
        hess[0, 0] = 1.0  # intercepts are defined up to a constant: pin a[0]
        grad = np.concatenate([g_a, g_b])
        grad[0] = 0.0
        step = np.linalg.solve(hess, grad)
        a, b = a + step[:e], b + step[e:]
        if np.abs(step).max() < 1e-4:
            break
    return a - a.max(), b


def _fit_weights(trace: Trace, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: symmetric Dirichlet concentration matching the mean top-1 share, and (mean, std) of totals."""
    L, K = trace.num_layers, trace.top_k
    w = np.asarray(trace.weights, dtype=np.float64)
    conc = np.ones(L)
    total = np.zeros((L, 2))
    rng = np.random.default_rng(0)
    grid = np.geomspace(0.05, 200, 60)
    draws = {c: np.sort(rng.dirichlet(np.full(K, c), 4000), 1)[:, -1].mean() for c in grid} if K > 1 else {}
    for layer in range(L):
        rows = w[ok[:, layer], layer]  # [n, K]
        sums = rows.sum(1)
        total[layer] = (sums.mean(), sums.std()) if len(rows) else (1.0, 0.0)
        if K > 1 and len(rows):
            top1 = (rows.max(1) / np.maximum(sums, 1e-12)).mean()
            conc[layer] = min(grid, key=lambda c: abs(draws[c] - top1))
    return conc, total


# -- generation --------------------------------------------------------------------------------------------


def generate(
    params: SynthParams,
    num_sequences: int,
    tokens_per_sequence: int | list[int],
    *,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> Trace:
    """A trace of ``num_sequences`` sequences drawn from ``params`` (shape: params' L, E and top-k).

    Token t at layer l depends on (t, l-1) and (t-1, l) only, so every cell of one anti-diagonal t + l is drawn
    at once (`_draw_diagonal`): T + L - 1 sequential rounds instead of T x L. Each cell sees the same float
    operations and random numbers as the cell-by-cell `generate_reference`, so the trace is bit-identical.
    """
    lengths = _lengths(num_sequences, tokens_per_sequence)
    L, K = params.num_layers, params.top_k
    rng = np.random.default_rng(seed)
    s, tmax = num_sequences, int(lengths.max())
    experts = np.zeros((s, tmax, L, K), np.int16)
    uniform, weights = _draws(params, rng, s, tmax)
    tables = _tables(params)
    for d in tqdm(range(tmax + L - 1), desc="synthesize", unit=" diag", disable=not progress, leave=False):
        _draw_diagonal(params, tables, experts, uniform, d)
    return _assemble(params, experts, weights, lengths, seed, name)


def generate_reference(
    params: SynthParams, num_sequences: int, tokens_per_sequence: int | list[int], *, seed: int = 0,
    name: str | None = None,
) -> Trace:
    """`generate` cell by cell, token by token and layer by layer: the plain loop the fast path must equal."""
    lengths = _lengths(num_sequences, tokens_per_sequence)
    L, E, K = params.num_layers, params.num_experts, params.top_k
    rng = np.random.default_rng(seed)
    s, tmax = num_sequences, int(lengths.max())
    experts = np.zeros((s, tmax, L, K), np.int16)
    weights = np.zeros((s, tmax, L, K), np.float32)
    rows = np.arange(s)
    cross, within = _tables(params)
    b_cross, b_time, b_within = params.coef.T  # [L] each
    for t in range(tmax):
        uniform = 1.0 - rng.random((L, K, s, 1))  # in (0, 1]: never lands on a masked (zero) entry
        for layer in range(L):
            base = np.broadcast_to(params.logit[layer], (s, E)).copy()  # [s, E] score before any pick
            if layer > 0:
                base += b_cross[layer] * cross[layer - 1][experts[:, t, layer - 1]].mean(1)
            if t > 0:
                np.add.at(base, (rows[:, None], experts[:, t - 1, layer]), b_time[layer])
            wsum = np.zeros((s, E))  # within-layer PMI summed over this token's picks so far
            for k in range(K):  # sequential Plackett-Luce draws by inverse CDF of softmax(score)
                score = base + (b_within[layer] / k) * wsum if k else base
                prob = np.exp(score - score.max(1, keepdims=True))
                prob[rows[:, None], experts[:, t, layer, :k]] = 0.0
                cdf = np.cumsum(prob, 1)
                pick = np.minimum((cdf < uniform[layer, k] * cdf[:, -1:]).sum(1), E - 1)
                experts[:, t, layer, k] = pick
                wsum += within[layer][pick]
        weights[:, t] = _draw_weights(params, rng, s)
    return _assemble(params, experts, weights, lengths, seed, name)


def _lengths(num_sequences: int, tokens_per_sequence: int | list[int]) -> np.ndarray:
    """``[S]`` tokens of each sequence; refuses an empty one."""
    lengths = np.broadcast_to(np.asarray(tokens_per_sequence, np.int64), (num_sequences,)).copy()
    if (lengths < 1).any():
        raise TraceError(f"tokens_per_sequence must be >= 1, got {tokens_per_sequence}")
    return lengths


def _tables(params: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """PMI tables ``(cross [L-1, E, E], within [L, E, E])`` of the score's cross-layer and within-layer terms."""
    cross = _log_ratio(params.transition, params.popularity[1:, None, :])
    within = _log_ratio(params.within, params.popularity[:, None, :])
    return cross, within


def _draws(params: SynthParams, rng: np.random.Generator, s: int, tmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Every random number of a generation, drawn in the reference's order (token by token: the picks'
    uniforms, then the router weights): ``uniform [T, L, K, s, 1]`` in (0, 1] (never lands on a masked, zero
    entry) and ``weights [s, T, L, K]``."""
    L, K = params.num_layers, params.top_k
    uniform = np.empty((tmax, L, K, s, 1))
    weights = np.zeros((s, tmax, L, K), np.float32)
    for t in range(tmax):
        uniform[t] = 1.0 - rng.random((L, K, s, 1))
        weights[:, t] = _draw_weights(params, rng, s)
    return uniform, weights


def _draw_diagonal(params: SynthParams, tables: tuple[np.ndarray, np.ndarray], experts: np.ndarray,
                   uniform: np.ndarray, d: int) -> None:
    """Draw the K experts of every cell (t, l) with t + l = d into ``experts [s, T, L, K]``, in the reference's
    float operations: C cells x s sequences as one ``[C, s, E]`` batch."""
    cross, within = tables
    s, tmax, L, K = experts.shape
    E = params.num_experts
    layers = np.arange(max(0, d - tmax + 1), min(L - 1, d) + 1)  # [C]
    times = d - layers  # [C]
    b_cross, b_time, b_within = params.coef.T  # [L] each
    base = params.logit[layers][:, None, :].repeat(s, axis=1)  # [C, s, E] score before any pick
    up = layers > 0  # cells with a layer above: the cross-layer term
    if up.any():
        lu, tu = layers[up], times[up]
        above = experts[:, tu, lu - 1].transpose(1, 0, 2)  # [Cu, s, K]
        feat = cross[(lu - 1)[:, None, None], above].mean(2)  # [Cu, s, E]
        base[up] += b_cross[lu][:, None, None] * feat
    back = times > 0  # cells with a token before: the temporal term
    if back.any():
        cb = np.flatnonzero(back)
        prev = experts[:, times[cb] - 1, layers[cb]].transpose(1, 0, 2)  # [Cb, s, K]
        base[cb[:, None, None], np.arange(s)[None, :, None], prev] += b_time[layers[cb]][:, None, None]
    c = len(layers)
    cells, seqs = np.arange(c)[:, None, None], np.arange(s)[None, :, None]
    wsum = np.zeros((c, s, E))  # within-layer PMI summed over each token's picks so far
    picked = np.empty((c, s, K), np.int64)
    for k in range(K):  # sequential Plackett-Luce draws by inverse CDF of softmax(score)
        score = base + (b_within[layers] / k)[:, None, None] * wsum if k else base
        prob = np.exp(score - score.max(2, keepdims=True))
        prob[cells, seqs, picked[:, :, :k]] = 0.0
        cdf = np.cumsum(prob, 2)
        u = uniform[times, layers, k]  # [C, s, 1]
        pick = np.minimum((cdf < u * cdf[:, :, -1:]).sum(2), E - 1)  # [C, s]
        picked[:, :, k] = pick
        wsum += within[layers[:, None], pick]
    experts[:, times, layers] = picked.transpose(1, 0, 2)


def _assemble(params: SynthParams, experts: np.ndarray, weights: np.ndarray, lengths: np.ndarray, seed: int,
              name: str | None) -> Trace:
    """The generated ``experts``/``weights [s, T, L, K]`` cut to each sequence's length, as a decode trace."""
    L, E, K = params.num_layers, params.num_experts, params.top_k
    keep = np.arange(experts.shape[1])[None, :] < lengths[:, None]  # [s, tmax]
    model = TraceModel(
        name=name or f"synthetic:{params.name}", model_type="synthetic", num_layers=L, num_experts=E, top_k=K
    )
    n = int(lengths.sum())
    return Trace(
        model,
        experts[keep],
        weights[keep],
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        phase=np.full(n, Phase.DECODE, np.uint8),
        meta={"synthetic": True, "params": params.name, "seed": seed},
    )


def _draw_weights(params: SynthParams, rng: np.random.Generator, s: int) -> np.ndarray:
    """[s, L, K] router weights: sorted symmetric-Dirichlet shares times a Beta-distributed total."""
    L, K = params.num_layers, params.top_k
    out = np.empty((s, L, K))
    for layer in range(L):
        share = (
            np.sort(rng.dirichlet(np.full(K, params.weight_conc[layer]), s), 1)[:, ::-1]
            if K > 1
            else np.ones((s, 1))
        )
        mu, sd = params.weight_total[layer]
        var = sd * sd
        if 0 < mu < 1 and 0 < var < mu * (1 - mu):
            common = mu * (1 - mu) / var - 1
            total = rng.beta(mu * common, (1 - mu) * common, s)
        else:
            total = np.full(s, mu)
        out[:, layer] = share * total[:, None]
    return out


# -- shipped parameters ------------------------------------------------------------------------------------


def builtin(name: str) -> SynthParams:
    """Parameters shipped with Prophet: ``mixtral-8x7b``, ``flame-moe-290m`` (real models), ``tiny-mixtral``."""
    if name not in BUILTIN:
        raise TraceError(f"no built-in synthetic parameters {name!r}; available: {sorted(BUILTIN)}")
    with resources.as_file(resources.files("prophet.trace") / "params" / BUILTIN[name]) as p:
        return SynthParams.load(p)


@functools.lru_cache(maxsize=8)
def for_shape(num_layers: int, num_experts: int, top_k: int, seed: int = 0) -> SynthParams:
    """Parameters for any shape: the real-model set nearest in expert count (log scale), adapted.

    Memoized: adapting calibrates by generating thousands of tokens (seconds for a large model), and a bench
    run asks twice (the replayed sample and the one predictors fit on). The parameters are read, never changed.
    """
    base = min(REAL, key=lambda n: abs(np.log(builtin(n).num_experts / num_experts)))
    return builtin(base).adapt(num_layers, num_experts, top_k, seed=seed)


def synthetic_trace(
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_sequences: int = 1,
    tokens_per_sequence: int | list[int] = 256,
    seed: int = 0,
    progress: bool = True,
    sample_seed: int | None = None,
) -> Trace:
    """A trace for a model of this shape with no recording (what ``prophet-bench`` replays on a fresh machine).

    ``seed`` fixes the generator's parameters (the "model": popularity, co-occurrence, reuse); ``sample_seed``
    (default ``seed``) the tokens drawn from it, so another ``sample_seed`` is new text from the same model.
    """
    params = for_shape(num_layers, num_experts, top_k, seed=seed)
    draw = seed if sample_seed is None else sample_seed
    return generate(params, num_sequences, tokens_per_sequence, seed=draw, progress=progress)


# -- validation --------------------------------------------------------------------------------------------

TOLERANCES = {
    "popularity_l1": 0.10,  # mean over layers of sum_e |p_gen - p_src|; sampling noise of 300 source tokens is ~0.08
    "reuse_rate": 0.03,  # mean over layers of |reuse_gen - reuse_src| (window 1)
    "next_layer_recall": 0.05,  # |difference| of the layer-mean co-occurrence recall@K (each fitted in-sample)
    "entropy": 0.02,  # |difference| of the layer-mean normalized popularity entropy
    "cooccurrence_recall": 0.65,  # at least: share of each expert's top-K next-layer partners that agree
    "dedup": 0.03,  # relative difference of distinct experts per step, batch 1..64, random grouping
}


def compare(source: Trace, generated: Trace) -> dict[str, float]:
    """The statistics `TOLERANCES` bounds, for a generated trace against its source (same L, E and K).

    Cross-layer measures treat every source row as aligned, as `fit` does.
    """
    src = _all_exact(source)
    pop_s, pop_g = stats.popularity(source), stats.popularity(generated)
    cs, cg = stats.cooccurrence(src, 1), stats.cooccurrence(generated, 1)
    k = source.top_k
    agree = [
        len(
            set(np.argsort(-cs[layer, i], kind="stable")[:k])
            & set(np.argsort(-cg[layer, i], kind="stable")[:k])
        )
        / k
        for layer in range(len(cs))
        for i in range(cs.shape[1])
        if cs[layer, i].sum() > 0
    ]
    ds, dg = stats.dedup_curve(source).mean, stats.dedup_curve(generated).mean
    ok = ~np.isnan(ds) & ~np.isnan(dg)
    return {
        "popularity_l1": float(np.abs(pop_s - pop_g).sum(1).mean()),
        "reuse_rate": float(np.nanmean(np.abs(stats.reuse_rate(source) - stats.reuse_rate(generated)))),
        "next_layer_recall": float(
            abs(np.nanmean(stats.next_layer_recall(src)) - np.nanmean(stats.next_layer_recall(generated)))
        )
        if source.num_layers > 1
        else 0.0,
        "entropy": float(abs(stats.entropy(pop_s, True).mean() - stats.entropy(pop_g, True).mean())),
        "cooccurrence_recall": float(np.mean(agree)) if agree else 1.0,
        "dedup": float(np.max(np.abs(dg[ok] - ds[ok]) / ds[ok])),
    }


def within_tolerance(metrics: dict[str, float]) -> dict[str, bool]:
    """Which of `compare`'s metrics meet `TOLERANCES` (``cooccurrence_recall`` is a floor, the rest ceilings)."""
    return {
        name: (value >= TOLERANCES[name]) if name == "cooccurrence_recall" else (value <= TOLERANCES[name])
        for name, value in metrics.items()
    }
