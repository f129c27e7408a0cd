"""``jaxpeft bench``: run the benchmark scripts of a jaxpeft checkout (``benchmarks/bench_*.py``)."""

from __future__ import annotations

import importlib
import pathlib
import sys


def _root() -> pathlib.Path:
    for candidate in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parent.parent):
        if (candidate / "benchmarks" / "__init__.py").exists():
            return candidate
    raise SystemExit("jaxpeft bench: no benchmarks/ folder here; run it from a jaxpeft checkout")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = _root()
    names = sorted(p.stem.removeprefix("bench_") for p in (root / "benchmarks").glob("bench_*.py"))
    if not argv or argv[0] in ("--list", "-h", "--help"):
        print("usage: jaxpeft bench NAME [options]   (options go to the benchmark; NAME --help lists them)")
        print("benchmarks: " + ", ".join(names))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"jaxpeft bench: unknown benchmark {name!r}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    return int(importlib.import_module(f"benchmarks.bench_{name}").main(rest) or 0)
