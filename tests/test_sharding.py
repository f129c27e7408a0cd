"""Shardings of PEFT parameters, training on meshes and sharded adapter checkpoints.

Expected PartitionSpecs are written here from the rule (LoRA ``A = kernel input entries + None``,
``B = None + kernel output entries``), never copied from the code's output. Multi-device runs
happen in subprocesses (``XLA_FLAGS`` must be set before jax is imported; this process keeps one
device): ``_sharding_worker.py`` on 8 fake CPU devices, ``_sharding_multihost.py`` as two
processes of 4 devices joined by ``jax.distributed``. They start with the first test of this
module and run while the in-process tests do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import warnings
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import jaxpeft as jp
from jaxpeft.methods.protocol import PeftMethod
from jaxpeft import checkpoint as ckpt
from jaxpeft.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from jaxpeft.sharding import ShardingError, check_specs, optimizer_specs, peft_specs, shardings

HERE = pathlib.Path(__file__).resolve().parent
MESH = AbstractMesh((4, 2), ("data", "model"))  # validation needs axis names and sizes, not devices
WORKER_TIMEOUT = 300


# ------------------------------------------------------------------------------------------
# Subprocesses: started once, collected by the tests at the end of the module
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


class _Runs:
    def __init__(self, out: pathlib.Path):
        self.out = out
        (out / "worker").mkdir()
        (out / "multihost").mkdir()
        port = _free_port()

        def start(args, devices, log):
            return subprocess.Popen(
                [sys.executable, *args], env=_env(devices), stdout=open(log, "w"), stderr=subprocess.STDOUT
            )

        self.worker = start([str(HERE / "_sharding_worker.py"), str(out / "worker")], 8, out / "worker.log")
        self.hosts = [
            start([str(HERE / "_sharding_multihost.py"), str(port), str(i), str(out / "multihost")], 4, out / f"host{i}.log")
            for i in range(2)
        ]

    def _wait(self, proc, log) -> None:
        try:
            rc = proc.wait(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert rc == 0, f"subprocess failed ({rc}):\n{pathlib.Path(log).read_text()[-6000:]}"

    def worker_facts(self) -> dict:
        self._wait(self.worker, self.out / "worker.log")
        return json.loads((self.out / "worker" / "facts.json").read_text())

    def host_facts(self) -> list[dict]:
        for i, proc in enumerate(self.hosts):
            self._wait(proc, self.out / f"host{i}.log")
        return [json.loads((self.out / "multihost" / f"facts_{i}.json").read_text()) for i in range(2)]

    def stop(self) -> None:
        for proc in (self.worker, *self.hosts):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory):
    r = _Runs(tmp_path_factory.mktemp("sharding"))
    yield r
    r.stop()


# ------------------------------------------------------------------------------------------
# Small models
# ------------------------------------------------------------------------------------------


class Annotated(nn.Module):
    """Megatron-style annotations: a column-parallel Dense, a row-parallel Dense, a DenseGeneral
    into heads (output axes [heads, head_dim]) and an Einsum, all through nn.with_partitioning."""

    @nn.compact
    def __call__(self, x):  # x: [batch, 16]
        up = nn.Dense(32, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")), name="up")
        down = nn.Dense(16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None)), name="down")
        heads = nn.DenseGeneral(
            (4, 8), kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model", None)), name="heads"
        )
        mix = nn.Einsum(
            (8, 16), "bhd,dk->bhk", kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "data")),
            use_bias=False, name="mix",
        )
        h = heads(down(jax.nn.gelu(up(x))))  # [batch, 4, 8]
        return mix(h)


def annotated(targets=r"(up|down|heads|mix)$", rank=4, abstract=True):
    """Specs need shapes only: by default the base is ``jax.eval_shape``'s (no FLOP, no compile)."""
    model = Annotated()
    x = jnp.ones((2, 16))
    init = jax.eval_shape(model.init, jax.random.key(0), x) if abstract else model.init(jax.random.key(0), x)
    boxed = init["params"]
    peft = jp.lora(rank=rank, targets=targets)
    # jp.apply wants plain arrays; the boxes themselves are the base specs.
    peft_model, params = jp.apply(peft, model, jax.random.key(1), x, params=nn.unbox(boxed))
    return peft_model, params, boxed


