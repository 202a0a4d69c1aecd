import dataclasses
import json
import subprocess
import sys

import pytest

import prophet
from prophet.config import CacheConfig, PrefetchConfig, ProphetConfig
from prophet.errors import ConfigError, ProphetError


def test_import_needs_no_gpu_and_no_triton():
    # Block triton and CUDA initialisation in a fresh interpreter: the package must still import.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; torch.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError('touched CUDA'))\n"
        "import prophet, prophet.kernels, prophet.models\n"
        "print(prophet.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == prophet.__version__


def test_public_errors_derive_from_prophet_error():
    assert issubclass(prophet.UnsupportedModelError, ProphetError)
    assert issubclass(ConfigError, ProphetError)


def test_config_json_round_trip():
    cfg = ProphetConfig(cache=CacheConfig(slots_per_layer=3, policy="lfu"), prefetch=PrefetchConfig(max_inflight=2))
    again = ProphetConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["cache"]["slots_per_layer"] == 3


def test_config_is_frozen():
    cfg = CacheConfig(cache_slots=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache_slots = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"cache_slots": 0}, "cache_slots=0"),
        ({"cache_slots": 2, "slots_per_layer": 2}, "only one of"),
        ({"policy": "random"}, "policy='random'"),
        ({"cache_bytes": -5}, "cache_bytes=-5"),
    ],
)
def test_bad_cache_config_names_the_field(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        CacheConfig(**kwargs)


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="unknown field"):
        CacheConfig.from_dict({"slots": 3})


def test_ci_lowest_versions_are_the_lower_bounds_of_the_pins():
    """CI's second run installs .ci/lowest.txt: each pin's lower bound is a version CI has run."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = {}
    for dep in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep)
        assert m, f"{dep}: every dependency needs a lower bound"
        lower[m[1].lower()] = m[2]
    pinned = dict(
        line.split("==") for line in (root / ".ci/lowest.txt").read_text().splitlines() if "==" in line
    )
    for name, bound in lower.items():
        if name == "torch":  # CI installs the one local CPU build, torch==2.13.0, in both runs
            assert bound == "2.13"
            continue
        assert pinned[name].split(".")[: len(bound.split("."))] == bound.split("."), (
            f"{name}: pyproject's lower bound {bound} differs from .ci/lowest.txt's {pinned[name]}"
        )


def test_the_checkout_shadows_no_installed_package():
    # Run from a clone, the repository root is on sys.path: a top-level package there would hide the installed one
    # of the same name. A top-level `kernels/` hid the hub's `kernels`, which transformers 5.25 imports at start-up.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["prophet"], f"move {packages} under prophet/: they shadow installed packages of that name"
