"""``prophet-bench --expert-dtype``: plans and simulates experts stored quantized; measured decode refuses it."""

import json

import pytest

from prophet.cli import main

pytest.importorskip("prophet.sim.replay", reason="prophet.sim is not in this checkout")

FAST = ["--steps", "8", "--no-progress", "--simulate", "--policy", "lru"]


def record_of(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_int4_experts_get_more_slots_and_more_speed_than_bf16(capsys):
    args = ["--model", "mixtral", "--ctx", "32k", "--gpu", "rtx-4090", *FAST]
    bf16 = record_of(capsys, *args)
    int4 = record_of(capsys, *args, "--expert-dtype", "int4")
    assert int4["plan"]["expert_dtype"] == "int4" and int4["config"]["expert_dtype"] == "int4"
    assert int4["plan"]["expert_bytes"] * 3.5 < bf16["plan"]["expert_bytes"]
    assert int4["plan"]["expert_slots"] > 3.5 * bf16["plan"]["expert_slots"]
    assert int4["results"][0]["tokens_per_s"] > bf16["results"][0]["tokens_per_s"]


@pytest.mark.parametrize(("argv", "fix"), [
    (["--expert-dtype", "q4_k", *FAST], "expert format 'q4_k' is unknown"),
    (["--expert-dtype", "int4", "--device", "cpu", "--steps", "4", "--no-progress"], "simulate quantized experts"),
])
def test_bad_expert_dtype_is_one_line_and_exit_code_2(capsys, argv, fix):
    code = main(["--model", "mixtral-tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("prophet-bench: error: ") and fix in err[-1]