def spec_at(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------------------------
# Spec derivation
# ------------------------------------------------------------------------------------------


def test_lora_specs_follow_the_kernel_axes():
    peft_model, params, boxed = annotated()
    specs = peft_specs(peft_model, params, boxed)
    expected = {
        # column parallel [16, 32] (None, model): A [16, r] takes None + rank, B [r, 32] rank + model
        "up/kernel": P(None, "model"), "up/lora_a": P(None, None), "up/lora_b": P(None, "model"),
        # row parallel [32, 16] (model, None)
        "down/kernel": P("model", None), "down/lora_a": P("model", None), "down/lora_b": P(None, None),
        # DenseGeneral [16, 4, 8] (data, model, None): one input axis, two output axes
        "heads/kernel": P("data", "model", None),
        "heads/lora_a": P("data", None),
        "heads/lora_b": P(None, "model", None),
        # Einsum "bhd,dk->bhk" kernel [8, 16] (None, data)
        "mix/kernel": P(None, "data"), "mix/lora_a": P(None, None), "mix/lora_b": P(None, "data"),
        # unannotated leaves are replicated, as nn.get_partition_spec says
        "up/bias": P(),
    }
    for path, spec in expected.items():
        assert spec_at(specs, path) == spec, path
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        jax.tree.map(lambda _: 0, params)
    )
    # The same from an explicit tree of specs, and from nn.get_partition_spec's output.
    assert peft_specs(peft_model, params, nn.get_partition_spec(boxed)) == specs


def test_rank_axis_shards_the_rank_where_the_axis_is_free():
    peft_model, params, boxed = annotated(targets=r"(up|down)$")
    specs = peft_specs(peft_model, params, boxed, rank_axis="data")
    assert specs["up"]["lora_a"] == P(None, "data") and specs["up"]["lora_b"] == P("data", "model")
    assert specs["down"]["lora_a"] == P("model", "data") and specs["down"]["lora_b"] == P("data", None)
    # FSDP: A's input axis already uses "model": a mesh axis shards one dimension, so A's rank stays.
    specs = peft_specs(peft_model, params, boxed, rank_axis="model")
    assert specs["down"]["lora_a"] == P("model", None) and specs["down"]["lora_b"] == P("model", None)
    assert specs["up"]["lora_b"] == P(None, "model")
    check_specs(specs, MESH, params)


def test_named_adapters_follow_the_same_rule():
    model, x = Annotated(), jnp.ones((2, 16))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    peft = jp.chain(jp.lora(rank=4, targets="up$"), jp.lora(rank=2, targets="up$", adapter="second"))
    peft_model, params = jp.apply(peft, model, jax.random.key(1), x, params=nn.unbox(boxed))
    specs = peft_specs(peft_model, params, boxed)["up"]
    assert specs["lora_a"] == specs["lora_a@second"] == P(None, None)
    assert specs["lora_b"] == specs["lora_b@second"] == P(None, "model")


def test_logical_names_go_through_rules():
    class Logical(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(32, kernel_init=init, name="up")(x)

    model, x = Logical(), jnp.ones((2, 16))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    peft_model, params = jp.apply(jp.lora(rank=4, targets="up$"), model, jax.random.key(1), x, params=nn.unbox(boxed))
    rules = [("embed", "data"), ("mlp", "model")]
    specs = peft_specs(peft_model, params, boxed, rules=rules)
    assert specs["up"]["kernel"] == P("data", "model")
    assert specs["up"]["lora_a"] == P("data", None) and specs["up"]["lora_b"] == P(None, "model")
    with nn.logical_axis_rules(rules):  # flax's own context works too
        assert peft_specs(peft_model, params, boxed) == specs
    # An explicit tree of logical names with rules.
    explicit = {"up": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}}
    assert peft_specs(peft_model, params, explicit, rules=rules)["up"]["lora_b"] == P(None, "model")
    # A logical name without a rule is kept, and the mesh then names it.
    unmapped = peft_specs(peft_model, params, boxed, rules=[("mlp", "model")])
    with pytest.raises(ShardingError, match=r"up/kernel: .*'embed'.*mesh .* lacks"):
        shardings(unmapped, MESH, params)


