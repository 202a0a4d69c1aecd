"""A long decode run that watches host memory: sequence after sequence of sampled tokens through a wrapped
model, the predictor reset at each sequence start, resident memory sampled as it goes.

A leak anywhere on the decode path (cache bookkeeping, prefetch records, predictor memory, statistics) shows
as resident memory that keeps rising after the warm-up; a flat line is what the soak test asks for.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from prophet.compat import decode_kwargs
from prophet.errors import ConfigError


def host_rss() -> int:
    """Resident anonymous memory of this process in bytes (Linux ``/proc/self/status`` ``RssAnon``): the heap,
    where a leak grows; file-backed pages (mapped libraries) are left out, since the kernel may drop and reload
    them at any time under another process's memory pressure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise ConfigError(f"cannot read /proc/self/status ({exc}): the soak measures memory on Linux only") from exc
    raise ConfigError("/proc/self/status has no RssAnon line: the soak measures memory on Linux only")


@dataclass
class SoakResult:
    """Resident anonymous memory over a soak: ``samples`` are ``(decode step, bytes)`` from the end of the
    warm-up on."""

    steps: int
    sequences: int
    warmup_steps: int
    samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def baseline(self) -> int:
        return self.samples[0][1]

    @property
    def growth(self) -> float:
        """Largest rise over the baseline, as a fraction of it (0.02 = 2%)."""
        return max(b for _, b in self.samples) / self.baseline - 1.0

    @property
    def drift(self) -> float:
        """Last sample against the baseline, as a fraction of it."""
        return self.samples[-1][1] / self.baseline - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "baseline_bytes": self.baseline, "growth": self.growth, "drift": self.drift}


@torch.no_grad()
def soak(model: nn.Module, steps: int, *, seq_len: int = 100, prompt: int = 4, warmup: float = 0.1,
         samples: int = 50, predictor: Any = None, seed: int = 0, progress: bool = False) -> SoakResult:
    """Decode ``steps`` sampled tokens in sequences of ``seq_len`` (each after a ``prompt``-token prefill, with a
    fresh KV cache), calling ``predictor.reset()`` at every sequence start; memory is sampled ``samples`` times
    after the first ``warmup`` share of the steps (garbage collected first, so only live memory counts)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    warm = max(1, int(steps * warmup))
    every = max(1, (steps - warm) // samples)
    result = SoakResult(steps=steps, sequences=0, warmup_steps=warm)
    step = 0
    bar = tqdm(total=steps, desc="soak", unit=" steps", disable=not progress)
    while step < steps:
        if predictor is not None:
            predictor.reset()
        kv = DynamicCache(config=model.config)
        out = model(input_ids=torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen),
                    **decode_kwargs(model, kv, 0, prompt))
        result.sequences += 1
        for i in range(min(seq_len, steps - step)):
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)  # [1, V]
            out = model(input_ids=torch.multinomial(probs, 1, generator=gen), **decode_kwargs(model, kv, prompt + i, 1))
            step += 1
            bar.update()
            if step >= warm and (step - warm) % every == 0 or step == steps:
                gc.collect()
                result.samples.append((step, host_rss()))
        del kv, out
    bar.close()
    return result
