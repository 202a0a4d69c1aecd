"""``prophet-bench`` subcommands: each works on tiny inputs, defaults are out of sample, and every bad input is one
line on stderr with exit code 2, found before any long work (no plan printed, no replay run, no traceback)."""

from __future__ import annotations

import json

import pytest

from prophet.cli import main
from prophet.trace.synth import synthetic_trace

FAST = ["--no-progress", "--simulate"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory) -> str:
    """A mixtral-tiny-shaped trace (2 MoE layers x 8 experts, top-2): 4 sequences of 24 tokens."""
    path = tmp_path_factory.mktemp("traces") / "tiny"
    synthetic_trace(2, 8, 2, num_sequences=4, tokens_per_sequence=24, progress=False).save(path)
    return str(path)


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("traces") / "olmoe-like"
    synthetic_trace(3, 8, 2, tokens_per_sequence=8, progress=False).save(path)
    return str(path)


def record(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_plan_prints_the_plan_only(capsys):
    code, out, err = run(capsys, "plan", "--model", "mixtral", "--ctx", "128k", "--gpu", "h100-sxm")
    assert code == 0 and record(out)["plan"]["expert_slots"] == 172
    assert "172 of 256 experts" in err and err.count("RoPE scaling") == 1


def test_no_subcommand_runs_the_main_job(capsys):
    code, out, err = run(capsys, "--model", "mixtral-tiny", "--ctx", "4096", "--steps", "16", *FAST)
    assert code == 0 and record(out)["mode"] == "simulated" and "simulated on the" in err


def test_replay_fits_on_half_the_sequences_and_replays_the_rest(capsys, tiny_trace):
    code, out, err = run(capsys, "replay", "--trace", tiny_trace, "--model", "mixtral-tiny", "--cache-slots", "8",
                         "--policy", "lru,belady,prophet")
    r = record(out)
    assert code == 0 and [x["policy"] for x in r["results"]] == ["lru", "belady", "prophet"]
    assert r["sample"]["in_sample"] is False and r["sample"]["replay_tokens"] == r["sample"]["fit_tokens"] == 48
    assert r["results"][0]["steps"] == 48  # the held-out sequences, each token once
    assert "sequences 0-1" in err and "sequences 2-3" in err and "out of sample" in err
    assert "replay predicted" not in err  # progress bars and rows share names


def test_in_sample_and_repeat_are_explicit_and_labelled(capsys, tiny_trace):
    code, out, err = run(capsys, "replay", "--trace", tiny_trace, "--model", "mixtral-tiny", "--cache-slots", "8",
                         "--policy", "prophet", "--in-sample", "--steps", "150", "--repeat")
    r = record(out)
    assert code == 0 and r["sample"]["in_sample"] is True and "IN SAMPLE" in err
    assert "played 1.56 times" in r["sample"]["steps"] and "--repeat" in err


def test_an_lru_only_replay_plays_the_whole_trace(capsys, tiny_trace):
    code, out, _ = run(capsys, "replay", "--trace", tiny_trace, "--model", "mixtral-tiny", "--slots-per-layer", "4")
    assert code == 0 and record(out)["results"][0]["steps"] == 96 and record(out)["sample"]["in_sample"] is None


def test_run_with_a_trace_is_out_of_sample_and_says_so(capsys, tiny_trace, tmp_path):
    code, out, err = run(capsys, "run", "--model", "mixtral-tiny", "--ctx", "4096", "--trace", tiny_trace,
                         "--out", str(tmp_path / "new" / "r.json"), *FAST)
    r = record(out)
    assert code == 0 and json.loads((tmp_path / "new" / "r.json").read_text()) == r
    assert r["trace"]["sample"]["in_sample"] is False and r["trace"]["sample"]["replay_tokens"] == 48
    assert "sample: predictors fit on sequences 0-1" in err and "bf16 weights" in err


def test_figures_skip_what_has_no_results(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, out_err = run(capsys, "figures", "--results", str(tmp_path), "--out-dir", str(tmp_path / "out"))
    assert code == 0


def test_trace_record_then_info(capsys, tmp_path):
    code, _, _ = run(capsys, "trace", "record", str(tmp_path / "t"), "--model", "mixtral-tiny", "--prompts", "2",
                     "--prompt-tokens", "4", "--new-tokens", "3")
    assert code == 0
    code, out, _ = run(capsys, "trace", "info", str(tmp_path / "t"))
    assert code == 0 and "sequences=2" in out


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        # run (the default subcommand)
        (["--layers", "0"], "--layers: 0: give at least 1"),
        (["--policy", "bogus"], "--policy bogus: unknown"),
        (["--policy", ","], "--policy is empty"),
        (["--predictor", "bogus"], "--predictor bogus"),
        (["--steps", "0"], "give at least 1"),
        (["--warmup", "-1"], "give 0 or more"),
        (["--slots", "0"], "--slots 0: give at least 1"),
        (["--batch", "0"], "must be at least 1"),
        (["--fit", "x"], "--fit and --in-sample apply to --trace"),
        (["--in-sample"], "--fit and --in-sample apply to --trace"),
        (["--trace", "TINY", "--fit", "TINY", "--in-sample"], "contradict"),
        (["--trace", "TINY", "--steps", "500"], "add --repeat"),
        (["--trace", "OTHER"], "has 3 MoE layers x 8 experts but Mixtral-8x7B-tiny has 2 x 8"),
        (["--trace", "TINY", "--fit", "OTHER"], "--fit"),
        (["--out", "/proc/prophet/r.json"], "--out /proc/prophet/r.json: cannot make its folder"),
        (["--out", "FILE/r.json"], "cannot make its folder"),
        (["--out", "DIR"], "is a folder"),
        (["--gpu", "h900"], "unknown GPU profile 'h900'"),
        (["--model", "mixtral-9x9b"], "unknown model 'mixtral-9x9b'"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        # replay
        (["replay", "--cache-slots", "8"], "the following arguments are required: --trace"),
        (["replay", "--trace", "TINY"], "one of the arguments --slots-per-layer --cache-slots is required"),
        (["replay", "--trace", "/nonexistent", "--cache-slots", "8"], "no such file"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "0"], "give at least 1"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--policy", "bogus"], "unknown"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--predictor", "bogus"], "bogus"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--gpu", "h900"], "h900"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--batch", "0"], "at least 1"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--steps", "97"], "--repeat"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--fit", "OTHER"], "--fit"),
        (["replay", "--trace", "TINY", "--model", "olmoe", "--cache-slots", "8"], "give a trace of that model"),
        (["replay", "--trace", "TINY", "--cache-slots", "8"], "no registry model has (2, 8, 2)"),
        (["replay", "--trace", "TINY", "--model", "mixtral-tiny", "--cache-slots", "8", "--out", "DIR"], "folder"),
        # plan, figures, trace
        (["plan", "--model", "mixtral", "--ctx", "4m", "--gpu", "l4"], "fixes: ctx <= "),
        (["plan", "--kv-dtype", "int3"], "dtype 'int3' is unknown"),
        (["figures", "--results", "/nonexistent"], "no such folder"),
        (["trace", "info", "/nonexistent"], "no such file"),
        (["trace", "info", "TINY", "--format", "bogus"], "invalid choice: 'bogus'"),
        (["trace", "info", "TINY", "--format", "sglang"], "give the model (--model)"),
        (["trace", "record", "DIR", "--model", "mixtral"], "needs a checkpoint dir or a toy twin"),
        (["trace"], "the following arguments are required: trace_cmd"),
        (["bogus-subcommand"], "unrecognized arguments: bogus-subcommand"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2_before_any_work(capsys, tmp_path, tiny_trace, other_shape, argv, fix):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    subs = {"TINY": tiny_trace, "OTHER": other_shape, "FILE/r.json": str(tmp_path / "file" / "r.json"),
            "DIR": str(tmp_path / "dir")}
    argv = [subs.get(a, a) for a in argv]
    if argv[0] not in ("replay", "plan", "figures", "trace", "bogus-subcommand"):
        argv = ["--model", "mixtral-tiny", "--ctx", "4096", *argv, *FAST]
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("prophet-bench: error: "), err
    assert fix in lines[0] and "Traceback" not in err
