"""The contract every method keeps, one table (in the spirit of HF PEFT's TEST_CASES).

One row per method configuration, crossed with Linen / NNX and jit / eager. Each row checks, on a
one-layer reference LM:

* identity at init, where the method defines one (``method.identity_at_init``);
* ``merge`` equals the unmerged model and ``unmerge(merge(p)) == p``, where they exist
  (``method.merges`` / ``method.unmerges``);
* save / restore of the adapter leaves, and the config round trip (the transform rebuilt from its
  saved config equals it);
* a few optimizer steps lower the loss (a jitted train step; the eager rows check the forward only).

Linen == NNX from one seed is a separate table (``test_linen_equals_nnx_from_one_seed``). Stacked
layers are a third, compact table (``test_stacked_contract``): every row on the reference LM with
``scan_layers=True`` (Linen ``nn.scan``, NNX ``nnx.vmap`` + ``nnx.scan``) checks identity at init,
Linen == NNX (leaves bit for bit, outputs at init and moved off it), merge == unmerged in both
bindings and ``unmerge(merge(p)) == p`` on the ``[L, ...]`` kernels; a method the NNX stack refuses
(``NNX_STACK_REFUSES``) must refuse naming the layer. A new method gets all of this by adding one
row to ``ROWS``; its own test file keeps its math checks against NumPy references (stacked ==
unrolled: ``tests/test_scan.py``; whole-model operations on stacks: ``tests/test_stacked_ops.py``).

Tolerances: fp32 forward of a 1-layer, 16-wide LM: 1e-5 (merge round trips: 1e-5 relative to O(1)
kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params

CONFIG = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_seq_len=16)
TOKENS = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
TARGETS = jnp.roll(TOKENS, -1, axis=1)
QV = r"attn/(query|value)$"
TOL = dict(rtol=1e-5, atol=1e-5)

ROWS = {
    "lora": jp.lora(2, 4.0, targets=QV),
    "lora-rslora-patterns": jp.lora(2, 4.0, targets=QV + r"|mlp/up$", rslora=True, rank_pattern={"mlp": 4}),
    "lora-pissa": jp.lora(2, 4.0, targets=QV, init="pissa"),
    "dora": jp.dora(2, 4.0, targets=QV),
    "ia3": jp.ia3(),
    "lokr": jp.lokr(rank=2, targets=QV),
    "houlsby": jp.houlsby(bottleneck=4),
    "pfeiffer": jp.pfeiffer(reduction_factor=4),
    "compacter": jp.compacter(2, bottleneck=4),
    "prefix": jp.prefix_tuning(2, targets=r"attn/(key|value)$"),
    "prefix-reparam": jp.prefix_tuning(2, targets=r"attn/(key|value)$", reparam="shared", reparam_hidden=8),
    "prompt": jp.prompt_tuning(3),
    "p-tuning": jp.p_tuning(3, hidden_size=8),
}


@pytest.fixture(scope="module")
def base():
    return LinenLM(CONFIG).init(jax.random.key(0), TOKENS)["params"]


def rebuild(config):
    """The transform a saved config describes (the registry's ``from_config`` when it exists)."""
    try:
        from jaxpeft.registry import from_config
    except ImportError:  # before the registry lands: the methods' own classes by name
        classes = {type(m).name: type(m) for m in ROWS.values()}
        fields = {k: v for k, v in config.items() if k != "method"}
        return classes[config["method"]](**fields)
    return from_config(config)


class Row:
    """One method bound to the reference LM in one binding, behind the same calls."""

    def __init__(self, method, binding, base):
        self.method, self.binding, self.base = method, binding, base
        if binding == "linen":
            self.model = LinenLM(CONFIG)
            self.peft_model, self.params = jp.apply(method, self.model, jax.random.key(1), TOKENS, params=base)
        else:
            self.model = nnx_from_linen_params(CONFIG, base)
            self.peft_model = jp.apply(method, self.model, jax.random.key(1))

    def split(self):
        if self.binding == "linen":
            return jp.partition(self.params, self.peft_model.trainable)
        graphdef, trainable, frozen = nnx.split(self.peft_model, jp.PeftParam, ...)
        self.graphdef = graphdef
        return trainable, frozen

    def forward(self, trainable, frozen, tokens):
        if self.binding == "linen":
            return self.peft_model.apply(jp.combine(trainable, frozen), tokens)
        return nnx.merge(self.graphdef, trainable, frozen)(tokens)

    def base_forward(self, tokens):
        if self.binding == "linen":
            return self.model.apply({"params": self.base}, tokens)
        return self.model(tokens)

    def with_trainable(self, trainable):
        if self.binding == "linen":
            frozen = jp.partition(self.params, self.peft_model.trainable)[1]
            self.params = jp.combine(trainable, frozen)
        else:
            nnx.update(self.peft_model, trainable)

    def merged_forward(self, tokens):
        if self.binding == "linen":
            return self.model.apply({"params": jp.merge(self.peft_model, self.params)}, tokens)
        return jp.merge(self.peft_model)(tokens)

    def round_trip(self):
        """``(unmerge(merge(p)), p)`` as two pure trees of the base kernels."""
        if self.binding == "linen":
            back = jp.unmerge(self.peft_model, jp.merge(self.peft_model, self.params), self.params)
            return back, self.params
        back = jp.unmerge(self.peft_model, jp.merge(self.peft_model))
        return nnx.to_pure_dict(nnx.state(back, nnx.Param)), nnx.to_pure_dict(nnx.state(self.peft_model, nnx.Param))


def _perturb(trainable, seed=3):
    """Move every trainable leaf (B = 0 at init would hide an update)."""
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _loss(row):
    def loss_fn(trainable, frozen, batch, rng):
        logits = row.forward(trainable, frozen, batch["inputs"])
        return jp.cross_entropy(logits, batch["targets"])[0]

    return loss_fn


def _cases():
    """Every row x binding x mode; CI runs each method once (jit, Linen and NNX alternating), the rest is slow."""
    for i, name in enumerate(ROWS):
        for binding in ("linen", "nnx"):
            for mode in ("jit", "eager"):
                fast = mode == "jit" and binding == ("linen", "nnx")[i % 2]
                marks = () if fast else (pytest.mark.slow,)
                yield pytest.param(name, binding, mode, marks=marks, id=f"{name}-{binding}-{mode}")


@pytest.mark.parametrize("name, binding, mode", list(_cases()))
def test_contract(name, binding, mode, base, tmp_path):
    method = ROWS[name]
    row = Row(method, binding, base)
    trainable, frozen = row.split()
    forward = jax.jit(row.forward) if mode == "jit" else row.forward

    # identity at init
    if method.identity_at_init:
        np.testing.assert_allclose(forward(trainable, frozen, TOKENS), row.base_forward(TOKENS), rtol=1e-4, atol=1e-4)

    # merge == unmerged, unmerge(merge(p)) == p
    tuned = _perturb(trainable)
    y = forward(tuned, frozen, TOKENS)
    row.with_trainable(tuned)
    if method.merges:
        np.testing.assert_allclose(row.merged_forward(TOKENS), y, rtol=1e-4, atol=1e-4)
        if method.unmerges:
            back, params = row.round_trip()
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), jp.partition(back, r"kernel$")[0],
                         jp.partition(params, r"kernel$")[0])

    if mode == "eager":
        return  # the rest does not depend on the forward's mode: checked once, in the jit row

    # save / restore and the config round trip
    pure = jp.prune(nnx.to_pure_dict(tuned) if binding == "nnx" else tuned)
    jp.save_adapter(tmp_path / "adapter", pure, config=method.config())
    restored, meta = jp.restore_adapter(tmp_path / "adapter", config=method.config())
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, pure))
    assert rebuild(meta["config"]) == method

    # a few steps lower the loss
    opt = optax.adam(3e-2)
    step = jp.make_train_step(_loss(row), opt, donate=False)
    batch = {"inputs": TOKENS, "targets": TARGETS}
    loss_fn = _loss(row)
    before = float(loss_fn(tuned, frozen, batch, None))
    state, params = opt.init(tuned), tuned
    for _ in range(4):
        params, state, _ = step(params, frozen, state, batch, None)
    assert float(loss_fn(params, frozen, batch, None)) < before


