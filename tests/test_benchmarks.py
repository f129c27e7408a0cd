"""The benchmark scripts run (tiny model, no result files written): figures never come from dead code."""

import sys

import pytest


@pytest.mark.parametrize(
    "name", ["lora", "qlora", "adapters", "train_safety", pytest.param("methods", marks=pytest.mark.slow)]  # methods: ~45 s
)
def test_benchmark_quick_run(name, monkeypatch, tmp_path):
    from jaxpeft.bench import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main([name, "--quick"]) == 0
