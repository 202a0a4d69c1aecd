"""Time llama.cpp's CPU backend on MoE experts of a given shape; prints one JSON line.

Runs under any Python with ``llama-cpp-python``, ``gguf`` and ``numpy`` (no torch needed), so
`host_experts_bench.py --llama-python` can call it in a separate environment. It writes two one-layer Mixtral-like
GGUF models with random bf16 weights and no tokenizer (``no_vocab``): one with experts of the given shape, one
with tiny experts (intermediate 32) and everything else equal. llama.cpp's expert time per decoded token is the
difference of their decode times; at batch 1 each token runs its top 2 of 8 experts, so it streams 2 experts.

    python experiments/llamacpp_experts.py --hidden 4096 --intermediate 4096 --threads 2 --dir /tmp/gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp import Llama

EXPERTS, TOP_K, VOCAB, HEADS, KV_HEADS = 8, 2, 256, 32, 8


def _bf16(a: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.BF16)


def write_model(path: Path, hidden: int, intermediate: int, seed: int = 0) -> None:
    """A one-layer llama-architecture MoE with random weights (scaled so activations stay finite)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(hidden // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(TOP_K)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("no_vocab")
    kv = hidden // HEADS * KV_HEADS

    def rand(*shape: int) -> np.ndarray:
        return _bf16(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    bf16 = gguf.GGMLQuantizationType.BF16
    tensors = {
        "token_embd.weight": rand(VOCAB, hidden),
        "output.weight": rand(VOCAB, hidden),
        "blk.0.attn_q.weight": rand(hidden, hidden),
        "blk.0.attn_k.weight": rand(kv, hidden),
        "blk.0.attn_v.weight": rand(kv, hidden),
        "blk.0.attn_output.weight": rand(hidden, hidden),
        "blk.0.ffn_gate_inp.weight": rand(EXPERTS, hidden),
        "blk.0.ffn_gate_exps.weight": rand(EXPERTS, intermediate, hidden),  # ggml ne = (H, I, E)
        "blk.0.ffn_up_exps.weight": rand(EXPERTS, intermediate, hidden),
        "blk.0.ffn_down_exps.weight": rand(EXPERTS, hidden, intermediate),  # ggml ne = (I, H, E)
    }
    for name, t in tensors.items():
        w.add_tensor(name, t, raw_dtype=bf16)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def decode_seconds(path: Path, threads: int, tokens: int) -> float:
    """Median seconds per decoded token (one token per llama_decode call) after two warm-up tokens."""
    llm = Llama(str(path), n_ctx=tokens + 8, n_batch=8, n_threads=threads, n_threads_batch=threads, verbose=False,
                use_mmap=False)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, tokens + 2).tolist()
    llm.eval(ids[:2])
    times = []
    for t in ids[2:]:
        start = time.perf_counter()
        llm.eval([t])
        times.append(time.perf_counter() - start)
    llm.close()
    return statistics.median(times)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # gguf-py from the llama.cpp source tree, not installed
        return "source tree"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--dir", default="/tmp/prophet-gguf")
    args = p.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    full = folder / f"moe_h{args.hidden}_i{args.intermediate}.gguf"
    base = folder / f"moe_h{args.hidden}_i32.gguf"
    for path, inter in ((full, args.intermediate), (base, 32)):
        if not path.exists():
            write_model(path, args.hidden, inter)
    t_full = decode_seconds(full, args.threads, args.tokens)
    t_base = decode_seconds(base, args.threads, args.tokens)
    expert_bytes = 3 * args.hidden * args.intermediate * 2
    print(json.dumps({
        "full_s": t_full, "base_s": t_base, "experts_s": t_full - t_base,  # <= 0: noise won; the caller drops it
        "experts_per_token": TOP_K, "expert_bytes": expert_bytes, "threads": args.threads,
        "versions": {"llama_cpp_python": llama_cpp.__version__, "gguf": _version("gguf")},
    }))


if __name__ == "__main__":
    main()
