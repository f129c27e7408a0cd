"""The side-by-side against other PEFT libraries (``jaxpeft bench peers``).

Every peer trains the same model on the same work, each in its own process:

- ``shared.py`` draws one set of weights, one batch and one LoRA ``A`` init from a seed and writes
  them to an ``.npz`` file that every peer process loads (so every peer starts from the same loss);
- ``jax_peers.py`` / ``torch_peers.py``: one function per peer, ``(row, shared, steps) -> figures``;
- ``worker.py``: ``python -m benchmarks.peers.worker PEER ROW FILE STEPS`` runs one peer once and
  prints its figures as one JSON line; ``benchmarks/bench_peers.py`` interleaves the workers.
"""
