"""A real SIGKILL between the two renames of an overwrite, and a refused restore's output, in subprocesses."""

from __future__ import annotations

import os
import pathlib
import select
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.checkpoint import CheckpointRecoveredWarning, atomic, restore_adapter, save_adapter

ROOT = pathlib.Path(__file__).resolve().parent.parent
OVERWRITE = """
import sys
import jax.numpy as jnp
from jaxpeft.checkpoint import save_adapter
save_adapter(sys.argv[1], {"a": jnp.zeros(2)}, config={"version": "new"}, overwrite=True)
print("finished", flush=True)
"""
RESTORE = """
import sys
from jaxpeft.checkpoint import CheckpointCorruptError, restore_adapter
try:
    restore_adapter(sys.argv[1])
except CheckpointCorruptError as error:
    print("refused:", error, flush=True)
"""


def _child(script: str, *args: str, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop(atomic.PAUSE_ENV, None)
    if pause is not None:
        env[atomic.PAUSE_ENV] = pause
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True
    )


def _read_line(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the child did not pause (rc={proc.poll()}): {proc.stderr.read()[-2000:]}")


def test_sigkill_between_the_renames_is_recovered_by_the_next_restore(tmp_path):
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config={"version": "old"})
    proc = _child(OVERWRITE, str(path), pause="between_renames")
    line = _read_line(proc)
    assert line.strip() == f"{atomic.PAUSED_LINE}:between_renames"
    # The window: the old checkpoint is aside, the new one not yet in.
    assert not path.exists()
    assert [p.name.split(atomic.OLD_TAG)[0] for p in tmp_path.glob(f"*{atomic.OLD_TAG}*")] == [".ckpt"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with pytest.warns(CheckpointRecoveredWarning, match=f"recovered the adapter checkpoint at {path}"):
        adapter, meta = restore_adapter(path)
    assert meta["config"] == {"version": "old"}
    np.testing.assert_array_equal(adapter["a"], np.ones(2))
    assert not list(tmp_path.glob(f"*{atomic.OLD_TAG}*"))
    # The killed save's verified new checkpoint stays in its -tmp- sibling (not deleted: it could be a
    # save still running); saving again works as usual.
    save_adapter(path, {"a": jnp.zeros(2)}, config={"version": "new"}, overwrite=True)
    assert restore_adapter(path)[1]["config"] == {"version": "new"}


def test_refused_restore_prints_nothing_but_the_error(tmp_path):
    # A flipped byte in orbax's top-level OCDBT manifest: handed to orbax, this restore printed
    # "Event loop is closed" tracebacks from tensorstore's threads; checked first, it prints nothing.
    rng = np.random.default_rng(0)
    path = save_adapter(tmp_path / "ckpt", {"big": rng.standard_normal((64, 64)).astype(np.float32)})
    manifest = path / "arrays" / "manifest.ocdbt"
    raw = bytearray(manifest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    manifest.write_bytes(bytes(raw))
    proc = _child(RESTORE, str(path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.startswith("refused:") and "arrays/manifest.ocdbt: sha256 differs" in out, out
    noise = [line for line in err.splitlines() if "Warning" not in line and line.strip()]
    assert "Traceback" not in err and "Event loop is closed" not in err and not noise, err
