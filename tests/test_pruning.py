"""Tests for jaxpeft.pruning against NumPy references and invariants.

* magnitude masks: the kept weights are exactly the first ``n - round(s n)`` of a stable NumPy
  ``argsort(-|w|)`` (ties: the earlier weight is kept), globally or per leaf; weights rounded to a
  coarse grid make ties (and zeros) common so the tie rule is really exercised;
* N:M masks: every group of m along the input axis holds exactly n kept weights, the largest;
* masked training: pruned weights are exactly 0 after every step of Adam / AdamW with weight decay
  while the loss decreases; rewinding is bit-exact.

Every mask function runs eagerly and under ``jax.jit``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.pruning import (
    MaskedUpdatesState,
    apply_mask,
    default_targets,
    iterative_magnitude_pruning,
    magnitude_mask,
    mask_sparsity,
    masked_updates,
    nm_mask,
    rewind,
)
from jaxpeft.train import make_train_step
from jaxpeft.tree import SelectorError

SPARSITIES = [0.0, 0.1, 0.5, 0.73, 0.99]


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def flat(tree):
    return dict(jp.leaves_with_paths(tree))


class Net(nn.Module):
    """Kernels of different scales and sizes, so global and per-layer pruning differ."""

    @nn.compact
    def __call__(self, x):
        x = nn.Embed(10, 12, name="embed")(x)
        x = jnp.tanh(nn.Dense(16, name="dense")(x))
        x = jnp.tanh(nn.DenseGeneral((2, 8), name="heads")(x)).reshape(*x.shape[:-1], 16)
        return nn.Dense(10, name="head")(x)


@pytest.fixture(scope="module")
def params():
    p = Net().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    # Weights on a coarse grid (many exact ties, some zeros); head at another scale than dense.
    scale = {"dense": 1.0, "heads": 0.5, "head": 3.0, "embed": 1.0}

    def draw(path, x):
        top = jp.tree.path_to_str(path).split("/")[0]
        return jnp.asarray(np.round(scale[top] * rng.standard_normal(x.shape), 1), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, p)


KERNELS = ["dense/kernel", "head/kernel", "heads/kernel"]


def np_kept(magnitudes, num_pruned):
    """Reference keep mask: a stable argsort of -|w|, the first n - k kept."""
    keep = np.zeros(magnitudes.size, bool)
    keep[np.argsort(-magnitudes, kind="stable")[: magnitudes.size - num_pruned]] = True
    return keep


# ---------------------------------------------------------------- magnitude masks


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_global_magnitude_mask_keeps_exactly_the_top_weights(params, sparsity, jit):
    mask = maybe_jit(lambda p: magnitude_mask(p, sparsity), jit)(params)
    m, p = flat(mask), flat(params)
    targeted = [path for path in p if default_targets(path, p[path])]
    assert sorted(targeted) == KERNELS  # default: kernels of rank >= 2, not the embedding table
    magnitudes = np.concatenate([np.abs(np.asarray(p[k])).ravel() for k in targeted])
    num_pruned = round(sparsity * magnitudes.size)
    expected = np_kept(magnitudes, num_pruned)
    got = np.concatenate([np.asarray(m[k]).ravel() for k in targeted])
    assert got.dtype == bool
    assert np.array_equal(got, expected)
    assert magnitudes.size - got.sum() == num_pruned
    for path in p:
        if path not in targeted:
            assert m[path] is True or (jit and np.asarray(m[path]).shape == () and bool(m[path]))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_per_layer_magnitude_mask(params, sparsity, jit):
    mask = maybe_jit(lambda p: magnitude_mask(p, sparsity, scope="per_layer"), jit)(params)
    m, p = flat(mask), flat(params)
    for k in KERNELS:
        w = np.abs(np.asarray(p[k])).ravel()
        expected = np_kept(w, round(sparsity * w.size))
        assert np.array_equal(np.asarray(m[k]).ravel(), expected), k
        assert m[k].shape == p[k].shape


def test_global_and_per_layer_differ(params):
    global_mask = flat(magnitude_mask(params, 0.5))
    per_layer = flat(magnitude_mask(params, 0.5, scope="per_layer"))
    # heads/kernel is drawn at 1/6 the scale of head/kernel: one global threshold prunes it harder
    assert 1 - global_mask["heads/kernel"].mean() > 0.5 > 1 - global_mask["head/kernel"].mean()
    assert all(float(1 - per_layer[k].mean()) == pytest.approx(0.5, abs=1 / per_layer[k].size) for k in KERNELS)
    assert mask_sparsity(global_mask) == pytest.approx(0.5, abs=1e-3)


def test_ties_prune_the_later_weight():
    w = {"kernel": jnp.array([[1.0, -2.0], [2.0, -1.0], [0.0, 1.0]])}
    m = np.asarray(magnitude_mask(w, 0.5)["kernel"])
    # |w| = 1 2 / 2 1 / 0 1 in row-major order; prune 3: the 0, then the later two of the three 1s
    assert m.tolist() == [[True, True], [True, False], [False, False]]


def test_targets_selector_and_holes(params):
    m = flat(magnitude_mask(params, 0.5, targets=r"^embed/"))
    assert m["embed/embedding"].shape == (10, 12) and m["dense/kernel"] is True
    # a partition half: None holes stay None, and only selected leaves exist to be pruned
    trainable, _ = jp.partition(params, r"^dense/")
    mask = magnitude_mask(trainable, 0.5)
    assert mask["head"]["kernel"] is None and mask["dense"]["bias"] is True
    assert apply_mask(trainable, mask)["head"]["kernel"] is None


def test_quantized_kernels_are_not_default_targets():
    w = jax.random.normal(jax.random.key(0), (64, 64))
    tree = jp.quantize({"q": {"kernel": w}, "f": {"kernel": w}}, targets=r"^q/")
    mask = magnitude_mask(tree, 0.5)
    assert mask["q"]["kernel"] is True and mask["f"]["kernel"].shape == (64, 64)
    assert apply_mask(tree, mask)["q"]["kernel"] is tree["q"]["kernel"]
    with pytest.raises(TypeError, match=r"'q/kernel'.*QuantizedArray.*dequantize"):
        magnitude_mask(tree, 0.5, targets=r"^q/")


def test_previous_mask_stays_pruned(params):
    first = magnitude_mask(params, 0.3)
    # a weight first pruned for being small would be kept again by a fresh ranking on new values
    grown = jax.tree.map(lambda w, k: w if k is True else jnp.where(k, w, 100.0), params, first)
    second = magnitude_mask(grown, 0.6, mask=first)
    for k in KERNELS:
        assert not np.any(np.asarray(second[k.split("/")[0]]["kernel"]) & ~np.asarray(first[k.split("/")[0]]["kernel"]))
    n = sum(np.size(flat(params)[k]) for k in KERNELS)
    assert mask_sparsity(second) == round(0.6 * n) / n
    # the new weights pruned are the smallest survivors
    m1, m2, p = flat(first), flat(second), flat(grown)
    survivors = np.concatenate([np.abs(np.asarray(p[k]))[np.asarray(m1[k])] for k in KERNELS])
    newly = np.concatenate([np.abs(np.asarray(p[k]))[np.asarray(m1[k]) & ~np.asarray(m2[k])] for k in KERNELS])
    kept = np.concatenate([np.abs(np.asarray(p[k]))[np.asarray(m2[k])] for k in KERNELS])
    assert newly.max() <= kept.min() and newly.size + kept.size == survivors.size


def test_magnitude_mask_random_trees_against_numpy():
    # Random leaf counts and sizes, heavy ties, earlier masks, both scopes: the exact NumPy rule.
    rng = np.random.default_rng(7)
    for trial in range(4):
        def draw():
            shape = (rng.integers(1, 9), rng.integers(1, 9))
            return jnp.asarray(np.round(rng.standard_normal(shape), int(rng.integers(0, 2))), jnp.float32)

        leaves = {f"l{i}": {"kernel": draw()} for i in range(int(rng.integers(1, 4)))}
        earlier = None
        if trial % 2:
            earlier = jax.tree.map(lambda w: jnp.asarray(rng.random(w.shape) < 0.8), leaves)
        sparsity = float(rng.choice([0.0, 0.2, 0.5, 0.9, 0.95]))
        for scope in ("global", "per_layer"):
            mask = magnitude_mask(leaves, sparsity, scope=scope, mask=earlier)
            groups = [list(leaves)] if scope == "global" else [[k] for k in leaves]
            for group in groups:
                scores = np.concatenate([
                    np.where(np.asarray(earlier[k]["kernel"]), np.abs(leaves[k]["kernel"]), -1.0).ravel()
                    if earlier else np.abs(np.asarray(leaves[k]["kernel"])).ravel() for k in group
                ])
                num_pruned = round(sparsity * scores.size)
                expected = np_kept(scores, num_pruned)
                if earlier:
                    expected &= np.concatenate([np.asarray(earlier[k]["kernel"]).ravel() for k in group])
                got = np.concatenate([np.asarray(mask[k]["kernel"]).ravel() for k in group])
                assert np.array_equal(got, expected), (trial, scope, group)


def test_sparsity_is_exact_for_awkward_fractions():
    w = {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((10, 10)), jnp.float32)}
    for s in (0.29, 0.57, 0.999):  # 0.29 * 100 = 28.999999999999996
        assert int((~np.asarray(magnitude_mask(w, s)["kernel"])).sum()) == round(s * 100)


# ---------------------------------------------------------------- N:M


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (4, 4)])
def test_nm_mask(params, n, m, jit):
    targets = ["dense/kernel", "heads/kernel"]  # input axes 12 and 16: multiples of 2, 4 (and 8 for heads)
    if m == 8:
        targets = ["heads/kernel"]
    mask = flat(maybe_jit(lambda p: nm_mask(p, n, m, targets=targets), jit)(params))
    p = flat(params)
    for k in targets:
        w = np.abs(np.asarray(p[k]))
        keep = np.asarray(mask[k])
        assert keep.shape == w.shape
        # groups of m consecutive weights along axis 0, one group per (group, other indices)
        groups_w = np.moveaxis(w, 0, -1).reshape(-1, m)
        groups_k = np.moveaxis(keep, 0, -1).reshape(-1, m)
        assert np.all(groups_k.sum(-1) == n)
        for gw, gk in zip(groups_w, groups_k):
            assert np.array_equal(gk, np_kept(gw, m - n))  # the n largest, the earlier of ties kept
    assert mask_sparsity({k: mask[k] for k in targets}) == pytest.approx(1 - n / m)


def test_nm_mask_large_groups():
    # m > 64 ranks by argsort instead of pairwise comparisons: same rule
    w = np.round(np.random.default_rng(3).standard_normal((256, 3)), 1).astype(np.float32)
    keep = np.asarray(nm_mask({"kernel": jnp.asarray(w)}, 5, 128)["kernel"])
    for column in range(3):
        for group in range(2):
            g = np.abs(w[128 * group: 128 * (group + 1), column])
            assert np.array_equal(keep[128 * group: 128 * (group + 1), column], np_kept(g, 123))


def test_nm_mask_other_axis():
    w = np.arange(24, dtype=np.float32).reshape(2, 12) * np.array([1, -1] * 6, np.float32)
    keep = np.asarray(nm_mask({"kernel": jnp.asarray(w)}, 1, 3, axis=-1)["kernel"])
    # along the last axis the largest of each run of 3 is its last entry
    assert keep.reshape(2, 4, 3).tolist() == [[[False, False, True]] * 4] * 2


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_before_work(params):
    for bad in (-0.1, 1.0, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_mask(params, bad)
    with pytest.raises(ValueError, match="scope"):
        magnitude_mask(params, 0.5, scope="layer")
    with pytest.raises(SelectorError, match=r"Closest paths: \['dense/kernel'"):
        magnitude_mask(params, 0.5, targets=r"dense/kernal")
    with pytest.raises(ValueError, match="n=3.*m=2"):
        nm_mask(params, 3, 2)
    for n, m in ((0, 4), (2, 0), (2.0, 4)):
        with pytest.raises(ValueError, match="positive int"):
            nm_mask(params, n, m)
    # every offending leaf is named with its shape: 12 and 10 rows are not multiples of 8, 16 is
    with pytest.raises(
        ValueError, match=r"'dense/kernel' has shape \(12, 16\).*m=8.*'embed/embedding' has shape \(10, 12\)"
    ) as error:
        nm_mask(params, 2, 8, targets=["dense/kernel", "head/kernel", r"^embed/"])
    assert "head/kernel" not in str(error.value)
    with pytest.raises(ValueError, match=r"'dense/bias' has shape \(16,\): no axis 1"):
        nm_mask(params, 2, 4, targets="dense/bias", axis=1)
    ints = {"kernel": jnp.ones((4, 4), jnp.int32)}
    with pytest.raises(TypeError, match=r"'kernel' \(shape \(4, 4\)\).*int32"):
        magnitude_mask(ints, 0.5, targets="kernel")
    mask = magnitude_mask(params, 0.5)
    with pytest.raises(ValueError, match="structure"):
        apply_mask({"dense": params["dense"]}, mask)
    wrong = jax.tree.map(lambda k: k, mask)
    wrong["dense"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(3, 3\), the parameter \(12, 16\)"):
        apply_mask(params, wrong)
    with pytest.raises(ValueError, match="structure"):
        masked_updates(optax.adam(1e-3), mask).init({"dense": params["dense"]})


# ---------------------------------------------------------------- masked training


@pytest.fixture(scope="module")
def lm():
    config = LMConfig.tiny()
    model = LinenLM(config)
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, config.vocab_size, (8, 16)).astype(np.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    return model, params, {"inputs": tokens, "targets": np.roll(tokens, -1, 1)}


def fresh(tree):
    """A copy: make_train_step donates the trainable tree, and apply_mask / partition share leaves."""
    return jax.tree.map(jnp.array, tree)


def lm_loss(model):
    def loss_fn(trainable, frozen, batch, rng):
        logits = model.apply({"params": jp.combine(trainable, frozen)}, batch["inputs"])
        return jp.cross_entropy(logits, batch["targets"])[0]

    return loss_fn


def pruned_values(params, mask):
    """All weights the mask prunes, as one array."""
    return np.concatenate([
        np.asarray(w)[~np.asarray(k)] for k, w in zip(jax.tree.leaves(mask), jax.tree.leaves(params))
        if np.ndim(k) > 0
    ])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "clipped_adamw"])
def test_masked_training_keeps_pruned_weights_at_zero(lm, optimizer):
    # jitted here; test_nnx_state runs masked_updates eagerly
    model, params, batch = lm
    params = fresh(params)
    inner = {
        "adam": optax.adam(1e-2),
        "adamw": optax.adamw(1e-2, weight_decay=0.1),
        "clipped_adamw": optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1)),
    }[optimizer]
    mask = magnitude_mask(params, 0.6)
    trainable, frozen = jp.partition(apply_mask(params, mask), True)
    opt = masked_updates(inner, mask)
    state = opt.init(trainable)
    step = make_train_step(lm_loss(model), opt)
    start = jax.tree.map(np.array, trainable)
    losses = []
    for _ in range(8):
        trainable, state, metrics = step(trainable, frozen, state, batch, None)
        losses.append(float(metrics["loss"]))
        assert np.all(pruned_values(trainable, mask) == 0.0)
    assert losses[-1] < losses[0] - 0.1, losses
    # the kept weights did train, and the untargeted leaves too
    kept = lambda t: np.concatenate([np.asarray(w)[np.asarray(k)] for k, w in  # noqa: E731
                                     zip(jax.tree.leaves(mask), jax.tree.leaves(t)) if np.ndim(k) > 0])
    assert not np.array_equal(kept(trainable), kept(start))
    assert not np.array_equal(trainable["norm_final"]["scale"], start["norm_final"]["scale"])
    # Adam never saw a pruned gradient: its moments are 0 there
    inner_state = state.inner_state
    mu = next(s.mu for s in jax.tree.leaves(inner_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
    assert np.all(pruned_values(mu, mask) == 0.0)


def test_without_the_wrapper_pruned_weights_move(lm):
    model, params, batch = lm
    params = fresh(params)
    mask = magnitude_mask(params, 0.6)
    trainable, frozen = jp.partition(apply_mask(params, mask), True)
    opt = optax.adamw(1e-2, weight_decay=0.1)
    trainable, _, _ = make_train_step(lm_loss(model), opt)(trainable, frozen, opt.init(trainable), batch, None)
    assert np.count_nonzero(pruned_values(trainable, mask)) > 0


def test_masked_updates_zero_pruned_weights_even_without_apply_mask(lm):
    model, params, batch = lm
    params = fresh(params)
    mask = nm_mask(params, 2, 4)
    trainable, frozen = jp.partition(params, True)  # apply_mask forgotten
    opt = masked_updates(optax.adamw(1e-2, weight_decay=0.1), lambda p: nm_mask(p, 2, 4))  # a mask function
    state = opt.init(trainable)
    assert isinstance(state, MaskedUpdatesState)
    step = make_train_step(lm_loss(model), opt)
    for _ in range(2):
        trainable, state, _ = step(trainable, frozen, state, batch, None)
        assert np.all(pruned_values(trainable, mask) == 0.0)
    # without params the pruned updates are 0: the weights stay where apply_mask put them
    sgd = masked_updates(optax.sgd(1.0), mask)
    updates, _ = sgd.update(jax.tree.map(jnp.ones_like, trainable), sgd.init(trainable))
    assert np.all(pruned_values(updates, mask) == 0.0)


def test_masked_training_of_a_partition_half(lm):
    model, params, batch = lm
    params = fresh(params)
    trainable, frozen = jp.partition(params, r"mlp/")
    mask = magnitude_mask(trainable, 0.5)  # None holes where frozen leaves are
    trainable = apply_mask(trainable, mask)
    opt = masked_updates(optax.adamw(1e-2, weight_decay=0.1), mask)
    state = opt.init(trainable)
    step = make_train_step(lm_loss(model), opt)
    for _ in range(3):
        trainable, state, _ = step(trainable, frozen, state, batch, None)
    assert np.all(pruned_values(trainable, mask) == 0.0)
    assert mask_sparsity(mask) == 0.5


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])  # eager: slow (CI budget)
def test_nnx_state(jit):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, 16, rngs=rngs)
            self.down = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.down(jnp.tanh(self.up(x)))

    graphdef, trainable, frozen = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    mask = nm_mask(trainable, 2, 4)
    assert isinstance(mask["up"]["kernel"], nnx.Param) and mask["up"]["kernel"].get_value().shape == (8, 16)
    trainable = apply_mask(trainable, mask)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jnp.sin(x[:, :4])

    def loss_fn(trainable, frozen, batch, rng):
        return jnp.mean((nnx.merge(graphdef, trainable, frozen)(batch[0]) - batch[1]) ** 2)

    opt = masked_updates(optax.adamw(1e-2, weight_decay=0.1), mask)
    state = opt.init(trainable)
    step = make_train_step(loss_fn, opt, jit=jit)
    losses = []
    for _ in range(5):
        trainable, state, metrics = step(trainable, frozen, state, (x, y), None)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for name in ("up", "down"):
        w = np.asarray(trainable[name]["kernel"].get_value())
        k = np.asarray(mask[name]["kernel"].get_value())
        assert np.all(w[~k] == 0.0) and np.count_nonzero(w[k]) == k.sum()


# ---------------------------------------------------------------- rewinding and IMP


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_rewind_is_bit_exact(lm, jit):
    model, early, batch = lm
    early = fresh(early)
    # "trained": every weight moved, by a different amount
    noise = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).standard_normal(x.shape), x.dtype), early)
    trainable = jax.tree.map(lambda x, n: x + 0.1 * n, early, noise)
    mask = magnitude_mask(trainable, 0.8)
    ticket = maybe_jit(rewind, jit)(trainable, mask, early)
    for path, w in flat(ticket).items():
        e, k = np.asarray(flat(early)[path]), flat(mask)[path]
        if np.ndim(k) > 0:
            k = np.asarray(k)
            assert np.array_equal(np.asarray(w)[k], e[k]) and np.all(np.asarray(w)[~k] == 0.0), path
        else:
            assert np.array_equal(np.asarray(w), e), path  # untargeted leaves rewind too
        assert np.asarray(w).dtype == e.dtype
    wrong = jax.tree.map(lambda x: x, early)
    wrong["head"] = {"kernel": wrong["head"]["kernel"][:, :3], "bias": wrong["head"]["bias"]}
    with pytest.raises(ValueError, match=r"'head/kernel' is float32\[32, 3\], the parameter float32\[32, 64\]"):
        rewind(trainable, mask, wrong)
    with pytest.raises(ValueError, match="structure"):
        rewind(trainable, mask, {"head": early["head"]})


def test_iterative_magnitude_pruning():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, name="head")(jnp.tanh(nn.Dense(32, name="body")(x)))

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.sin(x.sum(-1, keepdims=True))
    params = model.init(jax.random.key(1), x)["params"]

    def loss_fn(trainable, frozen, batch, rng):
        return jnp.mean((model.apply({"params": jp.combine(trainable, frozen)}, batch[0]) - batch[1]) ** 2)

    # The mask lives in the optimizer state, so one compiled step serves every round's mask.
    step = make_train_step(loss_fn, masked_updates(optax.adam(1e-2), lambda p: magnitude_mask(p, 0.0)))
    calls = []

    def train_fn(p, mask):
        calls.append(mask_sparsity(mask))
        opt = masked_updates(optax.adam(1e-2), mask)
        trainable, frozen = jp.partition(p, True)
        state = opt.init(trainable)
        for _ in range(5):
            trainable, state, _ = step(trainable, frozen, state, (x, y), None)
        return trainable

    ticket, mask, sparsities = iterative_magnitude_pruning(train_fn, params, sparsity=0.875, rounds=3)
    n = 8 * 32 + 32 * 1
    assert calls == [0.0] + sparsities[:-1]
    # each round prunes half the survivors: 1 - 0.125 ** (r / 3) = 0.5, 0.75, 0.875
    assert sparsities == [round(s * n) / n for s in (0.5, 0.75, 0.875)]
    assert np.all(pruned_values(ticket, mask) == 0.0)
    for path, w in flat(ticket).items():
        k = flat(mask)[path]
        k = np.asarray(k) if np.ndim(k) > 0 else np.ones(np.shape(w), bool)
        assert np.array_equal(np.asarray(w)[k], np.asarray(flat(params)[path])[k]), path
    # params survived the donating steps (train_fn gets copies) and the ticket trains
    trained = train_fn(ticket, mask)
    assert np.all(pruned_values(trained, mask) == 0.0)
    with pytest.raises(ValueError, match="rounds"):
        iterative_magnitude_pruning(train_fn, params, sparsity=0.5, rounds=0)
