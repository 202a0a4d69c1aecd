"""The import graph says what DESIGN.md says: who may import whom (read from the source, not by importing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Modules ``path`` imports, anywhere in it (``from prophet import x`` counts as ``prophet`` itself)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("path", files("prophet/kernels"), ids=lambda p: p.name)
def test_kernels_do_not_import_the_package_root(path):
    assert "prophet" not in imports(path)  # only leaf modules (prophet.envs, prophet.errors, formats)


def test_layer_and_runtime_do_not_import_each_other():
    assert not any(m.startswith("prophet.runtime") for m in imports(ROOT / "prophet" / "layer.py"))
    assert not any(m.startswith("prophet.layer") for m in imports(ROOT / "prophet" / "runtime.py"))


@pytest.mark.parametrize("path", files("prophet/predict"), ids=lambda p: p.name)
def test_predictors_score_and_never_drive_caches(path):
    driving = {"prophet.cache", "prophet.prefetch", "prophet.transfer", "prophet.step", "prophet.runtime",
               "prophet.sim", "prophet.sim.replay"}
    assert not imports(path) & driving


def test_the_planner_reads_hardware_profiles_from_a_neutral_module():
    found = imports(ROOT / "prophet" / "plan.py")
    assert "prophet.hardware" in found and not any(m.startswith("prophet.sim") for m in found)


@pytest.mark.parametrize("name", ["runtime.py", "sim/replay.py"])
def test_the_runtime_and_the_simulator_run_the_one_step(name):
    assert "prophet.step" in imports(ROOT / "prophet" / name)
