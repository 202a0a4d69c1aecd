"""Where a missed expert runs: wait for its in-flight copy, copy it now, or compute it on the host CPU.

Pure functions of measured (or modelled) costs, so the runtime's step and the simulator take the same
decision. At batch 1 a missed expert sees about one token: the host reads its weights once from DRAM (about
1.2 ms for a bf16 Mixtral expert on a 300 GB/s socket) while PCIe 5 copies them in 6.7 ms, so decode computes
on the host. Host time grows with tokens (the host's FLOP rate) while a copy does not, so prefill and large
batches copy.

Times are seconds from the start of the layer step (the moment the step decides). The GPU runs the resident
experts for ``gpu_layer_s`` meanwhile; an expert that arrives by copy runs on the GPU after it lands
(``gpu_expert_s`` more), one on the host finishes when the host's queue reaches it and computes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from prophet.errors import ConfigError


class Choice(str, Enum):
    WAIT = "wait"  # its copy is already in flight: use it when it lands
    COPY = "copy"  # copy it now (behind the link's queue), then run it on the GPU
    HOST = "host"  # compute it on the host CPU from the host store


@dataclass(frozen=True)
class MissCosts:
    """What a decision needs to know, all in seconds (measured while running, or from the cost model).

    copy_s          one expert's host->device copy on a free link (fixed cost + bytes / GB/s)
    host_fixed_s    host time of one expert bound by memory: streaming its weights from DRAM once
    host_token_s    host time per token of that expert bound by compute: its FLOPs at the host's FLOP rate
    gpu_expert_s    GPU time to run one more expert once resident (0 when a layer is bound by other reads)
    """

    copy_s: float
    host_fixed_s: float
    host_token_s: float
    gpu_expert_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("copy_s", "host_fixed_s", "host_token_s", "gpu_expert_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"MissCosts.{name}={getattr(self, name)}: must be a time >= 0 seconds")

    def host_s(self, tokens: int) -> float:
        """Host time of one expert over ``tokens`` tokens: a roofline, as `prophet.sim.cost.CostModel` has it
        (its weights stream from DRAM once, or its FLOPs bound it)."""
        return max(self.host_fixed_s, tokens * self.host_token_s)

    def host_breakeven_tokens(self) -> float:
        """Tokens above which copying one expert on a free link beats computing it on a free host."""
        copy = self.copy_s + self.gpu_expert_s
        if self.host_fixed_s >= copy:
            return 0.0
        return copy / self.host_token_s if self.host_token_s > 0 else float("inf")


@dataclass(frozen=True)
class Decision:
    """The choice per missed expert and when the layer step ends by the model of `decide`."""

    choices: dict[int, Choice]
    finish_s: dict[int, float]  # when each missed expert's output is ready
    layer_s: float  # the step's end: resident experts on the GPU and every missed expert done
    link_free_s: float  # when the link is free after the copies chosen here
    host_free_s: float  # when the host threads are free after the host experts chosen here

    def experts(self, choice: Choice) -> list[int]:
        return [e for e, c in self.choices.items() if c == choice]


def decide(
    tokens: Mapping[int, int],
    costs: MissCosts,
    gpu_layer_s: float,
    *,
    inflight_ready_s: Mapping[int, float] | None = None,
    link_free_s: float = 0.0,
    host_free_s: float = 0.0,
    allow: Sequence[Choice] = (Choice.WAIT, Choice.COPY, Choice.HOST),
) -> Decision:
    """Choose, for each distinct missed expert (``tokens``: expert -> tokens routed to it this step), whichever
    of wait / copy / host finishes first, and return the choices with the modelled layer end.

    ``inflight_ready_s``: experts whose copy is in flight -> when it lands. ``link_free_s``/``host_free_s``: when
    the link and the host threads finish the work queued before this step. Experts are placed largest first
    (the ones with most tokens gain most from the GPU), each on the option that finishes it soonest given the
    queues left by the ones before it. ``allow`` restricts the options (``on_miss="copy"``: WAIT and COPY;
    ``"host"``: WAIT and HOST); WAIT is only possible for in-flight experts.
    """
    if not allow or not set(allow) - {Choice.WAIT}:
        raise ConfigError(f"allow={list(allow)}: include COPY or HOST, or a miss with no copy in flight has nowhere to run")
    inflight = inflight_ready_s or {}
    link, host = link_free_s, host_free_s
    choices: dict[int, Choice] = {}
    finish: dict[int, float] = {}
    for e in sorted(tokens, key=lambda e: (-tokens[e], e)):
        options: dict[Choice, float] = {}
        if Choice.WAIT in allow and e in inflight:
            options[Choice.WAIT] = inflight[e] + costs.gpu_expert_s
        if Choice.COPY in allow and e not in inflight:
            options[Choice.COPY] = max(link, 0.0) + costs.copy_s + costs.gpu_expert_s
        if Choice.HOST in allow:
            options[Choice.HOST] = host + costs.host_s(tokens[e])
        if not options:  # in flight but waiting not allowed and host not allowed: copy again is pointless
            options[Choice.WAIT] = inflight[e] + costs.gpu_expert_s
        best = min(options, key=lambda c: (options[c], c != Choice.WAIT))  # ties: no new work
        choices[e], finish[e] = best, options[best]
        if best == Choice.COPY:
            link = finish[e] - costs.gpu_expert_s
        elif best == Choice.HOST:
            host = finish[e]
    end = max([gpu_layer_s, *finish.values()])
    return Decision(choices, finish, end, link, host)


def allowed(on_miss: str) -> tuple[Choice, ...]:
    """The options of `decide` for ``ProphetConfig.on_miss``."""
    table = {
        "auto": (Choice.WAIT, Choice.COPY, Choice.HOST),
        "copy": (Choice.WAIT, Choice.COPY),
        "host": (Choice.WAIT, Choice.HOST),
    }
    if on_miss not in table:
        raise ConfigError(f"on_miss={on_miss!r}: use one of {', '.join(table)}")
    return table[on_miss]


class RunningCosts:
    """`MissCosts` from timings the runtime measures as it runs (moving averages), seeded by a model.

    ``observe_copy(seconds)``: one expert copy's link time. ``observe_host(tokens, seconds)``: one host
    expert's time; it updates the weight-streaming time where the seed's roofline says the expert is bound by
    memory at that token count, else the time per token.
    """

    def __init__(self, seed: MissCosts, decay: float = 0.9) -> None:
        self.costs = seed
        self.decay = decay

    def _mix(self, old: float, new: float) -> float:
        return self.decay * old + (1 - self.decay) * new

    def observe_copy(self, seconds: float) -> None:
        c = self.costs
        self.costs = MissCosts(self._mix(c.copy_s, seconds), c.host_fixed_s, c.host_token_s, c.gpu_expert_s)

    def observe_host(self, tokens: int, seconds: float) -> None:
        c = self.costs
        if tokens * c.host_token_s <= c.host_fixed_s:
            self.costs = MissCosts(c.copy_s, self._mix(c.host_fixed_s, seconds), c.host_token_s, c.gpu_expert_s)
        else:
            self.costs = MissCosts(c.copy_s, c.host_fixed_s, self._mix(c.host_token_s, seconds / tokens), c.gpu_expert_s)
