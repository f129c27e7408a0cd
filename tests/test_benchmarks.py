"""The benchmark scripts run (tiny model, no result files written): figures never come from dead code."""

import sys

import pytest


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("adapters", marks=pytest.mark.slow),  # ~15 s
        "qlora_memory",  # ~5 s: compiles two steps and four chains, runs none
        # slow on 2 cores (CI budget); their library paths are covered by tests/test_qlora*.py and
        # tests/test_train_ownership.py, the scripts themselves by `pytest -m slow`
        pytest.param("lora", marks=pytest.mark.slow),  # ~25 s; its train step is test_train.py's
        pytest.param("qlora", marks=pytest.mark.slow),  # ~30 s
        pytest.param("train_safety", marks=pytest.mark.slow),  # ~10 s
        pytest.param("methods", marks=pytest.mark.slow),  # ~45 s
        pytest.param("before_after", marks=pytest.mark.slow),  # ~40 CPU-s: a git worktree, two workers
        pytest.param("mixed_peft", marks=[pytest.mark.slow, pytest.mark.interop]),  # torch + peft, real MiniLM
    ],
)
def test_benchmark_quick_run(name, monkeypatch, tmp_path):
    from jaxpeft.bench import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main([name, "--quick"]) == 0
