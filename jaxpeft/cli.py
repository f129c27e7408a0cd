"""The ``jaxpeft`` command: ``jaxpeft demo``, ``jaxpeft bench`` and ``jaxpeft convert``."""

from __future__ import annotations

import sys

USAGE = """usage: jaxpeft <command> [options]

commands:
  demo    pretrain a small LM, LoRA-adapt it to a new domain, save/restore/merge the adapter
  bench   run a benchmark from benchmarks/ (jaxpeft bench --list)
  convert adapter formats: `jaxpeft convert to-peft SRC DST` / `jaxpeft convert from-peft SRC DST` (HF PEFT)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from jaxpeft.demo.run import main as demo

        return demo(rest)
    if command == "bench":
        from jaxpeft.bench import main as bench

        return bench(rest)
    if command == "convert":
        from jaxpeft.interop.convert import main as convert

        return convert(rest)
    print(f"jaxpeft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