def test_nnx_variables_metadata():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 64, kernel_metadata={"out_sharding": (None, "model")}, rngs=rngs)
            self.down = nnx.Linear(64, 16, kernel_metadata={"out_sharding": ("model", None)}, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    with nnx.use_eager_sharding(False):  # metadata only: no mesh is needed to read it
        base = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    model = jp.apply(jp.lora(rank=4, targets=["up", "down"]), base, jax.random.key(1))
    specs = peft_specs(model)
    value = lambda v: v.get_value()  # noqa: E731
    assert value(specs["up"]["base_layer"]["kernel"]) == P(None, "model")
    assert value(specs["up"]["lora_a"]) == P(None, None) and value(specs["up"]["lora_b"]) == P(None, "model")
    assert value(specs["down"]["lora_a"]) == P("model", None) and value(specs["down"]["lora_b"]) == P(None, None)
    # NNX's own filters split the spec state like the model state.
    _, trainable, frozen = nnx.split(model, jp.PeftParam, ...)
    t_specs, f_specs = nnx.split_state(specs, jp.PeftParam, ...)
    check_specs(t_specs, MESH, trainable)
    check_specs(f_specs, MESH, frozen)
    # Explicit specs for the original model's paths ("base_layer" left out) give the same.
    explicit = {"up": {"kernel": P(None, "model"), "bias": P()}, "down": {"kernel": P("model", None), "bias": P()}}
    assert jax.tree.leaves(peft_specs(model, base_specs=explicit)) == jax.tree.leaves(specs)


class Up(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(32, name="up")(x)


def test_quantized_kernel_shards_like_its_float_original():
    model, x = Up(), jnp.ones((2, 128))
    base = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 32)), "bias": jnp.zeros((32,))}}
    qbase = jp.quantize(base, targets="kernel$", block_size=64, double_quant=True)
    peft_model, params = jp.apply(jp.lora(rank=4, targets="up$"), model, jax.random.key(1), x, params=qbase)
    specs = peft_specs(peft_model, params, {"up": {"kernel": P("model", "data"), "bias": P("data")}})["up"]
    params = params["up"]
    kernel = specs["kernel"]
    assert isinstance(kernel, jp.QuantizedArray)
    # packed [64, 32] and scales [2, 32]: axis 0 is the input axis, like the kernel's
    assert kernel.packed == P("model", "data") and kernel.scales == P("model", "data")
    assert kernel.scale_scales == P() and kernel.scale_offset == P()  # [2, 1] and [], replicated
    assert specs["lora_a"] == P("model", None) and specs["lora_b"] == P(None, "data")
    check_specs(specs, MESH, params)
    # With the input axis over 4 devices, the 2 scale blocks do not divide: named, with sizes.
    wide = peft_specs(peft_model, {"up": params}, {"up": {"kernel": P("data", None), "bias": P()}})["up"]
    with pytest.raises(ShardingError, match=r"kernel/scales.*dimension 0 of size 2 .*'data'=4"):
        check_specs(wide, MESH, params)


