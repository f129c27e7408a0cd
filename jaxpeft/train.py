"""A small training loop: a jitted step that differentiates only the trainable tree, eval, early
stopping, a progress bar and metrics as plain Python data.

The contract, for Linen and NNX alike::

    trainable, frozen = jp.partition(params, selector)          # Linen: two trees, None holes
    graphdef, trainable, frozen = nnx.split(model, filter, ...)  # NNX: two States

    def loss_fn(trainable, frozen, batch, rng):                  # -> loss  or  (loss, aux dict)
        params = jp.combine(trainable, frozen)                   # NNX: nnx.merge(graphdef, trainable, frozen)
        ...

    step = make_train_step(loss_fn, optimizer)
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, rng)

``jax.grad`` sees only ``trainable``; ``frozen`` is closed over, so XLA never computes a frozen
weight's gradient, and ``optimizer.init(trainable)`` holds state only for the trainable leaves.

Model state (``batch_stats`` of BatchNorm, NNX ``BatchStat``): with ``has_state=True`` the loss
function takes the state last and returns the new one beside the loss, and the step carries it::

    def loss_fn(trainable, frozen, batch, rng, model_state):   # -> (loss, new_model_state)
        logits, model_state = peft_model.apply(
            jp.combine(trainable, frozen), batch["x"], train=True,
            collections=model_state, mutable=["batch_stats"])
        return loss, model_state

    step = make_train_step(loss_fn, optimizer, has_state=True)
    trainable, opt_state, model_state, metrics = step(trainable, frozen, opt_state, batch, rng, model_state)

The state is not differentiated (it is ``value_and_grad``'s aux), and the optimizer never sees it.

Ownership: nothing here invalidates an array the caller holds. ``jp.partition`` and ``jp.apply``
return trees that share buffers with the caller's base params (full fine-tuning: every leaf; LoRA
with a trainable head: the head), so donating what the caller passes would delete their base
weights. A ``TrainStep`` called directly therefore donates nothing (unless built with
``donate=True``, an explicit hand-over); ``fit`` copies the starting ``trainable`` and
``opt_state`` once (never ``frozen``) and then donates only buffers its own steps produced.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.tree import path_to_str

__all__ = [
    "TrainStep",
    "make_train_step",
    "make_eval_step",
    "evaluate",
    "EarlyStopping",
    "EarlyStoppingState",
    "TrainResult",
    "fit",
]

_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _check_scalar_metrics(metrics: Mapping[str, Any], what: str) -> None:
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"{what}: metric names must be str, got {k!r}")
        if np.shape(v) != ():
            raise ValueError(
                f"{what}: metric {k!r} must be a scalar, got shape {np.shape(v)}; reduce it (e.g. "
                "jnp.mean) inside the function"
            )


def check_step_functions(loss_fn: Any, optimizer: Any, what: str) -> None:
    """Raise ``TypeError`` unless ``loss_fn`` is callable and ``optimizer`` is an optax transformation."""
    if not callable(loss_fn):
        raise TypeError(f"{what}: loss_fn must be callable, got {type(loss_fn).__name__}")
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"{what}: optimizer must be an optax.GradientTransformation (init, update), got "
            f"{type(optimizer).__name__}"
        )


def _step_count(opt_state: Any) -> Any:
    """The first ``count`` field of an optax state: the number of updates applied so far."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if keypath and getattr(keypath[-1], "name", None) == "count":
            return leaf
    raise ValueError(
        "make_train_step(learning_rate=schedule): the optimizer state has no `count` field to "
        "evaluate the schedule at; wrap the optimizer in optax.inject_hyperparams instead"
    )


def _injected_learning_rates(opt_state: Any) -> dict[str, Any]:
    """``learning_rate`` of every ``optax.inject_hyperparams`` state inside ``opt_state``.

    One found: ``{"learning_rate": lr}``. Several (``multi_lr``): ``{"learning_rate/<group>": lr}``,
    the group named by the dict keys on its path (the ``optax.multi_transform`` labels).
    """
    found = []
    flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda x: isinstance(x, _INJECT_STATES))[0]
    for keypath, leaf in flat:
        if isinstance(leaf, _INJECT_STATES) and "learning_rate" in leaf.hyperparams:
            dict_keys = [str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey)]
            found.append(("/".join(dict_keys) or path_to_str(keypath), leaf.hyperparams["learning_rate"]))
    if len(found) == 1:
        return {"learning_rate": found[0][1]}
    return {f"learning_rate/{name}": lr for name, lr in found}