def _leaves(tree):
    """``{path: array}``; NNX lists a shared leaf under a layer's ``shared`` reference: use Linen's path."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if "shared" in keys:
            keys = ["peft_shared", *keys[keys.index("shared") + 1 :]]
        out["/".join(keys)] = np.asarray(value)
    return out


LINEN_NNX_IN_CI = ("lora", "ia3", "lora-pissa", "prompt")


def _linen_nnx_cases():
    for name in ROWS:
        yield pytest.param(name, marks=() if name in LINEN_NNX_IN_CI else (pytest.mark.slow,), id=name)


@pytest.mark.parametrize("name", list(_linen_nnx_cases()))
def test_linen_equals_nnx_from_one_seed(name, base):
    method = ROWS[name]
    linen = Row(method, "linen", base)
    nnx_row = Row(method, "nnx", base)
    linen_leaves = _leaves(linen.split()[0])
    nnx_leaves = _leaves(nnx.to_pure_dict(nnx_row.split()[0]))
    assert sorted(linen_leaves) == sorted(nnx_leaves)
    for path, value in linen_leaves.items():
        np.testing.assert_array_equal(nnx_leaves[path], value, err_msg=path)


# -- stacked layers: every row on the scanned reference LM ---------------------------------------

STACKED = CONFIG.replace(num_layers=2, scan_layers=True)
# Leaves shared by all sites (one module every layer references) would be sliced by nnx.scan.
NNX_STACK_REFUSES = {"compacter": "Compacter", "prefix-reparam": "PrefixTuning"}


@pytest.fixture(scope="module")
def stacked_base():
    return LinenLM(STACKED).init(jax.random.key(0), TOKENS)["params"]


# CI runs one row per method family (and both refusals); the variants are slow.
STACKED_SLOW = ("lora-rslora-patterns", "lora-pissa", "lokr", "houlsby", "prefix", "p-tuning")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=(pytest.mark.slow,) if n in STACKED_SLOW else ()) for n in ROWS]
)
def test_stacked_contract(name, stacked_base, tmp_path):
    """Identity at init, save / restore, Linen == NNX and merge on ``[L, ...]`` kernels (nn.scan vs nnx.vmap +
    nnx.scan); training on stacks: ``test_stacked_training_lowers_the_loss``."""
    method = ROWS[name]
    model = LinenLM(STACKED)
    peft_model, params = jp.apply(method, model, jax.random.key(1), TOKENS, params=stacked_base)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    forward = jax.jit(lambda t, f: peft_model.apply(jp.combine(t, f), TOKENS))
    y = forward(trainable, frozen)
    if method.identity_at_init:
        np.testing.assert_allclose(y, model.apply({"params": stacked_base}, TOKENS), rtol=1e-4, atol=1e-4)
    stacked_leaves = [x for x in jax.tree.leaves(jp.prune(trainable)) if x.ndim and x.shape[0] == STACKED.num_layers]
    assert stacked_leaves or name in ("prompt", "p-tuning"), "no PEFT leaf carries the layer axis"
    # save / restore of the [L, ...] leaves and the config round trip
    pure = jp.prune(_perturb(trainable))
    jp.save_adapter(tmp_path / "adapter", pure, config=method.config())
    restored, meta = jp.restore_adapter(tmp_path / "adapter", config=method.config())
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, pure))
    assert rebuild(meta["config"]) == method

    nnx_base = nnx_from_linen_params(STACKED, stacked_base)
    if name in NNX_STACK_REFUSES:
        with pytest.raises(ValueError, match=rf"{NNX_STACK_REFUSES[name]} shares leaves .*NNX layer stack at 'layers/\S+'"):
            jp.apply(method, nnx_base, jax.random.key(1))
        return
    nnx_model = jp.apply(method, nnx_base, jax.random.key(1))
    graphdef, nnx_trainable, nnx_frozen = nnx.split(nnx_model, jp.PeftParam, ...)
    linen_leaves, nnx_leaves = _leaves(trainable), _leaves(nnx.to_pure_dict(nnx_trainable))
    assert sorted(linen_leaves) == sorted(nnx_leaves)
    for path, value in linen_leaves.items():
        np.testing.assert_array_equal(nnx_leaves[path], value, err_msg=path)
    nnx_forward = jax.jit(lambda t, f: nnx.merge(graphdef, t, f)(TOKENS))
    np.testing.assert_allclose(nnx_forward(nnx_trainable, nnx_frozen), y, **TOL)
    # Moved off init (B = 0 would hide a wrong layer slice): the same leaves give the same outputs.
    tuned = _perturb(trainable)
    nnx_tuned = nnx.state(nnx_model, jp.PeftParam)
    nnx.replace_by_pure_dict(nnx_tuned, jp.prune(tuned))
    y_tuned = forward(tuned, frozen)
    np.testing.assert_allclose(nnx_forward(nnx_tuned, nnx_frozen), y_tuned, **TOL)
    if not method.merges:
        return
    # merge == unmerged on the [L, ...] kernels, unmerge(merge(p)) == p (both bindings).
    tuned_params = jp.combine(tuned, frozen)
    merged = jp.merge(peft_model, tuned_params)
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), y_tuned, rtol=1e-4, atol=1e-4)
    nnx.update(nnx_model, nnx_tuned)
    np.testing.assert_allclose(jp.merge(nnx_model)(TOKENS), y_tuned, rtol=1e-4, atol=1e-4)
    if method.unmerges:
        back = jp.unmerge(peft_model, merged, tuned_params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), jp.partition(back, r"kernel$")[0],
                     jp.partition(tuned_params, r"kernel$")[0])


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in ("lora", "ia3") else (pytest.mark.slow,)) for n in ROWS]
)
def test_stacked_training_lowers_the_loss(name, stacked_base):
    """A few jitted Adam steps on the scanned LM's ``[L, ...]`` PEFT leaves lower the loss (Linen)."""
    method = ROWS[name]
    peft_model, params = jp.apply(method, LinenLM(STACKED), jax.random.key(1), TOKENS, params=stacked_base)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable = _perturb(trainable)

    def loss_fn(t, f, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), batch["inputs"]), batch["targets"])[0]

    opt = optax.adam(3e-2)
    step = jp.make_train_step(loss_fn, opt, donate=False)
    batch = {"inputs": TOKENS, "targets": TARGETS}
    before = float(loss_fn(trainable, frozen, batch, None))
    state, tuned = opt.init(trainable), trainable
    for _ in range(4):
        tuned, state, _ = step(tuned, frozen, state, batch, None)
    assert float(loss_fn(tuned, frozen, batch, None)) < before
