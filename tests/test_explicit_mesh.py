"""LoRA, IA3, DoRA, LoKr, a Pfeiffer adapter and Compacter on an explicit-axis mesh (``AxisType.Explicit``) with
layers called with ``out_sharding=``: the forward, the adapter gradients and one train step equal the
run without a mesh. Runs in ONE subprocess with 8
fake CPU devices (``XLA_FLAGS`` must be set before jax is imported)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # one subprocess, about 1.5 min on 2 shared cores

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("explicit") / "facts.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_explicit_mesh_worker.py"), str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_runs_on_an_explicit_mesh(facts):
    assert facts["devices"] == 8
    assert facts["mesh_axis_types"] == ["AxisType.Explicit", "AxisType.Explicit"]
    assert facts["out_spec"] == ["data", None, None]  # the out_sharding= the model asked for


def test_forward_equals_the_unsharded_run(facts):
    ref = np.asarray(facts["ref_out"])
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(np.asarray(facts["out"]), ref, rtol=1e-5, atol=1e-5)


def test_adapter_gradients_equal_the_unsharded_run(facts):
    assert set(facts["grads"]) == set(facts["ref_grads"]) and len(facts["grads"]) == 6  # A and B of 3 layers
    for key, ref in facts["ref_grads"].items():
        np.testing.assert_allclose(np.asarray(facts["grads"][key]), np.asarray(ref), rtol=1e-4, atol=1e-5, err_msg=key)


METHODS = ("ia3", "dora", "lokr", "pfeiffer", "compacter")
# The sharded run computes the same sums split over devices and added in another order: fp32 rounding.
CLOSE = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_other_methods_forward_gradients_and_step_equal_the_unsharded_run(facts, name):
    got, ref = facts["methods"][name], facts["ref_methods"][name]
    assert got["out_spec"] == ["data", None, None]  # it ran on the explicit mesh, laid out as asked
    ref_out = np.asarray(ref["out"])
    assert np.abs(ref_out).max() > 0
    np.testing.assert_allclose(np.asarray(got["out"]), ref_out, **CLOSE)
    assert set(got["grads"]) == set(ref["grads"]) and got["grads"]
    for key, g in ref["grads"].items():
        assert np.abs(np.asarray(g)).max() > 0, key  # every adapter leaf gets a gradient
        np.testing.assert_allclose(np.asarray(got["grads"][key]), np.asarray(g), err_msg=key, **CLOSE)
    for key, after in ref["stepped"].items():
        # SGD: after = before - lr * grad, checked against the reference's own gradient
        np.testing.assert_allclose(np.asarray(after), np.asarray(ref["before"][key]) - 0.5 * np.asarray(ref["grads"][key]),
                                   err_msg=key, **CLOSE)
        np.testing.assert_allclose(np.asarray(got["stepped"][key]), np.asarray(after), err_msg=key, **CLOSE)
