"""Tests for jaxpeft.train: the step's gradient against NumPy math, frozen leaves untouched,
optimizer state only for trainable leaves, eval weighting, early stopping, fit, NNX.

Every public function runs with ``jit=True`` and ``jit=False``; ownership flows are in test_train_ownership.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.optim import decay_mask, multi_lr, state_bytes, tree_bytes, warmup_cosine
from jaxpeft.train import (
    EarlyStopping,
    EarlyStoppingState,
    TrainResult,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
)

JIT = pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["jit", "nojit"])  # eager twins: slow (CI budget)


# ---------------------------------------------------------------- problems


def regression_data(n=32, d=5, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(n, d).astype(np.float32)
    w_true = rs.randn(d, 1).astype(np.float32)
    y = (x @ w_true + 0.3).astype(np.float32)
    return x, y


def regression_loss(trainable, frozen, batch, rng):
    p = jp.combine(trainable, frozen)
    x, y = batch
    residual = x @ p["w"] + p["b"] - y
    return 0.5 * jnp.mean(residual**2)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(16, name="body")(x))
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(1, name="head")(x)


def mlp_setup(selector):
    x, y = regression_data(64, 4, seed=1)
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    trainable, frozen = jp.partition(params, selector)

    def loss_fn(trainable, frozen, batch, rng):
        xb, yb = batch
        pred = model.apply({"params": jp.combine(trainable, frozen)}, xb)
        loss = jnp.mean((pred - yb) ** 2)
        return loss, {"mae": jnp.mean(jnp.abs(pred - yb))}

    return params, trainable, frozen, loss_fn, (jnp.asarray(x), jnp.asarray(y))


def to_numpy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


# ---------------------------------------------------------------- make_train_step


@JIT
def test_sgd_step_matches_numpy_gradient(jit):
    x, y = regression_data()
    w0 = np.random.RandomState(1).randn(5, 1).astype(np.float32)
    b0 = np.float32(0.7)
    trainable, frozen = jp.partition({"w": jnp.asarray(w0), "b": jnp.asarray(b0)}, r"^w$")
    lr = 0.05
    step = make_train_step(regression_loss, optax.sgd(lr), jit=jit)
    opt_state = optax.sgd(lr).init(trainable)
    new_trainable, _, metrics = step(trainable, frozen, opt_state, (x, y), None)

    # d/dw 0.5 mean((x w + b - y)^2) = x^T (x w + b - y) / n, in float64
    x64, y64, w64 = x.astype(np.float64), y.astype(np.float64), w0.astype(np.float64)
    residual = x64 @ w64 + float(b0) - y64
    grad = x64.T @ residual / len(x64)
    # float32 forward/backward over n=32 rows: relative error ~1e-6; 1e-5 leaves headroom
    np.testing.assert_allclose(np.asarray(new_trainable["w"]), w64 - lr * grad, rtol=1e-5, atol=1e-6)
    assert new_trainable["b"] is None
    assert float(metrics["loss"]) == pytest.approx(0.5 * np.mean(residual**2), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(np.linalg.norm(grad), rel=1e-5)
    assert set(metrics) == {"loss", "grad_norm"}


def test_step_gradient_matches_finite_differences():
    x, y = regression_data()
    w0 = np.random.RandomState(2).randn(5, 1)
    trainable, frozen = jp.partition({"w": jnp.asarray(w0, jnp.float32), "b": jnp.float32(0.1)}, r"^w$")
    step = make_train_step(regression_loss, optax.sgd(1.0), jit=False)
    new, _, _ = step(trainable, frozen, optax.sgd(1.0).init(trainable), (x, y), None)
    grad = w0 - np.asarray(new["w"], np.float64)  # lr = 1: the update is -grad

    def loss64(w):
        return 0.5 * np.mean((x.astype(np.float64) @ w + 0.1 - y) ** 2)

    eps = 1e-5
    fd = np.zeros_like(w0)
    for i in range(5):
        e = np.zeros_like(w0)
        e[i, 0] = eps
        fd[i, 0] = (loss64(w0 + e) - loss64(w0 - e)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)  # float32 step vs float64 central diff


@JIT
def test_training_lowers_loss_and_leaves_frozen_bit_identical(jit):
    params, trainable, frozen, loss_fn, batch = mlp_setup(r"^(head|norm)/")
    frozen_before = to_numpy(frozen)
    opt = optax.adam(1e-2)
    opt_state = opt.init(trainable)

    # Optimizer state only for the trainable leaves: Adam = mu + nu (each a copy of trainable) + count.
    n_trainable = len(jax.tree.leaves(trainable))
    assert n_trainable == 4  # head kernel/bias, norm scale/bias
    assert len(jax.tree.leaves(opt_state)) == 2 * n_trainable + 1
    head_norm_bytes = (16 * 1 + 1 + 16 + 16) * 4
    assert state_bytes(opt_state) == 2 * head_norm_bytes + 4
    assert state_bytes(opt_state) < tree_bytes(params)

    step = make_train_step(loss_fn, opt, has_aux=True, jit=jit)
    first = None
    for i in range(60):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        first = float(metrics["loss"]) if first is None else first
    last = float(loss_fn(trainable, frozen, batch, None)[0])
    assert last < 0.5 * first
    assert set(metrics) == {"loss", "grad_norm", "mae"}
    for path, before in jp.leaves_with_paths(frozen_before):
        if before is not None:
            assert np.array_equal(np.asarray(dict(jp.leaves_with_paths(frozen))[path]), before), path
    # structure of the state unchanged by training
    assert len(jax.tree.leaves(opt_state)) == 2 * n_trainable + 1


def _donated_args(lowered):
    return [i for i, a in enumerate(jax.tree.leaves(lowered.args_info)) if getattr(a, "donated", False)]


def test_direct_step_donates_nothing_and_the_donating_variant_never_frozen():
    _, trainable, frozen, loss_fn, batch = mlp_setup(r"^head/")
    opt = optax.adam(1e-2)
    opt_state = opt.init(trainable)
    step = make_train_step(loss_fn, opt, has_aux=True)
    assert _donated_args(step.lower(trainable, frozen, opt_state, batch, jax.random.key(0))) == []
    n_t, n_f, n_o = (len(jax.tree.leaves(t)) for t in (trainable, frozen, opt_state))
    owning = step.donating.lower(trainable, frozen, opt_state, batch, jax.random.key(0))
    assert _donated_args(owning) == list(range(n_t)) + list(range(n_t + n_f, n_t + n_f + n_o))
    opt_in = make_train_step(loss_fn, opt, has_aux=True, donate=True)
    assert _donated_args(opt_in.lower(trainable, frozen, opt_state, batch, jax.random.key(0))) == (
        list(range(n_t)) + list(range(n_t + n_f, n_t + n_f + n_o))
    )


@JIT
def test_learning_rate_metric_from_schedule_inject_and_groups(jit):
    _, trainable, frozen, loss_fn, batch = mlp_setup(r"^(head|body)/")
    sched = warmup_cosine(0.1, 10, 2)

    step = make_train_step(loss_fn, optax.sgd(sched), has_aux=True, jit=jit, learning_rate=sched)
    t, s = to_numpy(trainable), optax.sgd(sched).init(trainable)
    seen = []
    for i in range(4):
        t, s, m = step(t, frozen, s, batch, None)
        seen.append(float(m["learning_rate"]))
    assert seen == pytest.approx([0.0, 0.05, 0.1, float(sched(3))])

    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=sched)
    step = make_train_step(loss_fn, opt, has_aux=True, jit=jit)
    t, s = to_numpy(trainable), opt.init(trainable)
    seen = []
    for i in range(3):
        t, s, m = step(t, frozen, s, batch, None)
        seen.append(float(m["learning_rate"]))
    assert seen == pytest.approx([0.0, 0.05, 0.1])

    opt = multi_lr([(r"^head/", 0.3)], optax.sgd, default=0.01)
    step = make_train_step(loss_fn, opt, has_aux=True, jit=jit)
    _, _, m = step(to_numpy(trainable), frozen, opt.init(trainable), batch, None)
    assert float(m["learning_rate/group_0"]) == pytest.approx(0.3)
    assert float(m["learning_rate/default"]) == pytest.approx(0.01)

    # a plain optimizer without a schedule argument: no learning rate reported, no error
    step = make_train_step(loss_fn, optax.adam(1e-3), has_aux=True, jit=jit)
    _, _, m = step(to_numpy(trainable), frozen, optax.adam(1e-3).init(trainable), batch, None)
    assert "learning_rate" not in m


@JIT
def test_bad_aux_fails_early(jit):
    _, trainable, frozen, _, batch = mlp_setup(r"^head/")
    opt = optax.sgd(0.1)

    def vector_aux(t, f, b, rng):
        return jnp.float32(1.0) + 0 * jnp.sum(t["head"]["bias"]), {"per_example": jnp.zeros(3)}

    with pytest.raises(ValueError, match="per_example.*scalar"):
        step = make_train_step(vector_aux, opt, has_aux=True, jit=jit)
        step(trainable, frozen, opt.init(trainable), batch, None)

    def clash(t, f, b, rng):
        return jnp.sum(t["head"]["bias"]), {"loss": jnp.float32(0)}

    with pytest.raises(ValueError, match="clash"):
        step = make_train_step(clash, opt, has_aux=True, jit=jit)
        step(trainable, frozen, opt.init(trainable), batch, None)


# ---------------------------------------------------------------- eval


@JIT
def test_evaluate_weighted_mean(jit):
    w = jnp.asarray([[2.0]])

    def metric_fn(trainable, frozen, batch):
        x, y, n_real = batch
        err = (x @ trainable["w"] - y) ** 2
        valid = jnp.arange(x.shape[0]) < n_real
        mse = jnp.sum(jnp.where(valid[:, None], err, 0)) / n_real
        return {"mse": mse, "one": jnp.float32(1)}, n_real

    rs = np.random.RandomState(0)
    batches, all_err = [], []
    for n_real in (4, 1, 3):
        x = rs.randn(4, 1).astype(np.float32)
        y = rs.randn(4, 1).astype(np.float32)
        batches.append((x, y, np.float32(n_real)))
        all_err.append(((x @ np.asarray(w) - y) ** 2)[:n_real])
    expected = float(np.mean(np.concatenate(all_err)))  # mean over the real examples only
    eval_step = make_eval_step(metric_fn, jit=jit)
    out = evaluate(eval_step, {"w": w}, None, batches)
    assert out == pytest.approx({"mse": expected, "one": 1.0}, rel=1e-6)
    assert all(type(v) is float for v in out.values())
    # a function returning a fresh iterable works too; unweighted metric_fn gets weight 1
    plain = make_eval_step(lambda t, f, b: {"s": jnp.sum(b)}, jit=jit)
    assert evaluate(plain, None, None, lambda: iter([np.ones(2), 3 * np.ones(2)])) == {"s": 4.0}
    with pytest.raises(ValueError, match="no eval batches"):
        evaluate(plain, None, None, [])


# ---------------------------------------------------------------- early stopping


def test_early_stopping_pure_logic():
    es = EarlyStopping(metric="loss", mode="min", patience=2, min_delta=0.1)
    s = es.init()
    assert s == EarlyStoppingState()
    s = es.update(s, {"loss": 1.0}, step=1)
    assert (s.best, s.best_step, s.improved, s.stop) == (1.0, 1, True, False)
    s = es.update(s, {"loss": 0.95}, step=2)  # not better by more than min_delta
    assert (s.best, s.bad_evals, s.improved, s.stop) == (1.0, 1, False, False)
    s = es.update(s, {"loss": 0.8}, step=3)
    assert (s.best, s.best_step, s.bad_evals) == (0.8, 3, 0)
    s = es.update(s, 0.9, step=4)
    s = es.update(s, float("nan"), step=5)  # NaN never improves
    assert s.stop and s.bad_evals == 2 and s.best_step == 3

    up = EarlyStopping(metric="acc", mode="max", patience=1)
    s = up.update(up.init(), {"acc": 0.5}, 1)
    s = up.update(s, {"acc": 0.6}, 2)
    assert s.best == 0.6 and not s.stop
    assert up.update(s, {"acc": 0.6}, 3).stop
    never = EarlyStopping(patience=None)
    s = never.init()
    for i in range(10):
        s = never.update(s, 1.0, i)
    assert not s.stop and s.bad_evals == 9
    with pytest.raises(KeyError, match="'acc' not in the eval metrics"):
        up.update(up.init(), {"loss": 1.0}, 1)
    with pytest.raises(ValueError):
        EarlyStopping(mode="lowest")


def quadratic_problem():
    """w moves from 0 toward 1 under SGD: w_t = 1 - 0.9**t; eval watches (w - 0.53)^2, which
    improves until t=7 (w=0.522) and worsens after (w_8=0.570)."""

    def loss_fn(trainable, frozen, batch, rng):
        return 0.5 * jnp.sum((trainable["w"] - 1.0) ** 2)

    def metric_fn(trainable, frozen, batch):
        return {"dist": jnp.sum((trainable["w"] - 0.53) ** 2)}

    return loss_fn, metric_fn


@JIT
def test_fit_early_stopping_keeps_best_trainable(jit):
    loss_fn, metric_fn = quadratic_problem()
    opt = optax.sgd(0.1)
    trainable = {"w": jnp.zeros((1,), jnp.float32)}
    step = make_train_step(loss_fn, opt, jit=jit)
    result = fit(
        step,
        trainable,
        None,
        opt.init(trainable),
        lambda i: None,
        num_steps=100,
        rng=jax.random.key(0),
        eval_step=make_eval_step(metric_fn, jit=jit),
        eval_batches=[None],
        eval_every=1,
        early_stopping=EarlyStopping(metric="dist", patience=3),
        progress=False,
    )
    w = [1 - 0.9**t for t in range(20)]
    best = int(np.argmin([(wt - 0.53) ** 2 for wt in w]))
    assert best == 7
    assert result.stopped_early and result.best_step == best and result.steps_run == best + 3
    assert result.best_metric == pytest.approx((w[best] - 0.53) ** 2, rel=1e-4)
    np.testing.assert_allclose(np.asarray(result.best_trainable["w"]), [w[best]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result.trainable["w"]), [w[best + 3]], rtol=1e-6)
    evals = [h["eval/dist"] for h in result.history if "eval/dist" in h]
    assert len(evals) == best + 3


@JIT
def test_fit_history_is_plain_data_and_loss_goes_down(jit, capsys):
    _, trainable, frozen, loss_fn, batch = mlp_setup(r"^(head|norm)/")
    frozen_before = to_numpy(frozen)
    sched = warmup_cosine(1e-2, 30, 0.1)
    opt = optax.adam(sched)
    step = make_train_step(loss_fn, opt, has_aux=True, jit=jit, learning_rate=sched)

    def metric_fn(t, f, b):
        loss, aux = loss_fn(t, f, b, None)
        return {"loss": loss, **aux}

    result = fit(
        step,
        trainable,
        frozen,
        opt.init(trainable),
        [batch] * 30,
        num_steps=30,
        rng=jax.random.key(0),
        eval_step=make_eval_step(metric_fn, jit=jit),
        eval_batches=[batch, batch],
        eval_every=10,
        tokens_per_batch=64,
        log_every=5,
        progress=True,
    )
    assert isinstance(result, TrainResult)
    assert result.steps_run == 30 and not result.stopped_early and result.seconds > 0
    assert [h["step"] for h in result.history] == [5, 10, 15, 20, 25, 30]
    for h in result.history:
        assert all(type(v) in (int, float) for v in h.values()), h
        expected = {"loss", "grad_norm", "mae", "learning_rate", "steps_per_second", "tokens_per_second"}
        assert expected <= set(h)
    assert [h["step"] for h in result.history if "eval/loss" in h] == [10, 20, 30]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.best_step == 30 and result.best_metric == result.history[-1]["eval/loss"]
    assert result.best_trainable is not None
    for (path, a), (_, b) in zip(jp.leaves_with_paths(frozen), jp.leaves_with_paths(frozen_before)):
        assert (a is None and b is None) or np.array_equal(np.asarray(a), b), path
    err = capsys.readouterr().err
    assert "loss=" in err and "tok/s" in err


@JIT
def test_fit_stops_when_batches_run_out(jit, capsys):
    loss_fn, metric_fn = quadratic_problem()
    opt = optax.sgd(0.1)
    trainable = {"w": jnp.zeros((1,), jnp.float32)}
    result = fit(
        make_train_step(loss_fn, opt, jit=jit),
        trainable,
        None,
        opt.init(trainable),
        iter([None] * 7),
        num_steps=50,
        rng=None,
        eval_step=make_eval_step(metric_fn, jit=jit),
        eval_batches=[None],
        log_every=5,
        progress=False,
    )
    assert result.steps_run == 7 and not result.stopped_early
    assert [h["step"] for h in result.history] == [5, 7]
    assert "eval/dist" in result.history[-1]
    assert result.best_step is None  # no eval "loss" and no early_stopping: nothing to rank evals by
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_fit_argument_checks():
    with pytest.raises(ValueError, match="go together"):
        fit(lambda *a: None, None, None, None, [], num_steps=1, rng=None, eval_step=lambda *a: None)
    with pytest.raises(ValueError, match="early_stopping needs"):
        fit(lambda *a: None, None, None, None, [], num_steps=1, rng=None, early_stopping=EarlyStopping())
    with pytest.raises(ValueError, match="one-shot iterator"):
        fit(lambda *a: None, None, None, None, [], num_steps=1, rng=None, eval_step=lambda *a: None,
            eval_batches=iter([1]), eval_every=1)


# ---------------------------------------------------------------- NNX


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(4, 16, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


@JIT
def test_nnx_split_states_train_through_the_same_step(jit):
    x, y = regression_data(64, 4, seed=3)
    model = NNXMLP(nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("head")), ...)
    frozen_before = to_numpy(frozen)

    def loss_fn(trainable, frozen, batch, rng):
        m = nnx.merge(graphdef, trainable, frozen)
        xb, yb = batch
        return jnp.mean((m(xb) - yb) ** 2)

    opt = optax.adamw(1e-2, mask=decay_mask)
    opt_state = opt.init(trainable)
    assert state_bytes(opt_state) < 3 * tree_bytes(trainable) + 64
    step = make_train_step(loss_fn, opt, jit=jit)
    eval_step = make_eval_step(lambda t, f, b: {"loss": loss_fn(t, f, b, None)}, jit=jit)
    before = evaluate(eval_step, trainable, frozen, [(x, y)])["loss"]
    result = fit(step, trainable, frozen, opt_state, lambda i: (x, y), num_steps=50, rng=jax.random.key(0),
                 eval_step=eval_step, eval_batches=[(x, y)], progress=False)
    assert result.best_metric < 0.7 * before
    assert isinstance(result.trainable, nnx.State)
    for (p, a), (_, b) in zip(jp.leaves_with_paths(frozen), jp.leaves_with_paths(frozen_before)):
        assert np.array_equal(np.asarray(a[...]), np.asarray(b[...])), p