class Lookup(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(16, 8, name="embed")(ids)


class NnxLookup(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(16, 8, embedding_metadata={"out_sharding": ("model", "data")}, rngs=rngs)

    def __call__(self, ids):
        return self.embed(ids)


def test_embed_table_specs_follow_the_table_in_linen_and_nnx():
    # An Embed's base leaf is its table ``embedding: [vocab, features]`` (not ``kernel``): LoRA's
    # A: [vocab, r] takes the vocabulary entry, B: [r, features] the features entry (HF PEFT's layout).
    # Both bindings failed here before (they looked for ``embed/kernel``).
    ids = jnp.array([[1, 2, 3]])
    peft_model, params = jp.apply(jp.lora(rank=2, targets="embed"), Lookup(), jax.random.key(0), ids)
    specs = peft_specs(peft_model, params, {"embed": {"embedding": P("model", "data")}})["embed"]
    assert specs == {"embedding": P("model", "data"), "lora_a": P("model", None), "lora_b": P(None, "data")}
    with nnx.use_eager_sharding(False):  # metadata only: no mesh is needed to read it
        base = NnxLookup(nnx.Rngs(0))
    model = jp.apply(jp.lora(rank=2, targets="embed"), base, jax.random.key(0))
    nnx_specs = peft_specs(model)["embed"]
    assert nnx_specs["base_layer"]["embedding"].get_value() == P("model", "data")
    assert nnx_specs["lora_a"].get_value() == P("model", None) and nnx_specs["lora_b"].get_value() == P(None, "data")


# A method that declares its own leaves' axes: an (IA)^3-style output scale (Liu et al. 2022,
# https://arxiv.org/abs/2205.05638), ``y = (x W) * l`` with ``l: [*out_shape]``.
@dataclasses.dataclass(frozen=True)
class OutputScale(PeftMethod):
    targets: Any = "up$"
    adapter: str = "default"
    name: ClassVar[str] = "output_scale"
    leaves: ClassVar[tuple[str, ...]] = ("ia3_scale",)
    param_axes: ClassVar[dict] = {"ia3_scale": ("out",)}
    merges: ClassVar[bool] = False
    unmerges: ClassVar[bool] = False

    def init_site(self, key, site, base=None):
        return {"ia3_scale": jnp.ones(site.out_shape)}

    def apply_site(self, params, site, x, base_fn, *, rng=None, base=None, shared=None):
        return base_fn(x) * params["ia3_scale"]

    def merge_site(self, params, base, site=None):
        raise TypeError("the sharding tests' OutputScale does not merge")

    unmerge_site = merge_site


@dataclasses.dataclass(frozen=True)
class Undeclared(OutputScale):
    leaves: ClassVar[tuple[str, ...]] = ("mystery",)
    param_axes: ClassVar[None] = None

    def init_site(self, key, site, base=None):
        return {"mystery": jnp.ones(site.out_shape)}

    def apply_site(self, params, site, x, base_fn, *, rng=None, base=None, shared=None):
        return base_fn(x) * params["mystery"]


def test_methods_declare_their_leaves_and_unknown_leaves_are_replicated_with_a_warning():
    model, x = Annotated(), jnp.ones((2, 16))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    peft = jp.chain(jp.lora(rank=4, targets="up$"), OutputScale(), Undeclared(targets="down$"))
    peft_model, params = jp.apply(peft, model, jax.random.key(1), x, params=nn.unbox(boxed))
    with pytest.warns(UserWarning, match=r"replicated.*down/mystery"):
        specs = peft_specs(peft_model, params, boxed)
    assert specs["up"]["ia3_scale"] == P("model")  # the kernel's output entry
    assert specs["up"]["lora_b"] == P(None, "model")
    assert specs["down"]["mystery"] == P()


@dataclasses.dataclass(frozen=True)
class InputOrOutputScale(OutputScale):
    """IA3's two placements: scale the input at "heads" (like its feed-forward sites), the output elsewhere."""

    targets: Any = "(up|heads)$"
    param_axes: ClassVar[None] = None

    def param_axes_at(self, site):
        return {"ia3_scale": ("in",) if site.path == "heads" else ("out",)}

    def init_site(self, key, site, base=None):
        return {"ia3_scale": jnp.ones(site.in_shape if site.path == "heads" else site.out_shape)}

    def apply_site(self, params, site, x, base_fn, *, rng=None, base=None, shared=None):
        if site.path == "heads":
            return base_fn(x * params["ia3_scale"])
        return base_fn(x) * params["ia3_scale"]


def test_axes_declared_per_site():
    model, x = Annotated(), jnp.ones((2, 16))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    peft_model, params = jp.apply(InputOrOutputScale(), model, jax.random.key(1), x, params=nn.unbox(boxed))
    specs = peft_specs(peft_model, params, boxed)
    assert specs["up"]["ia3_scale"] == P("model")  # up (None, model): its output entry
    assert specs["heads"]["ia3_scale"] == P("data")  # heads (data, model, None): its input entry


def test_leaves_shared_across_sites_are_replicated_without_a_warning():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(64, 64, kernel_metadata={"out_sharding": (None, "model")}, rngs=rngs)
            self.down = nnx.Linear(64, 64, kernel_metadata={"out_sharding": ("model", None)}, rngs=rngs)

    with nnx.use_eager_sharding(False):
        base = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    model = jp.apply(jp.compacter(targets=["up", "down"], bottleneck=8), base, jax.random.key(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Compacter declares its per-site leaves; phm_rule is shared
        specs = peft_specs(model)
    shared = [p for p, v in jp.leaves_with_paths(specs) if "phm_rule" in p]
    assert shared and all(specs_at_path(specs, p) == P() for p in shared)


def specs_at_path(state, path):
    node = state
    for part in path.split("/"):
        node = node[part]
    return node.get_value()


def test_declared_axes_that_do_not_fit_the_leaf_are_an_error():
    @dataclasses.dataclass(frozen=True)
    class Wrong(OutputScale):
        param_axes: ClassVar[dict] = {"ia3_scale": ("in", "out")}

    model, x = Annotated(), jnp.ones((2, 16))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    peft_model, params = jp.apply(Wrong(), model, jax.random.key(1), x, params=nn.unbox(boxed))
    with pytest.raises(ValueError, match=r"up/ia3_scale .*give 2 dimensions for a leaf of shape \(32,\)"):
        peft_specs(peft_model, params, boxed)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def test_validation_names_path_axis_and_sizes():
    peft_model, params, boxed = annotated(targets=r"(up|down)$")
    specs = peft_specs(peft_model, params, boxed)
    with pytest.raises(ShardingError, match=r"up/kernel: spec P\(None, 'model'\) names mesh axis 'model'"):
        shardings(specs, AbstractMesh((8,), ("data",)))
    odd = AbstractMesh((1, 3), ("data", "model"))
    with pytest.raises(ShardingError) as info:
        shardings(specs, odd, params)
    message = str(info.value)
    assert "up/lora_b: dimension 1 of size 32 is not divisible by mesh axis 'model'=3" in message
    assert "down/kernel: dimension 0 of size 32 is not divisible by mesh axis 'model'=3" in message
    bad = {**specs, "up": {**specs["up"], "bias": P("model", "data")}}
    with pytest.raises(ShardingError, match=r"up/bias: spec P\('model', 'data'\) has 2 entries for an array of shape \(32,\)"):
        check_specs(bad, MESH, params)
    twice = {**specs, "up": {**specs["up"], "kernel": P("model", "model")}}
    with pytest.raises(ShardingError, match=r"up/kernel: .* uses mesh axis 'model' for dimensions 0 and 1"):
        check_specs(twice, MESH)
    assert jax.tree.leaves(shardings(specs, MESH, params))[0].mesh == MESH


def test_explicit_base_specs_must_cover_exactly_the_base():
    peft_model, params, boxed = annotated(targets=r"(up|down)$")
    explicit = nn.get_partition_spec(boxed)
    missing = {**explicit, "up": {"kernel": P(None, "model")}}  # no up/bias
    with pytest.raises(ShardingError, match=r"(?s)no spec for 1 base parameters.*up/bias: shape \(32,\)"):
        peft_specs(peft_model, params, missing)
    typo = {**explicit, "upp": {"kernel": P()}}
    with pytest.raises(ShardingError, match=r"upp/kernel: no such parameter; closest: \['up/kernel'"):
        peft_specs(peft_model, params, typo)


def test_optimizer_state_follows_the_trainable_specs():
    peft_model, params, boxed = annotated(targets=r"(up|down)$")
    specs = peft_specs(peft_model, params, boxed)
    trainable, _ = jp.partition(params, peft_model.trainable)
    t_specs, _ = jp.partition(specs, peft_model.trainable)
    state = optimizer_specs(optax.adamw(1e-3), trainable, t_specs)
    adam = state[0]
    assert adam.count == P()
    assert adam.mu["up"]["lora_b"] == P(None, "model") and adam.nu["down"]["lora_a"] == P("model", None)
    assert adam.mu["up"]["kernel"] is None  # frozen holes stay holes


def test_single_device_mesh_round_trip():
    """The 1x1 mesh path users take on a laptop: specs -> shardings -> device_put -> jit."""
    peft_model, params, boxed = annotated(targets=r"(up|down)$", abstract=False)
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sh = shardings(peft_specs(peft_model, params, boxed), mesh, params)
    placed = jax.device_put(params, sh)
    x = jnp.ones((2, 16))
    y = jax.jit(peft_model.apply, in_shardings=(sh, None))(placed, x)
    # One jitted program against op-by-op dispatch: equal up to fp32 summation order.
    np.testing.assert_allclose(y, peft_model.apply(params, x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Checkpoints: checksums and restore-time checks (one device here; 8 and 2x4 below)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.bool_, jnp.float16])
def test_device_checksum_equals_host_checksum(dtype):
    host = (np.random.default_rng(0).standard_normal((5, 7)) * 50).astype(dtype)
    assert ckpt.integrity.checksums([jnp.asarray(host)]) == [ckpt.integrity._host_checksum(host)]
    flipped = host.copy()
    flipped.reshape(-1).view(np.uint8)[3] ^= 4
    assert ckpt.integrity._host_checksum(flipped) != ckpt.integrity._host_checksum(host)


def test_restore_refuses_shardings_that_do_not_fit(tmp_path):
    adapter = {"q": {"lora_a": jnp.ones((6, 4)), "lora_b": jnp.ones((4, 8))}}
    path = jp.save_adapter(tmp_path / "a", adapter)
    three = AbstractMesh((3,), ("model",))
    sh = {"q": {"lora_a": NamedSharding(three, P(None, "model")), "lora_b": NamedSharding(three, P(None, "model"))}}
    with pytest.raises(CheckpointMismatchError, match=r"q/lora_a: dimension 1 of size 4 is not divisible by mesh axis 'model'=3"):
        jp.restore_adapter(path, shardings=sh)
    one = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(CheckpointMismatchError, match=r"q/lora_b: saved \(4, 8\) float32, no sharding given"):
        jp.restore_adapter(path, shardings={"q": {"lora_a": one}})
    with pytest.raises(CheckpointMismatchError, match=r"k/lora_a: a sharding for a leaf the adapter does not have"):
        jp.restore_adapter(path, shardings={"q": {"lora_a": one, "lora_b": one}, "k": {"lora_a": one}})
    restored, _ = jp.restore_adapter(path, shardings=one)  # one sharding for every leaf
    assert restored["q"]["lora_b"].sharding == one
    wide = jp.save_adapter(tmp_path / "b", {"step": np.arange(3, dtype=np.int64)})
    with pytest.raises(CheckpointMismatchError, match=r"step: a int64 leaf cannot go to devices"):
        jp.restore_adapter(wide, shardings=one)


def test_sharded_restore_checks_the_checksum(tmp_path):
    rng = np.random.default_rng(0)
    path = jp.save_adapter(tmp_path / "a", {"big": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)})
    data = max((f for f in (path / ckpt.ARRAYS_DIR).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    # Refused by the file digests before orbax reads (test_checkpoint.py covers the per-leaf checks).
    with pytest.raises(CheckpointCorruptError, match=r"big: (sha256|checksum)|array files do not match"):
        jp.restore_adapter(path, shardings={"big": NamedSharding(mesh, P("model", None))})


# ------------------------------------------------------------------------------------------
# 8 devices: training on meshes against one device, sharded checkpoints, the example
# ------------------------------------------------------------------------------------------

# fp32 tolerances for a two-step SGD-with-momentum run: on a mesh the reductions (the batch
# mean, the contraction over a sharded d_in) add in another order. Measured: 1.5e-8 on
# parameters of size <= 0.2 (one ulp), loss equal to 1e-7 relative. A shard laid out wrong, or
# a missing all-reduce, is off by O(lr * grad) ~ 1e-3.
PARAM_ATOL = 1e-6
LOSS_RTOL = 1e-6


def test_data_model_mesh_matches_one_device(runs):
    facts = runs.worker_facts()["linen"]
    run = facts["data_model"]
    np.testing.assert_allclose(run["losses"], facts["reference_losses"], rtol=LOSS_RTOL)
    assert run["diff"]["abs"] < PARAM_ATOL, run["diff"]
    assert run["wrong_layouts"] == []
    specs = run["specs"]
    # lm_base_specs on (data, model): query/value/up kernels (None, model), out/down (model, None)
    for layer in ("attn/query", "attn/value", "mlp/up"):
        assert specs[f"layers_0/{layer}/kernel"] == [None, "model"]
        assert specs[f"layers_0/{layer}/lora_a"] == [None, None]
        assert specs[f"layers_0/{layer}/lora_b"] == [None, "model"]
    for layer in ("attn/out", "mlp/down"):
        assert specs[f"layers_0/{layer}/kernel"] == ["model", None]
        assert specs[f"layers_0/{layer}/lora_a"] == ["model", None]
        assert specs[f"layers_0/{layer}/lora_b"] == [None, None]
    # d_model 32, d_ff 64, rank 8, model axis 2: the arrays really are split.
    assert run["shard_shapes"] == {
        "attn/query/lora_a": [32, 8], "attn/query/lora_b": [8, 16], "attn/out/lora_a": [16, 8], "mlp/down/lora_b": [8, 32],
    }
    plain = facts["make_train_step"]
    np.testing.assert_allclose(plain["loss"], facts["reference_losses"][0], rtol=LOSS_RTOL)
    assert plain["diff"]["abs"] < PARAM_ATOL, plain["diff"]


def test_fsdp_mesh_with_a_sharded_rank_matches_one_device(runs):
    facts = runs.worker_facts()["linen"]
    run = facts["fsdp"]
    np.testing.assert_allclose(run["losses"], facts["reference_losses"], rtol=LOSS_RTOL)
    assert run["diff"]["abs"] < PARAM_ATOL, run["diff"]
    assert run["wrong_layouts"] == []
    specs = run["specs"]
    # lm_base_specs on (fsdp,): column kernels (fsdp, None), row kernels (None, fsdp); rank_axis="fsdp"
    assert specs["layers_0/attn/query/kernel"] == ["fsdp", None]
    assert specs["layers_0/attn/query/lora_a"] == ["fsdp", None]  # fsdp taken by d_in: rank replicated
    assert specs["layers_0/attn/query/lora_b"] == ["fsdp", None]  # rank over fsdp
    assert specs["layers_0/attn/out/kernel"] == [None, "fsdp"]
    assert specs["layers_0/attn/out/lora_a"] == [None, "fsdp"]  # rank over fsdp
    assert specs["layers_0/attn/out/lora_b"] == [None, "fsdp"]  # fsdp taken by d_out
    assert run["shard_shapes"]["attn/query/lora_b"] == [1, 32]


def test_nnx_model_on_a_mesh_matches_one_device(runs):
    facts = runs.worker_facts()["nnx"]
    np.testing.assert_allclose(facts["losses"], facts["reference_losses"], rtol=LOSS_RTOL)
    assert facts["diff"]["abs"] < PARAM_ATOL, facts["diff"]
    assert facts["wrong_layouts"] == []
    assert facts["query_specs"] == {"lora_a": [None, None], "lora_b": [None, "model"], "base_layer/kernel": [None, "model"]}


def test_adapter_saved_on_8_devices_restores_on_2_and_on_1(runs):
    facts = runs.worker_facts()["linen"]["checkpoint"]
    assert facts["sharded_leaves"], "nothing was sharded: the test would prove nothing"
    assert facts["every_leaf_has_sha256_and_checksum"]
    assert facts["restored_on_two_devices"] and facts["restored_identical"] and facts["restored_plain_identical"]
    assert facts["restored_query_b_spec"] == [None, "model"] and facts["restored_query_b_shard"] == [8, 16]
    # Here, in a process with one device: the same checkpoint onto a 1x1 mesh, bit for bit.
    expected = dict(np.load(pathlib.Path(facts["directory"]).parent / "adapter8_expected.npz"))
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    meta = jp.load_metadata(facts["directory"])
    layout = {}
    for leaf in meta["leaves"]:
        node = layout
        for k in leaf["keys"][:-1]:
            node = node.setdefault(k, {})
        node[leaf["keys"][-1]] = NamedSharding(mesh, P("model") if leaf["path"].endswith("lora_b") else P())
    restored, _ = jp.restore_adapter(facts["directory"], shardings=layout)
    for path, x in jp.leaves_with_paths(restored):
        assert np.array_equal(np.asarray(x), expected[path.replace("/", ".")]), path
        assert x.sharding.mesh == mesh


def test_two_processes_save_without_gathering_and_restore_onto_another_mesh(runs):
    first, second = runs.host_facts()
    assert first["process_count"] == second["process_count"] == 2
    assert not any(first["fully_addressable"].values())  # every leaf spans both processes
    # No host holds a whole array, so no sha256; the sum64 checksum was computed where the shards live.
    assert all(v is None for v in first["sha256"].values())
    assert all(v.startswith("sum64:") for v in first["checksum"].values())
    assert first["checksum"] == second["checksum"]
    for facts in (first, second):
        assert facts["restored_shards_identical"] and facts["local_identical"]
        assert facts["restored_specs"]["layer/lora_b"] == "P(None, 'model')"
    assert first["example_losses"] == second["example_losses"] and all(np.isfinite(first["example_losses"]))


# -- stacked layers (nn.scan / nnx.vmap stacks) and any einsum layout -----------------------------------------


def _expected_lora(kernel_spec_in, kernel_spec_out, rank=None):
    """By the definition: A [L, in, r] takes the stack and input entries, B [L, r, out] the stack and outputs."""
    return [None, kernel_spec_in, rank], [None, None, kernel_spec_out]


@pytest.mark.slow
def test_stacked_lm_specs_follow_the_kernels_and_run_sharded_on_8_devices(tmp_path):
    out = tmp_path / "stacked.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, str(HERE / "_stacked_sharding_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    facts = json.loads(out.read_text())
    sites = ["attn/query", "attn/value", "attn/out", "mlp/up", "mlp/down"]
    for rank_axis, table in ((None, facts["linen_specs_None"]), ("model", facts["linen_specs_model"])):
        # rank_axis='model' shards A's rank (A uses 'data' only); B's rank stays replicated ('model' is taken).
        a, b = _expected_lora("data", "model", rank_axis)
        for s in sites:
            assert table[f"layers/{s}/kernel"] == [None, "data", "model"]
            assert table[f"layers/{s}/lora_a"] == a, (s, rank_axis)
            assert table[f"layers/{s}/lora_b"] == b, (s, rank_axis)
    a, b = _expected_lora("data", "model")
    for s in sites:
        assert facts["linen_placed"][f"layers/{s}/lora_a"] == a  # the layout JAX actually used
        assert facts["nnx_specs"][f"layers/{s}/lora_a"] == a and facts["nnx_specs"][f"layers/{s}/lora_b"] == b
    assert facts["linen_grad_lora_a_spec"] == a
    assert facts["linen_out_diff"] < 1e-4 and facts["linen_grad_diff"] < 1e-5  # vs the unsharded run
    assert facts["nnx_out_diff_vs_linen"] < 1e-4
    # QLoRA on the stack (each layer's kernel 4-bit on its own): the codes and absmax shard like the
    # kernel, [L, d_in / 2, d_out] on (None, 'data', 'model'), and the sharded forward equals one device's.
    d = facts["config"]["d_model"]
    assert facts["qlora_placed"] == {"packed": [None, "data", "model"], "scales": [None, "data", "model"]}
    assert facts["qlora_shards"] == [[2, d // 4, d // 4]]  # 2 layers, d/2 bytes over 2, d over 4
    assert facts["qlora_out_diff"] < 1e-4 and facts["qlora_vs_float_diff"] > 1e-3
    # QLoRA on heads-first Einsum kernels (NDH, NHD), each blocked along its input axis (D, H): codes and
    # absmax keep the kernel's axes, the double-quantization scales lead with the heads; sharded == one device.
    assert facts["heads_axes"] == {"q": 1, "o": 1}
    assert facts["heads_placed"] == {
        "q/packed": ["model", "data", None], "q/scales": ["model", "data", None], "q/scale_scales": ["model"],
        "o/packed": ["model", None, "data"], "o/scales": ["model", None, "data"], "o/scale_scales": ["model"],
    }
    assert facts["heads_out_scale"] > 0.1 and facts["heads_out_diff"] < 1e-5 * max(1.0, facts["heads_out_scale"])


class _HeadsFirst(nn.Module):
    """An Einsum whose kernel is not inputs-first: [heads, head_dim, d_model] contracted over d_model."""

    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 2, 8), "bsd,hkd->bshk", name="proj")(x)


def test_einsum_layout_specs_follow_input_and_output_axes_not_positions():
    x = jnp.ones((2, 3, 8))
    peft_model, params = jp.apply(jp.lora(rank=2, targets="proj"), _HeadsFirst(), jax.random.key(0), x)
    base = {"proj": {"kernel": P("model", None, "data"), "bias": P()}}
    specs = jp.peft_specs(peft_model, params, base)["proj"]
    # kernel axes: h (output, 'model'), k (output, None), d (input, 'data')
    assert specs["lora_a"] == P("data", None) and specs["lora_b"] == P(None, "model", None)


def test_stacked_axis_that_cannot_be_sharded_raises_before_any_array_naming_path_and_axis():
    from tests.test_scan import Stacked, X

    peft = jp.lora(rank=2, targets=r"(query|out)$")
    peft_model, params = jp.apply(peft, Stacked("scan"), jax.random.key(0), X)
    shapes = jax.eval_shape(lambda p: p, params)  # no arrays laid out: abstract shapes only
    mesh = AbstractMesh((2, 4), ("data", "model"))

    def specs_with(stack_axis):
        base = jax.tree_util.tree_map_with_path(
            lambda k, v: P(stack_axis, "data", None) if v.ndim == 3 else P(), params)
        return jp.peft_specs(peft_model, params, base)

    with pytest.raises(jp.ShardingError) as err:  # L = 3 layers over 'model' = 4
        jp.shardings(specs_with("model"), mesh, shapes)
    assert "layers/query/lora_a" in str(err.value) and "'model'=4" in str(err.value) and "size 3" in str(err.value)
    with pytest.raises(jp.ShardingError, match=r"layers/query/lora_b.*'expert'"):
        jp.shardings(specs_with("expert"), mesh, shapes)
