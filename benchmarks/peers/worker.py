"""One peer, one run: ``python -m benchmarks.peers.worker PEER ROW FILE STEPS`` prints one JSON line.

A fresh process per run, so that the peak RSS is this peer's alone.
"""

from __future__ import annotations

import json
import sys

from benchmarks.peers import shared as S

JAX_PEERS = ("jaxpeft-linen", "jaxpeft-nnx", "nnx-lora", "qwix-lora")
TORCH_PEERS = ("peft-eager", "peft-compile")


def peer_function(name: str):
    if name in JAX_PEERS:
        from benchmarks.peers.jax_peers import PEERS
    elif name in TORCH_PEERS:
        from benchmarks.peers.torch_peers import PEERS
    else:
        raise SystemExit(f"unknown peer {name!r}; known: {', '.join(JAX_PEERS + TORCH_PEERS)}")
    return PEERS[name]


def main(argv: list[str]) -> int:
    name, row, path, steps = argv
    if row not in S.ROWS:
        raise SystemExit(f"unknown row {row!r}; known: {', '.join(S.ROWS)}")
    out = peer_function(name)(row, S.load(path), int(steps))
    out["peak_rss_bytes"] = S.peak_rss_bytes()
    print("PEER_RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
