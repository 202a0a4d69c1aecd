"""Record a model's routing on seeded random prompts: what ``prophet-bench trace record`` runs.

Real prompts give realistic routing; random ones make a trace of any checkpoint with nothing but the model,
for checking the pipeline or training a predictor on the model's own habits. Greedy and seeded: a rerun with
the same versions writes the same trace.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from prophet.errors import ConfigError
from prophet.trace.format import Trace
from prophet.trace.readers import load
from prophet.trace.recorder import record


def record_random_prompts(model: nn.Module, dst: str | Path, *, prompts: int = 4, prompt_tokens: int = 16,
                          new_tokens: int = 32, seed: int = 0, overwrite: bool = False,
                          progress: bool = True) -> Trace:
    """Generate ``new_tokens`` greedily after each of ``prompts`` random prompts, recording the routing to
    ``dst`` (one sequence per prompt); returns the trace read back."""
    if min(prompts, prompt_tokens, new_tokens) < 1:
        raise ConfigError(f"prompts={prompts}, prompt_tokens={prompt_tokens}, new_tokens={new_tokens}: each must be "
                          "at least 1")
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), record(model, dst, overwrite=overwrite, meta={"prompts": "random", "seed": seed}):
        for _ in tqdm(range(prompts), desc="record", unit="prompt", disable=not progress):
            ids = torch.randint(3, vocab, (1, prompt_tokens), generator=gen).to(device)
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return load(dst)
