"""Which damage to an adapter checkpoint is detected, and what a refused restore prints.

Every file orbax writes under ``arrays/`` is in turn flipped (one byte in the middle), truncated
(to half) or deleted, and ``restore_adapter`` runs in a fresh subprocess, once on the checkpoint as
written (with the file digests) and once with ``files`` / ``metadata_sha256`` stripped from the
metadata (the checks jaxpeft had before the digests: orbax reads first, per-leaf checks after).
Recorded: restored or refused, and the stderr lines that are not warnings (orbax / tensorstore
tracebacks, ``Event loop is closed``).

    python -m benchmarks.bench_checkpoint_corruption
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.common import RESULTS, machine

CHILD = """
import sys
from jaxpeft.checkpoint import restore_adapter
try:
    restore_adapter(sys.argv[1])
    print("restored")
except Exception as error:
    print("refused", type(error).__name__)
"""
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _damage(file: pathlib.Path, how: str) -> None:
    raw = bytearray(file.read_bytes())
    if how == "delete":
        file.unlink()
    elif how == "truncate to half":
        file.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        raw[len(raw) // 2] ^= 0xFF
        file.write_bytes(bytes(raw))


def main() -> None:
    from jaxpeft.checkpoint import save_adapter

    work = pathlib.Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    source = save_adapter(work / "source", {"big": rng.standard_normal((64, 64)).astype(np.float32), "s": np.arange(3)})
    files = sorted(f.relative_to(source).as_posix() for f in (source / "arrays").rglob("*") if f.is_file())
    rows = []
    for how in ("flip one byte", "truncate to half", "delete"):
        for digests in (True, False):
            for name in files:
                target = work / "case"
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)
                _damage(target / name, how)
                if not digests:
                    meta_file = target / "jaxpeft_adapter.json"
                    meta = json.loads(meta_file.read_text())
                    meta.pop("files"), meta.pop("metadata_sha256")
                    meta_file.write_text(json.dumps(meta))
                run = subprocess.run([sys.executable, "-c", CHILD, str(target)], capture_output=True, text=True, cwd=ROOT)
                noise = [line for line in run.stderr.splitlines() if line.strip() and "Warning" not in line]
                rows.append(
                    {
                        "damage": how,
                        "file": name.split("/d/")[0] + "/d/<data file>" if "/d/" in name else name,
                        "file_digests": digests,
                        "outcome": run.stdout.strip(),
                        "stderr_noise_lines": len(noise),
                        "event_loop_closed": "Event loop is closed" in run.stderr,
                    }
                )
    shutil.rmtree(work)
    result = {"machine": machine(), "command": "python -m benchmarks.bench_checkpoint_corruption", "rows": rows}
    (RESULTS / "checkpoint_corruption.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Checkpoint damage: detected or not, and what a refused restore prints",
        "",
        f"{result['machine']['date']}, {result['machine']['platform']}, jax {result['machine']['jax']}; "
        f"`{result['command']}`",
        "",
        "| damage | file | file digests | outcome | stderr noise lines | 'Event loop is closed' |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['damage']} | `{r['file']}` | {'yes' if r['file_digests'] else 'no (before)'} | {r['outcome']} | "
            f"{r['stderr_noise_lines']} | {'yes' if r['event_loop_closed'] else ''} |"
        )
    with_digests = [r for r in rows if r["file_digests"]]
    refused = sum(r["outcome"].startswith("refused") for r in with_digests)
    quiet = sum(r["stderr_noise_lines"] == 0 for r in with_digests)
    before = [r for r in rows if not r["file_digests"]]
    lines += [
        "",
        f"With file digests: {refused} of {len(with_digests)} damaged checkpoints refused, {quiet} of them with no "
        f"stderr noise. Before: {sum(r['outcome'] == 'restored' for r in before)} of {len(before)} restored "
        f"(damage to files orbax does not read back), {sum(r['event_loop_closed'] for r in before)} printed "
        "'Event loop is closed'.",
    ]
    (RESULTS / "checkpoint_corruption.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
