"""Same seed and data give bit-identical training runs on CPU (issue 11, item 6).

A run here is LoRA with dropout (so the per-step keys matter) and a trainable head on the
reference LM, through ``jp.fit``: the final trainable tree and every logged loss must be equal
bit for bit, in one process (Linen and NNX) and across two processes (fresh compilation). A
different seed must change the result, so the comparison can fail. What to expect on GPU / TPU
is in docs/safety.md.
"""

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, NnxLM

CONFIG = LMConfig.tiny()


def batches(i):
    return jax.random.randint(jax.random.fold_in(jax.random.key(100), i), (4, 12), 0, CONFIG.vocab_size)


def lm_loss(logits, tokens):
    return jp.cross_entropy(logits[:, :-1], tokens[:, 1:])[0]


def run_linen(seed: int, num_steps: int = 4):
    model = LinenLM(CONFIG)
    key = jax.random.key(seed)
    base = model.init(key, batches(0))["params"]
    peft = jp.lora(rank=4, alpha=8, dropout=0.1)
    peft_model, params = jp.apply(peft, model, jax.random.fold_in(key, 1), batches(0), params=base)
    trainable, frozen = jp.partition(params, (peft.trainable, r"^head/"))

    def loss_fn(t, f, tokens, rng):
        return lm_loss(peft_model.apply(jp.combine(t, f), tokens, rngs={"dropout": rng}), tokens)

    opt = optax.adamw(3e-3)
    result = jp.fit(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable), batches,
                    num_steps=num_steps, rng=jax.random.fold_in(key, 2), log_every=1, progress=False)
    return result


def run_nnx(seed: int, num_steps: int = 4):
    model = NnxLM(CONFIG, rngs=nnx.Rngs(seed))
    peft_model = jp.apply(jp.lora(rank=4, alpha=8), model, jax.random.key(seed + 1))
    graphdef, trainable, frozen = nnx.split(peft_model, jp.PeftParam, ...)

    def loss_fn(t, f, tokens, rng):
        return lm_loss(nnx.merge(graphdef, t, f)(tokens), tokens)

    opt = optax.adamw(3e-3)
    return jp.fit(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable), batches,
                  num_steps=num_steps, rng=jax.random.key(seed + 2), log_every=1, progress=False)


def digest(result) -> str:
    h = hashlib.sha256()
    for path, leaf in jp.leaves_with_paths(result.trainable):
        if leaf is not None:
            h.update(path.encode())
            h.update(np.asarray(leaf).tobytes())
    for entry in result.history:
        h.update(np.float64(entry["loss"]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("run", [run_linen, pytest.param(run_nnx, marks=pytest.mark.slow)], ids=["linen", "nnx"])  # nnx: slow (CI budget)
def test_same_seed_same_run_bit_for_bit(run):
    a, b = run(0), run(0)
    assert [e["loss"] for e in a.history] == [e["loss"] for e in b.history]
    for (p, x), (q, y) in zip(jp.leaves_with_paths(a.trainable), jp.leaves_with_paths(b.trainable)):
        assert p == q
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)
    assert digest(a) == digest(b)
    assert digest(run(1)) != digest(a)  # and the comparison can tell runs apart


@pytest.mark.slow
def test_bit_identical_across_processes():
    """A fresh process recompiles everything and must still land on the same bits."""
    here = digest(run_linen(0))
    code = "import sys; sys.path.insert(0, 'tests'); import test_determinism as t; print(t.digest(t.run_linen(0)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    assert out.stdout.strip().splitlines()[-1] == here
