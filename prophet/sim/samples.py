"""Which routing predictors learn from and which routing is replayed: out of sample unless asked otherwise.

A predictor fitted on the very tokens it is then scored on overstates what it would do on new requests (24% on
the shared Mixtral trace). So `split_sample` keeps them apart: a separate ``fit`` trace when one is named, else
the replayed trace's first sequences (half of them) fit and the rest are replayed; one sequence is cut in two.
In-sample replay happens only when asked for, and is labelled. `replay_steps` refuses to replay any token twice
unless asked (``repeat``), and says how often it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from prophet.errors import ConfigError
from prophet.predict.data import RouterTrace


@dataclass(frozen=True)
class Sample:
    """The routing to replay, the routing predictors fit on (None: nothing learns), and how they were chosen."""

    replay: RouterTrace
    fit: RouterTrace | None
    how: str  # one line for the summary: what was fitted on, what was replayed
    in_sample: bool | None  # None when no predictor learns

    def to_dict(self) -> dict[str, Any]:
        return {"how": self.how, "in_sample": self.in_sample, "replay_tokens": self.replay.num_tokens,
                "replay_sequences": self.replay.num_sequences,
                "fit_tokens": None if self.fit is None else self.fit.num_tokens}


def rows(trace: RouterTrace, lo: int, hi: int, name: str) -> RouterTrace:
    """Tokens ``lo:hi`` of a one-sequence trace, as a one-sequence trace."""
    return RouterTrace(experts=trace.experts[lo:hi], weights=trace.weights[lo:hi],
                       seq_offsets=np.array([0, hi - lo], np.int64), exact=trace.exact[lo:hi],
                       num_experts=trace.num_experts,
                       hidden=None if trace.hidden is None else trace.hidden[lo:hi], name=name)


def _span(first: int, last: int) -> str:
    return f"sequence {first}" if first == last else f"sequences {first}-{last}"


def split_sample(trace: RouterTrace, *, fit: RouterTrace | None = None, in_sample: bool = False,
                 learns: bool = True) -> Sample:
    """Split ``trace`` into what predictors fit on and what is replayed (see the module docstring).

    ``learns`` False (no requested policy learns from routing): the whole trace is replayed.
    """
    n = trace.num_tokens
    if fit is not None and in_sample:
        raise ConfigError("--fit and --in-sample contradict each other: give one")
    if not learns:
        return Sample(trace, None, f"no policy learns from routing: all {n} tokens of {trace.name} replayed", None)
    if fit is not None:
        return Sample(trace, fit, f"predictors fit on {fit.name} ({fit.num_tokens} tokens), replayed on "
                      f"{trace.name} ({n} tokens): out of sample", False)
    if in_sample:
        return Sample(trace, trace, f"IN SAMPLE (optimistic): predictors fit on the {n} tokens of {trace.name} "
                      "they are replayed on", True)
    s = trace.num_sequences
    if s >= 2:
        k = s // 2
        train, test = trace.sequences(range(k)), trace.sequences(range(k, s))
        how = (f"predictors fit on {_span(0, k - 1)} of {trace.name} ({train.num_tokens} tokens), replayed on "
               f"{_span(k, s - 1)} ({test.num_tokens} tokens): out of sample")
        return Sample(test, train, how, False)
    if n < 2:
        raise ConfigError(f"{trace.name} has {n} token: too short to fit on one part and replay another; give "
                          "--fit TRACE or a longer trace")
    half = n // 2
    train, test = rows(trace, 0, half, f"{trace.name}[:{half}]"), rows(trace, half, n, f"{trace.name}[{half}:]")
    how = (f"predictors fit on the first {half} tokens of {trace.name}'s one sequence, replayed on the other "
           f"{n - half}: out of sample")
    return Sample(test, train, how, False)


def replay_steps(tokens: int, batch: int, steps: int | None, repeat: bool, lead: int = 0) -> tuple[int, str]:
    """``(steps, note)``: decode steps over a replayed part of ``tokens`` rows with ``batch`` lanes.

    Each lane plays its own ``tokens // batch`` rows; ``lead`` rows of each lane go before the counted steps
    (a measured decode's prompt and warm-up). By default every row is played at most once; more steps than
    that need ``repeat``, and the note says how many times the trace was played.
    """
    per_lane = tokens // batch
    if steps is None:
        steps = per_lane - lead
        if steps < 1:
            raise ConfigError(f"the replayed routing has {tokens} tokens: {batch} lane(s) of {per_lane} leave no "
                              f"step after the {lead} leading positions; lower --batch or --warmup, or add --repeat "
                              "with --steps")
    played = (steps + lead) * batch
    if steps + lead <= per_lane:
        return steps, f"each of the {played} replayed positions played once ({tokens} tokens available)"
    if not repeat:
        raise ConfigError(f"--steps {steps} with --batch {batch} plays {played} positions but the replayed routing "
                          f"has {tokens} tokens ({per_lane} per lane): lower --steps to {max(per_lane - lead, 1)} "
                          "or add --repeat to replay the trace more than once")
    return steps, f"--repeat: the {tokens} replayed tokens played {played / tokens:.2f} times (later passes repeat exact paths)"
