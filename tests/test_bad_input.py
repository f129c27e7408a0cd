"""Bad input is refused before any work, with a message naming the path, value or shape (issue 11.2).

One table, one row per plausible mistake, covering every public function of ``jaxpeft``
(``test_every_public_function_has_a_row`` keeps it that way). Each row states the exception type and
a regex the message must match: the regex names the offending path, value or shape, so a vague
message fails. Around every call the test also checks that nothing was done first:

* no XLA program was compiled (a listener counts backend compiles during the call; tracing
  for shapes, as ``jax.eval_shape`` does, is allowed: it computes nothing);
* nothing was written: the row's scratch directory is still empty;
* the caller's trees are bit-identical and alive afterwards.

Legitimate-but-suspicious input (``lora(alpha=0)``) warns once, naming the value: ``test_warnings``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, NnxLM

CONFIG = LMConfig.tiny()
TOKENS = jnp.zeros((2, 8), jnp.int32)


# ---------------------------------------------------------------- shared inputs (built once)


class BatchNormNet(nn.Module):
    """A model with a ``batch_stats`` collection (the collections rows)."""

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.BatchNorm(not train, name="bn")(nn.Dense(4, name="dense")(x))


class DecodeAttention(nn.Module):
    """An attention holding a decode ``cache`` (prefix tuning refuses it)."""

    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, decode=True, name="attn")(x)


class NnxDecodeAttention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=True, rngs=rngs)

    def __call__(self, x):
        return self.attn(x)


class World:
    """The trees the rows misuse; built once, checked unchanged after every row."""

    def __init__(self):
        self.model = LinenLM(CONFIG)
        self.base = self.model.init(jax.random.key(0), TOKENS)["params"]
        self.peft = jp.lora(rank=2, alpha=4)
        self.peft_model, self.params = jp.apply(self.peft, self.model, jax.random.key(1), TOKENS, params=self.base)
        self.adapter = jp.prune(jp.partition(self.params, self.peft.trainable)[0])
        self.nnx_model = jp.apply(
            jp.chain(jp.lora(2, 4), jp.lora(2, 4, adapter="b")), NnxLM(CONFIG, rngs=nnx.Rngs(0)), jax.random.key(2)
        )
        self.small = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
        # Inputs built here, outside the measured calls (building them compiles XLA programs).
        self.base48 = LinenLM(LMConfig.tiny(d_model=48)).init(jax.random.key(0), TOKENS)["params"]
        self.thin_adapter = jax.tree.map(lambda x: x[..., :1], self.adapter)
        self.quantized = jp.quantize({"w": jnp.ones((64, 64))}, targets="w")
        self.other = {"w": jnp.ones((3, 5)), "b": jnp.zeros((4,))}
        # A model holding batch_stats, bound with LoRA; its trainable / frozen split and its state.
        self.bn_x = jnp.ones((2, 3))
        variables = BatchNormNet().init(jax.random.key(0), self.bn_x, train=False)
        self.bn_model, self.bn_params = jp.apply(jp.lora(2, targets="dense"), BatchNormNet(), jax.random.key(1),
                                                 self.bn_x, train=False, params=variables["params"])
        self.bn_split = jp.partition(self.bn_params, self.bn_model.trainable)
        self.bn_state = {"batch_stats": variables["batch_stats"]}
        self.decode_x = jnp.ones((1, 3, 4))
        self.decode_params = DecodeAttention().init(jax.random.key(0), self.decode_x)["params"]
        self.nnx_decode = NnxDecodeAttention(nnx.Rngs(0))
        self.snapshot = self._values()

    def _trees(self):
        return (self.base, self.params, self.small, self.other, nnx.state(self.nnx_model), self.bn_params, self.bn_state)

    def _values(self):
        return [np.array(x, copy=True) for x in jax.tree.leaves(self._trees())]

    def assert_unchanged(self):
        now = jax.tree.leaves(self._trees())
        assert len(now) == len(self.snapshot)
        for x, old in zip(now, self.snapshot):
            assert not x.is_deleted()
            np.testing.assert_array_equal(np.asarray(x), old)


@pytest.fixture(scope="module")
def world():
    _WORLD[:] = [World()]
    return _WORLD[0]


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    call: Callable[[World, Any], Any]  # (world, tmp_path) -> the failing call
    exc: type | tuple[type, ...]
    match: str  # regex on the message: names the path, value or shape
    covers: tuple[str, ...] = ()  # public names this row exercises besides the one in its id
    compiles: bool = False  # True only where the failing check needs a computed value (said in the row)


def _opt():
    return optax.sgd(0.1)


def _step(w):
    return jp.make_train_step(lambda t, f, b, r: jnp.sum(t["w"] ** 2), _opt())


def _bn_loss(forget_level=False):
    """A has_state loss_fn on ``BatchNormNet``; ``forget_level`` returns the stats without their collection key."""

    def loss_fn(trainable, frozen, batch, rng, model_state):
        w = _WORLD[0]
        y, updated = w.bn_model.apply(jp.combine(trainable, frozen), batch, train=True, collections=model_state,
                                      mutable=["batch_stats"])
        return jnp.sum(y**2), (updated["batch_stats"] if forget_level else updated)

    return loss_fn


def _bn_step(w, *, has_state=True, forget_level=False, model_state=None):
    trainable, frozen = w.bn_split
    step = jp.make_train_step(_bn_loss(forget_level), _opt(), has_state=has_state)
    return step(trainable, frozen, _opt().init(trainable), w.bn_x, None, model_state)


_WORLD = []  # the module's World, for loss functions built before it is


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))


ROWS = [
    # ---- the silent acceptances of issue 11
    Row("mixed_adapters-id-out-of-range",
        lambda w, d: jp.mixed_adapters(w.nnx_model, ["default", "b"], np.array([0, 5])).__enter__(),
        ValueError, r"adapter_ids \[5\] are out of range.*\[0, 2\)"),
    Row("mixed_adapters-negative-id",
        lambda w, d: jp.mixed_adapters(w.nnx_model, ["default", "b"], np.array([-1, 0])).__enter__(),
        ValueError, r"adapter_ids \[-1\]"),
    Row("mixed_adapters-on-linen", lambda w, d: jp.mixed_adapters(w.peft_model, ["default"], np.array([0])),
        TypeError, r"mixed_adapters works on NNX models; got PeftLinen"),
    Row("mixed_adapters-float-ids",
        lambda w, d: jp.mixed_adapters(w.nnx_model, ["default", "b"], np.array([0.0, 1.0], np.float32)).__enter__(),
        TypeError, r"dtype float32"),
    Row("PeftLinen.apply-id-out-of-range",
        lambda w, d: w.peft_model.apply(w.params, TOKENS, adapters=["default"], adapter_ids=np.array([0, 1])),
        ValueError, r"adapter_ids \[1\].*\['default'\]", covers=("PeftLinen",)),
    Row("adapters_disabled-not-a-bound-model", lambda w, d: jp.adapters_disabled(w.base).__enter__(),
        TypeError, r"got dict"),
    Row("use_adapters-unknown-name", lambda w, d: jp.use_adapters(w.peft_model, "nope").__enter__(),
        KeyError, r"'nope'.*\['default'\]"),
    Row("ia3-feedforward-outside-targets",
        lambda w, d: jp.apply(jp.ia3(targets=r"attn/(key|value)$", feedforward=r"mlp/up$"), w.model,
                              jax.random.key(0), TOKENS, params=w.base),
        jp.SelectorError, r"feedforward key 'mlp/up\$' matches none.*layers_0/attn/key", covers=("IA3",)),
    Row("lora-rank_pattern-matches-no-target",
        lambda w, d: jp.apply(jp.lora(4, 8, rank_pattern={"mlp/": 2}), w.model, jax.random.key(0), TOKENS,
                              params=w.base),
        jp.SelectorError, r"rank_pattern key 'mlp/' matches none.*layers_0/attn/query", covers=("LoRA",)),
    Row("lora-alpha_pattern-matches-no-target",
        lambda w, d: jp.apply(jp.lora(4, 8, alpha_pattern={"qeury": 2.0}), w.model, jax.random.key(0), TOKENS,
                              params=w.base),
        jp.SelectorError, r"alpha_pattern key 'qeury' matches none"),
    Row("lora-invalid-regex", lambda w, d: jp.lora(4, 8, targets="(query"),
        jp.SelectorError, r"targets '\(query' is not a valid regex"),
    Row("lora-targets-None", lambda w, d: jp.lora(4, 8, targets=None),
        TypeError, r"targets must be a regex.*got NoneType: None"),
    Row("lora-targets-list-with-bad-regex", lambda w, d: jp.lora(4, 8, targets=["query$", "val[ue"]),
        jp.SelectorError, r"'val\[ue' is not a valid regex"),
    Row("wise_ft-string-alpha", lambda w, d: jp.wise_ft(w.small, w.small, "0.5"),
        TypeError, r"alpha must be a real number.*str: '0\.5'"),
    Row("wise_ft-bool-alpha", lambda w, d: jp.wise_ft(w.small, w.small, True),
        TypeError, r"alpha must be a real number.*bool: True"),
    Row("wise_ft-nan-alpha", lambda w, d: jp.wise_ft(w.small, w.small, float("nan")),
        ValueError, r"alpha must be finite.*nan"),
    Row("wise_ft-shape-mismatch", lambda w, d: jp.wise_ft(w.small, w.other, 0.5),
        jp.TreeMismatchError, r"w.*\(3, 4\).*\(3, 5\)"),
    # ---- the weak errors of issue 11
    Row("apply-base-of-another-size",
        lambda w, d: jp.apply(w.peft, w.model, jax.random.key(0), TOKENS,
                              params=w.base48),
        ValueError, r"'embed/embedding': shape \(64, 48\), the model makes \(64, 32\)"),
    Row("apply-linen-without-example", lambda w, d: jp.apply(w.peft, w.model, jax.random.key(0), params=w.base),
        TypeError, r"Linen model \(LinenLM\) needs an example input"),
    Row("lora-param_dtype-bf16", lambda w, d: jp.lora(4, 8, param_dtype="bf16"),
        ValueError, r"param_dtype='bf16' is not a dtype.*bfloat16"),
    # ---- transforms: one row per factory at least
    Row("lora-rank-0", lambda w, d: jp.lora(0), ValueError, r"rank must be a positive int, got 0"),
    Row("lora-dropout-1", lambda w, d: jp.lora(4, dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1\.0"),
    Row("lora-init-unknown", lambda w, d: jp.lora(4, init="gauss"), ValueError, r"init must be one of.*'gauss'"),
    Row("lora-adapter-name", lambda w, d: jp.lora(4, adapter="a/b"), ValueError, r"adapter name.*'a/b'"),
    Row("dora-rank", lambda w, d: jp.dora(rank=-1), ValueError, r"-1", covers=("DoRA",)),
    Row("lokr-factor", lambda w, d: jp.lokr(factor=0), ValueError, r"factor.*0", covers=("LoKr",)),
    Row("ia3-bad-feedforward", lambda w, d: jp.ia3(feedforward=3), TypeError, r"feedforward.*3"),
    Row("houlsby-bottleneck", lambda w, d: jp.houlsby(bottleneck=0), ValueError, r"bottleneck.*0",
        covers=("BottleneckAdapter",)),
    Row("pfeiffer-activation", lambda w, d: jp.pfeiffer(bottleneck=4, activation="swish2"), ValueError, r"swish2"),
    Row("compacter-phm_dim", lambda w, d: jp.compacter(phm_dim=0), ValueError, r"phm_dim.*0", covers=("Compacter",)),
    Row("compacter_pp-phm_rank", lambda w, d: jp.compacter_pp(phm_rank=0), ValueError, r"phm_rank.*0"),
    Row("prefix_tuning-length", lambda w, d: jp.prefix_tuning(length=0), ValueError, r"length.*0",
        covers=("PrefixTuning",)),
    Row("prompt_tuning-init", lambda w, d: jp.prompt_tuning(init="zeros?"), ValueError, r"zeros\?",
        covers=("PromptTuning",)),
    Row("p_tuning-encoder", lambda w, d: jp.p_tuning(encoder="gru"), ValueError, r"'gru'", covers=("PTuning",)),
    Row("chain-empty", lambda w, d: jp.chain(), ValueError, r"at least one transform", covers=("Chain",)),
    Row("apply-targets-match-nothing",
        lambda w, d: jp.apply(jp.lora(2, targets=r"attn/qeury$"), w.model, jax.random.key(0), TOKENS, params=w.base),
        jp.SelectorError, r"matched no .*layers_0/attn/query"),
    Row("apply-not-a-module", lambda w, d: jp.apply(w.peft, w.base, jax.random.key(0)),
        TypeError, r"got dict"),
    Row("apply-nnx-with-example", lambda w, d: jp.apply(w.peft, NnxLM(CONFIG, rngs=nnx.Rngs(0)), jax.random.key(0),
                                                        TOKENS),
        TypeError, r"NNX model needs no example input"),
    Row("apply-variables-dict", lambda w, d: jp.apply(w.peft, w.model, jax.random.key(0), TOKENS,
                                                      params={"params": w.base}),
        ValueError, r"not the variables dict \{'params'"),
    # ---- bound models
    Row("add_adapter-same-name", lambda w, d: jp.add_adapter(w.peft_model, jp.lora(2), jax.random.key(3), w.params),
        ValueError, r"default"),
    Row("delete_adapter-unknown", lambda w, d: jp.delete_adapter(w.peft_model, "nope", w.params),
        KeyError, r"'nope'.*\['default'\]"),
    Row("adapter_names-not-bound", lambda w, d: jp.adapter_names(w.base), TypeError, r"dict"),
    Row("merge-unknown-adapter", lambda w, d: jp.merge(w.peft_model, w.params, adapters="nope"),
        KeyError, r"'nope'"),
    Row("unmerge-not-bound", lambda w, d: jp.unmerge(w.base, w.base), TypeError, r"dict"),
    Row("fold-not-bound", lambda w, d: jp.fold(w.base), TypeError, r"dict"),
    Row("peft_layers-linen", lambda w, d: list(jp.peft_layers(w.peft_model)), TypeError, r"PeftLinen",
        covers=("PeftLayer", "PeftParam")),
    # ---- trees
    Row("partition-selector-None", lambda w, d: jp.partition(w.small, None), TypeError, r"got NoneType: None",
        covers=("Selector",)),
    Row("partition-matches-nothing", lambda w, d: jp.partition(w.base, r"^haed/"), jp.SelectorError,
        r"'\^haed/' matched no path.*head/"),
    Row("select-invalid-regex", lambda w, d: jp.select(w.small, "w("), jp.SelectorError, r"'w\(' is not a valid regex"),
    Row("mask-invalid-regex", lambda w, d: jp.mask(w.small, "[w"), jp.SelectorError, r"'\[w' is not a valid regex"),
    Row("combine-mismatch", lambda w, d: jp.combine({"w": w.small["w"]}, {"b": w.small["b"]}), ValueError,
        r"structure|keys|\bw\b|\bb\b"),
    Row("summary-invalid-regex", lambda w, d: jp.summary(w.small, "(bad"), jp.SelectorError, r"'\(bad' is not a valid",
        covers=("ParamSummary",)),
    Row("paths-is_leaf-not-callable", lambda w, d: jp.paths(w.small, is_leaf=3), TypeError, r"is_leaf.*3"),
    Row("leaves_with_paths-is_leaf-not-callable", lambda w, d: jp.leaves_with_paths(w.small, is_leaf="w"),
        TypeError, r"is_leaf.*'w'"),
    Row("fingerprint-is_leaf-not-callable", lambda w, d: jp.fingerprint(w.small, is_leaf=[1]), TypeError,
        r"is_leaf.*\[1\]"),
    Row("insert-wrong-shape", lambda w, d: jp.insert(w.params, w.thin_adapter),
        ValueError, r"lora_(a|b).*shape"),
    # jp.prune itself accepts any tree (it drops holes); a non-array leaf is refused where it is saved.
    Row("prune-then-save-a-str-leaf", lambda w, d: jp.save_adapter(d / "ckpt", jp.prune({"q": {"lora_a": "x"}})),
        TypeError, r"leaf 'q/lora_a' is a str"),
    # ---- checkpoints
    Row("save_adapter-not-a-tree", lambda w, d: jp.save_adapter(d / "ckpt", "weights"), TypeError, r"str"),
    Row("save_adapter-config-not-a-mapping", lambda w, d: jp.save_adapter(d / "ckpt", w.adapter, config="lora"),
        TypeError, r"config must be a mapping.*got str"),
    Row("restore_adapter-missing-dir", lambda w, d: jp.restore_adapter(d / "nothing"), jp.CheckpointError,
        r"nothing", covers=("CheckpointCorruptError", "CheckpointMismatchError")),
    Row("load_metadata-missing-dir", lambda w, d: jp.load_metadata(d / "nothing"), jp.CheckpointError, r"nothing"),
    # ---- training
    Row("make_train_step-loss-not-callable", lambda w, d: jp.make_train_step("loss", _opt()), TypeError,
        r"loss_fn must be callable, got str", covers=("TrainStep",)),
    Row("make_train_step-optimizer", lambda w, d: jp.make_train_step(lambda *a: 0.0, optax.sgd), TypeError,
        r"optimizer must be an optax.GradientTransformation.*function"),
    Row("make_eval_step-not-callable", lambda w, d: jp.make_eval_step(None), TypeError, r"metric_fn.*NoneType"),
    Row("fit-num_steps-float", lambda w, d: jp.fit(_step(w), w.small, None, _opt().init(w.small), [], num_steps=2.5,
                                                   rng=None, progress=False),
        TypeError, r"num_steps must be an int, got 2\.5", covers=("TrainResult",)),
    Row("fit-log_every-0", lambda w, d: jp.fit(_step(w), w.small, None, _opt().init(w.small), [], num_steps=1,
                                               rng=None, log_every=0, progress=False),
        ValueError, r"log_every must be >= 1, got 0"),
    Row("evaluate-no-batches", lambda w, d: jp.evaluate(jp.make_eval_step(lambda t, f, b: {"x": 0.0}), w.small, None,
                                                        []),
        ValueError, r"no eval batches"),
    Row("EarlyStopping-mode", lambda w, d: jp.EarlyStopping(mode="lowest"), ValueError, r"'lowest'"),
    Row("warmup_cosine-total_steps", lambda w, d: jp.warmup_cosine(1e-3, 0), ValueError, r"total_steps.*0"),
    Row("multi_lr-bad-selector", lambda w, d: jp.multi_lr([(None, 1e-3)], optax.adam), TypeError, r"None"),
    Row("lora_plus-ratio", lambda w, d: jp.lora_plus(optax.adam, 1e-3, ratio=0.0), ValueError, r"ratio.*0"),
    Row("decay_mask-min_ndim", lambda w, d: jp.decay_mask(w.small, min_ndim=-1), ValueError, r"min_ndim.*-1"),
    Row("masked_weight_decay-negative", lambda w, d: jp.masked_weight_decay(-0.1), ValueError, r"-0\.1"),
    Row("state_bytes-not-a-tree", lambda w, d: jp.state_bytes("state"), TypeError, r"str"),
    Row("tree_bytes-not-a-tree", lambda w, d: jp.tree_bytes({"w": "abc"}), TypeError, r"'w'.*str"),
    Row("cross_entropy-shape", lambda w, d: jp.cross_entropy(np.zeros((2, 8, 5), np.float32), np.zeros((2, 7), np.int32)),
        ValueError, r"\(2, 8, 5\).*\(2, 7\)"),
    Row("distillation_loss-shape", lambda w, d: jp.distillation_loss(np.zeros((2, 5), np.float32),
                                                                     np.zeros((2, 6), np.float32), temperature=2.0),
        ValueError, r"\(2, 5\).*\(2, 6\)"),
    Row("distillation_loss-temperature", lambda w, d: jp.distillation_loss(np.zeros((2, 5), np.float32),
                                                                           np.zeros((2, 5), np.float32),
                                                                           temperature=0.0),
        ValueError, r"temperature.*0"),
    Row("combined_loss-alpha", lambda w, d: jp.combined_loss(np.zeros((2, 5), np.float32),
                                                             np.zeros((2, 5), np.float32), np.zeros((2,), np.int32),
                                                             alpha=1.5, temperature=2.0),
        ValueError, r"alpha.*1\.5"),
    Row("make_distillation_loss-temperature",
        lambda w, d: jp.make_distillation_loss(lambda *a: 0, lambda *a: 0, temperature=-1.0),
        ValueError, r"temperature.*-1"),
    # ---- ensembling
    Row("uniform_soup-empty", lambda w, d: jp.uniform_soup([]), ValueError, r"(no|empty|at least)"),
    Row("uniform_soup-mismatch", lambda w, d: jp.uniform_soup([w.small, w.other]), jp.TreeMismatchError,
        r"w.*\(3, 4\).*\(3, 5\)"),
    Row("greedy_soup-scores-length", lambda w, d: jp.greedy_soup([w.small, w.small], lambda t: 0.0,
                                                                 individual_scores=[1.0]),
        ValueError, r"1 individual_scores for 2 ingredients", covers=("SoupResult",)),
    Row("wise_ft_adapter-string-alpha", lambda w, d: jp.wise_ft_adapter(w.adapter, "1"), TypeError, r"'1'"),
    Row("alpha_sweep-empty-alphas", lambda w, d: jp.alpha_sweep(lambda t, s: 0.0, w.small, w.small, [], {"a": None}),
        ValueError, r"alphas"),
    Row("pick_alpha-unknown-metric", lambda w, d: jp.pick_alpha([{"alpha": 0.0, "set": "a", "acc": 1.0}], "a", "loss",
                                                                         "min"),
        KeyError, r"no metric 'loss'.*acc"),
    Row("plot_alpha_sweep-empty", lambda w, d: jp.plot_alpha_sweep([], d / "plot.png"), ValueError, r"(empty|no)"),
    Row("output_ensemble-weights-length", lambda w, d: jp.output_ensemble([lambda x: x, lambda x: x], weights=[1.0]),
        ValueError, r"1 weights for 2 members"),
    Row("adapter_ensemble-mode", lambda w, d: jp.adapter_ensemble(lambda p, x: x, mode="median"), ValueError,
        r"'median'"),
    # ---- task arithmetic
    Row("task_vector-mismatch", lambda w, d: jp.task_vector(w.small, w.other), jp.TreeMismatchError, r"w.*\(3, 5\)"),
    Row("apply_task_vectors-weights-length", lambda w, d: jp.apply_task_vectors(w.small, [w.small], [1.0, 2.0]),
        ValueError, r"2 weights for 1 task vectors"),
    Row("merge_task_vectors-method", lambda w, d: jp.merge_task_vectors([w.small], method="avg"), ValueError,
        r"'avg'"),
    Row("ties_merge-density", lambda w, d: jp.ties_merge([w.small], 1.5), ValueError, r"density.*1\.5"),
    Row("dare-drop_rate", lambda w, d: jp.dare(w.small, jax.random.key(0), 1.0), ValueError, r"drop_rate.*1\.0"),
    Row("magnitude_prune-density", lambda w, d: jp.magnitude_prune(w.small, -0.1), ValueError, r"density.*-0\.1"),
    Row("add_weighted_adapters-combination",
        lambda w, d: jp.add_weighted_adapters([w.adapter], [1.0], w.peft, combination="concat"),
        ValueError, r"'concat'"),
    Row("pissa_to_lora-shapes", lambda w, d: jp.pissa_to_lora(np.zeros((4, 2)), np.zeros((2, 3)),
                                                              np.zeros((4, 3)), np.zeros((2, 3))),
        ValueError, r"\(4, 3\)"),
    # ---- pruning
    Row("magnitude_mask-sparsity", lambda w, d: jp.magnitude_mask(w.small, 1.5), ValueError, r"sparsity.*1\.5"),
    Row("nm_mask-n-gt-m", lambda w, d: jp.nm_mask(w.small, 4, 2), ValueError, r"\b4\b.*\b2\b"),
    Row("apply_mask-mismatch", lambda w, d: jp.apply_mask(w.small, {"w": np.ones((3, 5), bool), "b": None}),
        ValueError, r"'b' is None in one of the mask and the parameters"),
    Row("mask_sparsity-not-bool", lambda w, d: jp.mask_sparsity({"w": "all"}), TypeError, r"'w'|str"),
    Row("masked_updates-inner", lambda w, d: jp.masked_updates("adam", {"w": True}), TypeError, r"'adam'|str"),
    Row("rewind-mismatch", lambda w, d: jp.rewind(w.small, {"w": np.ones((3, 4), bool), "b": True}, w.other),
        ValueError, r"'w' is float32\[3, 5\]"),
    Row("iterative_magnitude_pruning-rounds", lambda w, d: jp.iterative_magnitude_pruning(lambda p, m: p, w.small,
                                                                                          sparsity=0.5, rounds=0),
        ValueError, r"rounds.*0"),
    # ---- variable collections (batch_stats, cache, ...): PeftLinen.apply, the train and eval steps
    Row("PeftLinen.apply-mutable-near-miss",
        lambda w, d: w.bn_model.apply(w.bn_params, w.bn_x, train=True, collections=w.bn_state, mutable=["batch_stat"]),
        ValueError, r"collection 'batch_stat', which BatchNormNet does not hold.*did you mean 'batch_stats'\?"),
    Row("PeftLinen.apply-collection-not-passed",
        lambda w, d: w.bn_model.apply(w.bn_params, w.bn_x, train=False),
        ValueError, r"holds the collection 'batch_stats'.*passes \[\].*collections=\{'batch_stats': \.\.\.\}"),
    Row("PeftLinen.apply-collections-not-a-dict",
        lambda w, d: w.bn_model.apply(w.bn_params, w.bn_x, train=False, collections=[w.bn_state]),
        TypeError, r"collections must be a dict.*got list"),
    Row("PeftLinen.apply-collections-hold-params",
        lambda w, d: w.bn_model.apply(w.bn_params, w.bn_x, train=False, collections={"params": w.bn_params,
                                                                                     **w.bn_state}),
        ValueError, r"collections holds 'params'"),
    Row("make_train_step-has_state-not-bool",
        lambda w, d: jp.make_train_step(_bn_loss(), _opt(), has_state="yes"),
        TypeError, r"has_state must be a bool, got 'yes'"),
    Row("TrainStep-model_state-missing", lambda w, d: _bn_step(w),
        TypeError, r"has_state=True: call it as step\(.*model_state\)"),
    Row("TrainStep-model_state-unexpected", lambda w, d: _bn_step(w, has_state=False, model_state=w.bn_state),
        TypeError, r"carries no model state.*has_state=True"),
    Row("make_train_step-state-structure", lambda w, d: _bn_step(w, forget_level=True, model_state=w.bn_state),
        ValueError, r"another structure.*\['bn/mean', 'bn/var'\] instead of \['batch_stats/bn/mean'"),
    Row("make_eval_step-model_state-missing",
        lambda w, d: jp.make_eval_step(lambda t, f, b, s: {"n": jnp.sum(b)}, has_state=True)(*w.bn_split, w.bn_x),
        TypeError, r"takes \(trainable, frozen, batch, model_state\)"),
    Row("apply-prefix-on-linen-decode-cache",
        lambda w, d: jp.apply(jp.prefix_tuning(2, targets=r"attn/(key|value)$"), DecodeAttention(), jax.random.key(1),
                              w.decode_x, params=w.decode_params),
        ValueError, r"prefix tuning cannot run 'attn' \(MultiHeadDotProductAttention\) with decode=True"),
    Row("apply-prefix-on-nnx-decode-cache",
        lambda w, d: jp.apply(jp.prefix_tuning(2, targets=r"attn/(key|value)$"), w.nnx_decode, jax.random.key(1)),
        ValueError, r"prefix tuning cannot run 'attn' \(MultiHeadAttention\) with decode=True"),
    Row("apply-params-already-bound",
        lambda w, d: jp.apply(w.peft, w.model, jax.random.key(1), TOKENS,
                              params=jp.partition(w.params, w.peft.trainable)[1]),
        ValueError, r"LoRA would add the leaf 'lora_a' at 'layers_0/attn/query', which the given params already "
                    r"hold.*jp\.prune\(frozen\)"),
    # ---- quantization
    Row("quantize-scheme", lambda w, d: jp.quantize(w.base, scheme="nf3"), ValueError, r"'nf3'",
        covers=("QuantizedArray",)),
    Row("quantize-block_size", lambda w, d: jp.quantize(w.base, block_size=0), ValueError, r"block_size.*0"),
    Row("dequantize-dtype", lambda w, d: jp.dequantize(w.quantized, "bf16"), (TypeError, ValueError), r"'bf16'"),
    Row("Site-kernel-rank", lambda w, d: jp.Site("q", "Dense", "ab,bc->ac", (3,)), ValueError,
        r"names 2 kernel axes but the kernel has shape \(3,\)"),
    Row("load_adapter-missing-dir", lambda w, d: jp.load_adapter(d / "nothing", w.model), jp.CheckpointError,
        r"no adapter checkpoint at .*nothing"),
    Row("qmatmul_blockwise-float-kernel", lambda w, d: jp.qmatmul_blockwise(np.zeros((2, 3), np.float32),
                                                                            np.zeros((3, 5), np.float32)),
        TypeError, r"expects a QuantizedArray kernel; got ndarray"),
    Row("qeinsum_blockwise-equation", lambda w, d: jp.qeinsum_blockwise("bd,dh", np.zeros((2, 64), np.float32), next(
            q for q in jax.tree.leaves(w.quantized, is_leaf=jp.quant.is_quantized) if isinstance(q, jp.QuantizedArray))),
        ValueError, r"qeinsum_blockwise: equation must be explicit with two operands, 'x,kernel->y'; got 'bd,dh'"),
    Row("paged_train_step-loss-not-callable", lambda w, d: jp.paged_train_step("loss", _opt()), TypeError,
        r"paged_train_step: loss_fn must be callable, got str"),
    Row("paged_train_step-optimizer", lambda w, d: jp.paged_train_step(lambda *a: 0.0, optax.adam), TypeError,
        r"paged_train_step: optimizer must be an optax.GradientTransformation.*function"),
    Row("paged_train_step-memory-kind", lambda w, d: jp.paged_train_step(lambda *a: 0.0, _opt(), memory_kind="gpu"),
        ValueError, r"memory_kind 'gpu'"),
    Row("paged_train_step-offload-trainable", lambda w, d: jp.paged_train_step(lambda *a: 0.0, _opt(),
        offload_trainable="yes"), TypeError, r"offload_trainable.*'yes'"),
    Row("prune-single-leaf", lambda w, d: jp.prune("weights"), TypeError, r"prune: .*single str leaf"),
    Row("offload-str-leaf", lambda w, d: jp.offload("x"), TypeError, r"leaf is a str"),
    # ---- generation
    Row("generate-not-a-gemma-model", lambda w, d: jp.generate(w.model, np.zeros((2, 4), np.int32), params=w.base,
                                                               max_new_tokens=4),
        TypeError, r"cannot find a GemmaConfig on LinenLM", covers=("GenerateOutput",)),
    # ---- sharding
    Row("peft_specs-not-bound", lambda w, d: jp.peft_specs(w.base), TypeError, r"dict"),
    Row("param_axes-not-a-method", lambda w, d: jp.param_axes("lora"), TypeError, r"'lora'|str"),
    Row("check_specs-axis-not-in-mesh",
        lambda w, d: jp.check_specs({"w": jax.sharding.PartitionSpec("data")}, _mesh()),
        jp.ShardingError, r"'data'.*w|w.*'data'"),
    Row("shardings-axis-not-in-mesh",
        lambda w, d: jp.shardings({"w": jax.sharding.PartitionSpec("data")}, _mesh()),
        jp.ShardingError, r"'data'"),
    Row("optimizer_specs-structure",
        lambda w, d: jp.optimizer_specs(optax.adam(1e-3), w.small, {"w": None}),
        (ValueError, TypeError), r"\bb\b|structure"),
]


# ---------------------------------------------------------------- the test


class _Compiles:
    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = _Compiles()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_before_work(row, world, tmp_path):
    COMPILES.count, COMPILES.active = 0, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(row.exc) as info:
                row.call(world, tmp_path)
    finally:
        COMPILES.active = False
    message = str(info.value)
    assert re.search(row.match, message, re.S), f"message does not name the bad input ({row.match!r}): {message}"
    assert list(tmp_path.iterdir()) == [], "something was written before the refusal"
    if not row.compiles:
        assert COMPILES.count == 0, f"{COMPILES.count} XLA programs were compiled before the refusal"
    world.assert_unchanged()


def test_table_is_large_enough():
    assert len(ROWS) >= 60


def test_every_public_function_has_a_row():
    exercised = set()
    for row in ROWS:
        exercised.update(row.covers)
        head = row.id.split("-")[0]
        exercised.add(head.split(".")[0])
    skip = {"__version__"}
    public = {name for name in jp.__all__ if name not in skip}
    errors = {n for n in public if inspect.isclass(getattr(jp, n)) and issubclass(getattr(jp, n), Exception)}
    missing = sorted(public - exercised - errors)
    assert not missing, f"public names without a bad-input row: {missing}"


# ---------------------------------------------------------------- warnings


def test_lora_alpha_zero_warns_once_naming_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = jp.lora(4, 0)
    relevant = [w for w in caught if "alpha" in str(w.message)]
    assert len(relevant) == 1 and "alpha=0.0" in str(relevant[0].message)
    assert relevant[0].filename == __file__  # points at the caller's line
    assert peft.alpha == 0.0  # still accepted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jp.lora(4, 8, alpha_pattern={"query": 0})
    assert any("alpha_pattern['query']=0" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jp.lora(4, 8)
    assert not [w for w in caught if "alpha" in str(w.message)]


def test_default_ia3_feedforward_may_miss_when_targets_leave_out_the_mlp(world):
    """Only a feedforward the user set is refused for matching nothing; the default may miss."""
    _, params = jp.apply(jp.ia3(targets=r"attn/(key|value)$"), world.model, jax.random.key(0), TOKENS,
                         params=world.base)
    assert "ia3_scale" in params["layers_0"]["attn"]["key"]


def test_adapters_disabled_on_linen_runs_the_base(world):
    """Issue 11 found it did nothing on Linen; the bind rewrite makes it yield a copy running the base alone."""
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "lora_b" in jax.tree_util.keystr(p) else x, world.params
    )  # B != 0: the adapter changes the output
    with_adapter = np.asarray(world.peft_model.apply(params, TOKENS))
    with jp.adapters_disabled(world.peft_model) as base_model:
        disabled = np.asarray(base_model.apply(params, TOKENS))
    np.testing.assert_allclose(disabled, np.asarray(world.model.apply({"params": world.base}, TOKENS)), atol=1e-6)
    assert not np.allclose(disabled, with_adapter)