def _copy_tree(tree: Any) -> Any:
    """Fresh device buffers for every array leaf of ``tree`` (one jitted dispatch), other leaves as-is.

    A copy keeps its source's sharding. Two leaves sharing one buffer come back as two buffers, so
    the copy can be donated even where ``optimizer.init`` stored the params themselves (lookahead).
    """
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    if where:
        copies = _jit_copy([leaves[i] for i in where])
        for i, c in zip(where, copies):
            leaves[i] = c
    return jax.tree.unflatten(treedef, leaves)


_jit_copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs])


class TrainStep:
    """A train step: ``step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)``.

    Built by ``make_train_step``. Calling it never invalidates its arguments (unless it was built
    with ``donate=True``): the returned trees are new buffers and the ones passed in stay valid, so
    a caller's base params (shared with ``trainable`` after ``jp.partition``) survive the step.
    ``fit`` uses ``donating``, the same step donating ``trainable`` and ``opt_state``, on buffers it
    owns (its own copy of the starting trees, then each step's outputs).

    Attributes:
      fn: the un-jitted step function.
      jit: whether calls are compiled.
      donate: whether a direct call donates ``trainable`` and ``opt_state`` (the caller's explicit
        hand-over of those buffers).
      has_state: the step carries model state: ``step(trainable, frozen, opt_state, batch, rng,
        model_state) -> (trainable, opt_state, model_state, metrics)``.
    """

    def __init__(self, fn: Callable[..., Any], *, jit: bool, donate: bool, has_state: bool = False):
        self.fn = fn
        self.jit = jit
        self.donate = donate
        self.has_state = has_state
        donated = (0, 2, 5) if has_state else (0, 2)
        self._plain = jax.jit(fn) if jit else fn
        self._donating = jax.jit(fn, donate_argnums=donated) if jit else fn

    def __call__(self, trainable, frozen, opt_state, batch, rng, model_state=None):
        run = self._donating if self.donate else self._plain
        return run(trainable, frozen, opt_state, batch, rng, *self._state_args(model_state))

    def _state_args(self, model_state: Any) -> tuple:
        if self.has_state and model_state is None:
            raise TypeError(
                "this train step was built with has_state=True: call it as step(trainable, frozen, opt_state, "
                "batch, rng, model_state)"
            )
        if not self.has_state and model_state is not None:
            raise TypeError(
                "this train step carries no model state: build it with make_train_step(..., has_state=True) "
                "for a loss_fn that takes and returns model_state (batch_stats, ...)"
            )
        return (model_state,) if self.has_state else ()

    @property
    def donating(self) -> Callable[..., Any]:
        """The step donating ``trainable``, ``opt_state`` (and ``model_state``): only on buffers nobody else holds."""
        return self._donating

    @property
    def donates(self) -> bool:
        """Whether ``donating`` really donates (it does with ``jit``)."""
        return self.jit

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` of what a direct call runs (needs ``jit=True``)."""
        if not self.jit:
            raise ValueError("TrainStep.lower: the step was built with jit=False")
        return (self._donating if self.donate else self._plain).lower(*args)


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    jit: bool = True,
    donate: bool = False,
    learning_rate: float | optax.Schedule | None = None,
    has_state: bool = False,
) -> TrainStep:
    """A train step that differentiates ``loss_fn`` with respect to the trainable tree only.

    Args:
      loss_fn: ``(trainable, frozen, batch, rng) -> loss`` (a scalar), or ``-> (loss, aux)`` with
        ``has_aux``, ``aux`` a dict of scalars. It combines the two trees itself:
        ``jp.combine(trainable, frozen)`` (Linen) or ``nnx.merge(graphdef, trainable, frozen)`` (NNX).
      optimizer: any optax transformation; its state comes from ``optimizer.init(trainable)``.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      jit: compile the step with ``jax.jit``.
      donate: (with ``jit``) a direct call donates the ``trainable`` and ``opt_state`` buffers: the
        trees passed in are deleted, and with them any base params they share buffers with. Off by
        default; ``fit`` donates safely either way (it copies its starting trees once).
      learning_rate: the optimizer's schedule (or constant), reported as ``metrics["learning_rate"]``
        at the optimizer's step count. Without it the rate is reported when the optimizer (or each
        ``multi_lr`` group) is wrapped in ``optax.inject_hyperparams``, and not otherwise.
      has_state: the model has state that its forward updates (BatchNorm's ``batch_stats``):
        ``loss_fn(trainable, frozen, batch, rng, model_state)`` returns ``(loss, model_state)``, or
        ``(loss, (model_state, aux))`` with ``has_aux``, the new state of the same tree structure
        (Linen: the ``updated`` dict of ``peft_model.apply(..., mutable=[...])``; NNX:
        ``nnx.state(model, nnx.BatchStat)``). The state is not differentiated.

    Returns:
      a ``TrainStep``: ``step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state,
      metrics)`` (with ``has_state``: ``step(..., rng, model_state) -> (trainable, opt_state,
      model_state, metrics)``); ``metrics`` holds scalar arrays: ``loss``, ``grad_norm`` (global L2
      norm of the gradient), ``learning_rate`` (or ``learning_rate/<group>``) when known, and the
      ``aux`` entries. Nothing is transferred to the host: convert at log points only.

    Raises:
      TypeError: ``loss_fn`` is not callable, or ``optimizer`` is not an optax transformation.
    """
    check_step_functions(loss_fn, optimizer, "make_train_step")
    if not isinstance(donate, bool):
        raise TypeError(f"make_train_step: donate must be a bool, got {donate!r}")
    if not isinstance(has_state, bool):
        raise TypeError(f"make_train_step: has_state must be a bool, got {has_state!r}")

    def step(trainable, frozen, opt_state, batch, rng, *state):
        def objective(t):
            # `frozen` is a constant here: no gradient is computed for it. The state is rebuilt
            # inside the differentiated function (same arrays, new containers): NNX Variables may
            # only be updated (BatchNorm in training mode) at the trace level that made them.
            return loss_fn(t, frozen, batch, rng, *jax.tree.map(lambda x: x, state))

        if has_state:
            (loss, out), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
            new_state, aux = _split_state_output(out, has_aux)
            _check_same_structure(state[0], new_state)
        elif has_aux:
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        else:
            loss, grads = jax.value_and_grad(objective)(trainable)
            aux = {}
        if has_aux and not isinstance(aux, Mapping):
            raise TypeError(
                f"make_train_step(has_aux=True): loss_fn must return (loss, dict of scalars), got "
                f"aux of type {type(aux).__name__}"
            )
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)

        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if learning_rate is None:
            metrics.update(_injected_learning_rates(new_opt_state))
        elif callable(learning_rate):
            # optax evaluates a schedule at the count *before* the update: the rate this step used.
            metrics["learning_rate"] = jnp.asarray(learning_rate(_step_count(opt_state)))
        else:
            metrics["learning_rate"] = jnp.asarray(learning_rate)
        clash = sorted(set(aux) & set(metrics))
        if clash:
            raise ValueError(f"make_train_step: aux names {clash} clash with the step's own metrics")
        metrics.update(aux)
        _check_scalar_metrics(metrics, "make_train_step")
        if has_state:
            return new_trainable, new_opt_state, new_state, metrics
        return new_trainable, new_opt_state, metrics

    return TrainStep(step, jit=jit, donate=donate and jit, has_state=has_state)


def _split_state_output(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(model_state, aux)`` from what a ``has_state`` loss_fn returns beside its loss."""
    if not has_aux:
        return out, {}
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "make_train_step(has_state=True, has_aux=True): loss_fn must return (loss, (model_state, aux)), got "
            f"{type(out).__name__} beside the loss"
        )
    return out


def _check_same_structure(before: Any, after: Any) -> None:
    """Raise unless the state a loss_fn returns has the tree structure of the one it received."""
    if jax.tree.structure(before) != jax.tree.structure(after):
        got = sorted(path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(after)[0])
        want = sorted(path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0])
        raise ValueError(
            "make_train_step(has_state=True): loss_fn returned a model_state of another structure than it was "
            f"given (leaves {got[:6]} instead of {want[:6]}); return the whole updated state (the `updated` dict "
            "of peft_model.apply(..., mutable=[...]), or nnx.state(model, nnx.BatchStat))"
        )


def make_eval_step(
    metric_fn: Callable[..., Any], *, jit: bool = True, has_state: bool = False
) -> Callable[..., Any]:
    """An eval step for ``evaluate`` / ``fit``.

    Args:
      metric_fn: ``(trainable, frozen, batch) -> metrics`` with ``metrics`` a dict of scalars,
        or ``-> (metrics, weight)`` where ``weight`` (e.g. the number of real examples or tokens in
        the batch) weights the batch in the mean over batches.
      jit: compile with ``jax.jit`` (nothing is donated: eval does not change the trees).
      has_state: ``metric_fn(trainable, frozen, batch, model_state)`` also reads model state (the
        running ``batch_stats`` of BatchNorm, with ``train=False``); it returns no new state: eval
        changes nothing.

    Returns:
      ``eval_step(trainable, frozen, batch) -> (metrics, weight)`` (with ``has_state``:
      ``eval_step(trainable, frozen, batch, model_state)``), ``weight`` 1.0 if ``metric_fn`` gives
      none.
    """

    if not callable(metric_fn):
        raise TypeError(f"make_eval_step: metric_fn must be callable, got {type(metric_fn).__name__}")
    if not isinstance(has_state, bool):
        raise TypeError(f"make_eval_step: has_state must be a bool, got {has_state!r}")

    def eval_step(trainable, frozen, batch, *state):
        if len(state) != int(has_state):
            raise TypeError(
                "make_eval_step: this eval step takes (trainable, frozen, batch"
                + (", model_state)" if has_state else "); build it with has_state=True to pass model_state")
            )
        out = metric_fn(trainable, frozen, batch, *state)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Mapping):
            metrics, weight = out
        else:
            metrics, weight = out, 1.0
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"make_eval_step: metric_fn must return a dict of scalars or (dict, weight), got "
                f"{type(out).__name__}"
            )
        _check_scalar_metrics(metrics, "make_eval_step")
        if np.shape(weight) != ():
            raise ValueError(
                f"make_eval_step: the batch weight must be a scalar, got shape {np.shape(weight)}"
            )
        return dict(metrics), jnp.asarray(weight, jnp.float32)

    return jax.jit(eval_step) if jit else eval_step


def _iter_eval_batches(batches: Iterable | Callable[[], Iterable]) -> Iterable:
    return batches() if callable(batches) else batches


def evaluate(
    eval_step: Callable[..., Any],
    trainable: Any,
    frozen: Any,
    batches: Iterable | Callable[[], Iterable],
    model_state: Any = None,
) -> dict[str, float]:
    """Mean of each metric over ``batches``, weighted by the batch weights; plain Python floats.

    Sums stay on the device until the end, so batches are dispatched without waiting.

    Args:
      eval_step: from ``make_eval_step``.
      trainable, frozen: the two parameter trees.
      batches: an iterable of batches, or a function returning a fresh one.
      model_state: passed to every call when given (an eval step built with ``has_state=True``).

    Raises:
      ValueError: no batches, or batch weights summing to zero.
    """
    sums: dict[str, Any] | None = None
    total_weight = None
    for batch in _iter_eval_batches(batches):
        state = () if model_state is None else (model_state,)
        metrics, weight = eval_step(trainable, frozen, batch, *state)
        weighted = {k: weight * jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        if sums is None:
            sums, total_weight = weighted, weight
        else:
            if set(weighted) != set(sums):
                raise ValueError(
                    f"evaluate: metric names changed between batches: {sorted(sums)} vs {sorted(weighted)}"
                )
            sums = {k: sums[k] + weighted[k] for k in sums}
            total_weight = total_weight + weight
    if sums is None:
        raise ValueError("evaluate: no eval batches (an exhausted iterator? pass a list or a function)")
    sums, total_weight = jax.device_get((sums, total_weight))
    if float(total_weight) == 0.0:
        raise ValueError("evaluate: the batch weights sum to zero")
    return {k: float(v) / float(total_weight) for k, v in sums.items()}


@dataclasses.dataclass(frozen=True)
class EarlyStoppingState:
    """Where early stopping stands, as plain data.

    Attributes:
      best: the best metric value so far (None before the first eval).
      best_step: the step of that eval.
      bad_evals: evals in a row without an improvement.
      improved: whether the latest eval improved on ``best``.
      stop: whether training should stop now.
    """

    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    improved: bool = False
    stop: bool = False


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop after ``patience`` evals in a row that do not improve ``metric`` by more than ``min_delta``.

    Attributes:
      metric: an eval metric name (a key of what the eval ``metric_fn`` returns).
      mode: ``"min"`` (lower is better) or ``"max"``.
      patience: non-improving evals tolerated before stopping; ``None`` never stops (best-tracking only).
      min_delta: an improvement must beat the best by more than this.
    """

    metric: str = "loss"
    mode: str = "min"
    patience: int | None = 3
    min_delta: float = 0.0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode is 'min' or 'max', got {self.mode!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1 or None, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {self.min_delta}")

    def init(self) -> EarlyStoppingState:
        return EarlyStoppingState()

    def value(self, metrics: Mapping[str, float]) -> float:
        """The watched metric from an eval's metrics dict."""
        if self.metric not in metrics:
            raise KeyError(f"EarlyStopping: metric {self.metric!r} not in the eval metrics {sorted(metrics)}")
        return float(metrics[self.metric])

    def improves(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def update(
        self, state: EarlyStoppingState, metrics: Mapping[str, float] | float, step: int
    ) -> EarlyStoppingState:
        """The state after an eval at ``step`` with ``metrics`` (a dict, or the watched value itself)."""
        value = float(metrics) if not isinstance(metrics, Mapping) else self.value(metrics)
        if self.improves(value, state.best):
            return EarlyStoppingState(best=value, best_step=step, bad_evals=0, improved=True, stop=False)
        bad = state.bad_evals + 1
        stop = self.patience is not None and bad >= self.patience
        return dataclasses.replace(state, bad_evals=bad, improved=False, stop=stop)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``fit`` returns.

    Attributes:
      trainable: the trainable tree after the last step.
      opt_state: the optimizer state after the last step.
      history: one dict of Python floats per logged step, ``step`` and ``seconds`` (since the
        start) included: train metrics averaged over the steps since the previous log (the
        learning rate is the latest value), ``steps_per_second`` (and ``tokens_per_second``), and
        eval metrics prefixed ``eval/`` at eval steps.
      best_step: the step of the best eval (None without eval).
      best_metric: the watched eval metric there.
      best_trainable: a copy of the trainable tree at that eval (None without eval or ``keep_best``).
      stopped_early: early stopping ended the run.
      steps_run: train steps taken.
      seconds: wall time of the run, compilation included.
      model_state: the model state after the last step (None for a step without state).
    """

    trainable: Any
    opt_state: Any
    history: list[dict[str, float]]
    best_step: int | None
    best_metric: float | None
    best_trainable: Any
    stopped_early: bool
    steps_run: int
    seconds: float
    model_state: Any = None


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
    host = jax.device_get(window)
    out = {}
    for k in host[-1]:
        if k.startswith("learning_rate"):
            out[k] = float(host[-1][k])
        else:
            out[k] = float(np.mean([float(m[k]) for m in host]))
    return out


def _owned(step: Callable[..., Any], trees: tuple) -> tuple[Callable[..., Any], tuple]:
    """The step ``fit`` runs, and the trees it runs on (``trainable``, ``opt_state``, maybe
    ``model_state``): copies wherever that step donates."""
    if isinstance(step, TrainStep):
        if not step.donates:
            return step.donating, trees
        return step.donating, _copy_tree(trees)
    # A step of the caller's own may donate: hand it copies, never the caller's buffers.
    return step, _copy_tree(trees)


def fit(
    step: Callable[..., Any],
    trainable: Any,
    frozen: Any,
    opt_state: Any,
    batches: Iterable | Callable[[int], Any],
    *,
    num_steps: int,
    rng: jax.Array | None,
    eval_step: Callable[..., Any] | None = None,
    eval_batches: Iterable | Callable[[], Iterable] | None = None,
    eval_every: int | None = None,
    early_stopping: EarlyStopping | None = None,
    progress: bool = True,
    tokens_per_batch: int | None = None,
    log_every: int = 10,
    keep_best: bool = True,
    model_state: Any = None,
) -> TrainResult:
    """Run ``step`` for ``num_steps`` steps, with periodic eval, early stopping and a progress bar.

    The host waits for the device only at log and eval points, so steps are dispatched ahead
    of the device (JAX's async dispatch) in between.

    Args:
      step: from ``make_train_step``.
      trainable, frozen, opt_state: the starting trees; they stay valid (``fit`` never deletes an
        array you hold). ``fit`` copies ``trainable`` and ``opt_state`` once, before the first
        step, and then donates only buffers it owns; ``frozen`` is never copied nor donated.
      batches: an iterable of batches (the run ends early if it runs out), or
        ``batch_fn(i) -> batch`` for step index ``i = 0, 1, ...``.
      num_steps: the number of train steps.
      rng: a PRNG key; step ``i`` gets ``jax.random.fold_in(rng, i)``. ``None`` passes ``None``.
      eval_step: from ``make_eval_step``; needs ``eval_batches``.
      eval_batches: a re-iterable (a list) of eval batches, or a function returning a fresh iterable.
      eval_every: eval every this many steps; eval also runs after the last step. ``None``: only
        after the last step.
      early_stopping: stop when its metric stops improving. The best eval is tracked with it;
        without it, by the eval ``loss`` (lower is better) when there is one.
      progress: show a tqdm bar on stderr with the loss and the throughput.
      tokens_per_batch: report throughput in tokens/s instead of steps/s.
      log_every: log train metrics (and update the bar's numbers) every this many steps; also at
        eval steps and after the last step.
      keep_best: keep a copy of ``trainable`` at the best eval (device memory: one trainable tree).
      model_state: the starting model state, for a step built with ``has_state=True`` (needed then):
        each step returns the next, and eval reads the current one (``make_eval_step(...,
        has_state=True)``). Copied once, like ``trainable``; the last one is
        ``TrainResult.model_state``.

    Returns:
      a ``TrainResult``; all metrics as Python floats.
    """
    from tqdm.auto import tqdm

    if not callable(step):
        raise TypeError(f"fit: step must be callable (from make_train_step), got {type(step).__name__}")
    stateful = model_state is not None
    if isinstance(step, TrainStep) and step.has_state != stateful:
        raise TypeError(
            "fit: the step was built with has_state=True: pass model_state=" if step.has_state
            else "fit: model_state was given but the step carries no state: build it with has_state=True"
        )
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise TypeError(f"fit: num_steps must be an int, got {num_steps!r}")
    if num_steps < 0:
        raise ValueError(f"fit: num_steps must be >= 0, got {num_steps}")
    if log_every < 1:
        raise ValueError(f"fit: log_every must be >= 1, got {log_every}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"fit: eval_every must be >= 1 or None, got {eval_every}")
    if (eval_step is None) != (eval_batches is None):
        raise ValueError("fit: eval_step and eval_batches go together")
    if early_stopping is not None and eval_step is None:
        raise ValueError("fit: early_stopping needs eval_step and eval_batches")
    if eval_batches is not None and not callable(eval_batches) and iter(eval_batches) is eval_batches:
        if eval_every is not None:
            raise ValueError(
                "fit: eval_batches is a one-shot iterator but eval runs more than once; pass a list "
                "or a function returning a fresh iterable"
            )

    tracker = early_stopping
    watch_default_loss = early_stopping is None
    if watch_default_loss and eval_step is not None:
        tracker = EarlyStopping(metric="loss", mode="min", patience=None)
    es_state = tracker.init() if tracker is not None else None

    if callable(batches):
        batch_fn, batch_iter = batches, None
    else:
        batch_fn, batch_iter = None, iter(batches)

    history: list[dict[str, float]] = []
    best_trainable = None
    stopped_early = False
    steps_run = 0
    window: list[dict[str, Any]] = []
    start = window_start = time.perf_counter()

    bar = tqdm(total=num_steps, disable=not progress, file=sys.stderr, unit="step", dynamic_ncols=True)

    def flush_log(entry: dict[str, float]) -> None:
        nonlocal window, window_start
        if not window:
            return
        entry.update(_mean_metrics(window))  # blocks until the window's steps are done
        now = time.perf_counter()
        rate = len(window) / max(now - window_start, 1e-9)
        entry["steps_per_second"] = rate
        postfix = {"loss": f"{entry['loss']:.4g}"}
        if tokens_per_batch is not None:
            entry["tokens_per_second"] = rate * tokens_per_batch
            postfix["tok/s"] = f"{entry['tokens_per_second']:.4g}"
        else:
            postfix["steps/s"] = f"{rate:.3g}"
        bar.set_postfix(postfix, refresh=False)
        window = []
        window_start = now

    def run_eval(entry: dict[str, float]) -> bool:
        nonlocal es_state, best_trainable, tracker, window_start
        metrics = evaluate(eval_step, trainable, frozen, eval_batches, model_state)
        entry.update({f"eval/{k}": v for k, v in metrics.items()})
        if tracker is not None:
            if watch_default_loss and tracker.metric not in metrics:
                tracker = es_state = None  # no eval loss to rank evals by
            else:
                es_state = tracker.update(es_state, metrics, steps_run)
                if es_state.improved and keep_best:
                    best_trainable = _copy_tree(trainable)
        window_start = time.perf_counter()  # eval time is not train throughput
        return es_state is not None and es_state.stop

    last_eval_step = None

    def log_point(do_eval: bool) -> bool:
        nonlocal last_eval_step
        entry: dict[str, float] = {"step": steps_run}
        flush_log(entry)
        stop = False
        if do_eval:
            stop = run_eval(entry)
            last_eval_step = steps_run
        entry["seconds"] = time.perf_counter() - start
        if history and history[-1]["step"] == steps_run:
            history[-1].update(entry)
        else:
            history.append(entry)
        return stop

    try:
        for i in range(num_steps):
            if batch_fn is not None:
                batch = batch_fn(i)
            else:
                try:
                    batch = next(batch_iter)
                except StopIteration:
                    break
            step_rng = None if rng is None else jax.random.fold_in(rng, i)
            if i == 0:
                # Copy on first use: the caller's trees (which may share buffers with their base
                # params) are never donated; every later step donates the previous step's outputs.
                run_step, owned = _owned(step, (trainable, opt_state, model_state) if stateful else (trainable, opt_state))
                trainable, opt_state = owned[:2]
                model_state = owned[2] if stateful else None
            if stateful:
                trainable, opt_state, model_state, metrics = run_step(
                    trainable, frozen, opt_state, batch, step_rng, model_state
                )
            else:
                trainable, opt_state, metrics = run_step(trainable, frozen, opt_state, batch, step_rng)
            steps_run = i + 1
            window.append(metrics)
            bar.update(1)

            last = steps_run == num_steps
            periodic = eval_every is not None and steps_run % eval_every == 0
            do_eval = eval_step is not None and (last or periodic)
            if do_eval or last or steps_run % log_every == 0:
                if log_point(do_eval):
                    stopped_early = True
                    break
        if not stopped_early and 0 < steps_run < num_steps:
            # The batches ran out: log what is pending and evaluate the final parameters.
            log_point(eval_step is not None and last_eval_step != steps_run)
    finally:
        bar.close()

    jax.block_until_ready((trainable, opt_state, model_state))
    seconds = time.perf_counter() - start
    best_step = es_state.best_step if es_state is not None else None
    best_metric = es_state.best if es_state is not None else None
    return TrainResult(
        trainable=trainable,
        opt_state=opt_state,
        history=history,
        best_step=best_step,
        best_metric=best_metric,
        best_trainable=best_trainable,
        stopped_early=stopped_early,
        steps_run=steps_run,
        seconds=seconds,
        model_state=model_state,
    )
