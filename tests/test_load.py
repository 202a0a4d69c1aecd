"""`prophet.load`: a saved checkpoint comes back wrapped, exact, without two copies of the experts in RAM."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

import prophet
from prophet.errors import ConfigError


def _save(path, hidden, inter, layers, experts, dtype):
    cfg = MixtralConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
    )
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def test_load_gives_the_saved_model_wrapped(tmp_path):
    _save(tmp_path, 32, 48, 2, 4, torch.float32)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
        loaded = prophet.load(tmp_path, device="cpu", slots_per_layer=2)
        out = loaded(ids).logits
    assert prophet.stats(loaded).total.misses > 0
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_load_refuses_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        prophet.load(tmp_path)


@pytest.mark.slow
def test_peak_memory_stays_below_two_copies_of_the_experts(tmp_path):
    # ~0.8 GB of bf16 experts: 4 layers x 8 experts x 3 x 1024 x 4096
    _save(tmp_path, 1024, 4096, 4, 8, torch.bfloat16)
    expert_bytes = 4 * 8 * 3 * 1024 * 4096 * 2
    # Peak anonymous memory, sampled by a thread: file-backed pages of the memory-mapped checkpoint are page
    # cache (reclaimable), so ru_maxrss would count the file once more without there being a second copy.
    code = textwrap.dedent(f"""
        import threading, time, torch, transformers, prophet
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        base, peak, done = anon(), [0], threading.Event()
        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        model = prophet.load({str(tmp_path)!r}, device="cpu", slots_per_layer=2)
        done.set(); t.join()
        print(base, max(peak[0], anon()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = map(int, out.stdout.split()[-2:])
    grown = peak - base
    print(f"peak anonymous growth {grown / 2**30:.2f} GiB for {expert_bytes / 2**30:.2f} GiB of experts")
    assert grown < 1.6 * expert_bytes  # two full copies would be >= 2x
