"""The method protocol (``jaxpeft.methods.protocol``): hooks declared once, read plainly, checked early.

References: the protocol's documented defaults (its docstring table); a dense NumPy forward for
the custom methods bound here; the source itself (no hook is probed outside the protocol module).
"""

import ast
import dataclasses
import pathlib
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.methods.protocol import ModelMethod, PeftMethod, SiteMethod, check_method
from jaxpeft.methods.site import conv_site

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxpeft"


@dataclasses.dataclass(frozen=True)
class OutputShift(PeftMethod):
    """``y = x W + b + delta``: a toy site method that sets nothing but what it must."""

    targets: Any = "up$"
    adapter: str = "default"
    name: ClassVar[str] = "output_shift"
    leaves: ClassVar[tuple[str, ...]] = ("delta",)

    def init_site(self, key, site, base=None):
        return {self.param_names[0]: jax.random.normal(key, site.out_shape)}

    def apply_site(self, params, site, x, base_fn, *, rng=None, base=None, shared=None):
        return base_fn(x) + params[self.param_names[0]]

    def merge_site(self, params, base, site=None):
        return {**base, "bias": base["bias"] + params[self.param_names[0]]}

    def unmerge_site(self, params, base, site=None):
        return {**base, "bias": base["bias"] - params[self.param_names[0]]}


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="down")(jax.nn.relu(nn.Dense(5, name="up")(x)))


def numpy_forward(params, x, delta):
    """The Mlp in float64 NumPy with ``delta`` added to ``up``'s output."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.maximum(np.asarray(x, np.float64) @ p["up"]["kernel"] + p["up"]["bias"] + np.asarray(delta), 0.0)
    return h @ p["down"]["kernel"] + p["down"]["bias"]


def test_the_base_gives_every_optional_hook_its_documented_default():
    m = OutputShift(adapter="fr")
    site = jp.Site("up", "Dense", "...i,io->...o", (4, 5))
    assert isinstance(m, SiteMethod) and check_method(m) is m
    assert m.param_names == ("delta@fr",) and m.config() == {"method": "output_shift", "targets": "up$", "adapter": "fr"}
    assert (m.scope, m.site_kinds, m.extends_sequence, m.shared_names) == ("site", {"linear"}, False, ())
    assert (m.shared_key, m.updates_base, m.dropout, m.param_axes) == ("output_shift@fr", False, 0.0, None)
    assert (m.merges, m.unmerges, m.identity_at_init, m.foldable) == (True, True, True, False)
    assert m.site_patterns() == () and m.init_shared(jax.random.key(0), [site]) == {}
    assert m.param_axes_at(site) is None and m.folded() is m
    with pytest.raises(TypeError, match="OutputShift is not foldable"):
        m.fold_site({}, site)
    with pytest.raises(TypeError, match="OutputShift is not foldable"):
        m.fold_model({})
    with pytest.raises(TypeError, match=r"'up'.*\(conv site\).*supports linear sites"):
        m.check_site(conv_site("up", "Conv", (3, 2, 4), strides=(1,), padding="SAME", input_dilation=(1,),
                               kernel_dilation=(1,)))


def test_a_custom_method_deriving_the_base_binds_and_runs_in_linen_and_nnx():
    x = jax.random.normal(jax.random.key(0), (2, 4))
    peft_model, params = jp.apply(OutputShift(), Mlp(), jax.random.key(1), x)
    delta = params["up"]["delta"]
    assert delta.shape == (5,) and float(jnp.abs(delta).max()) > 0
    np.testing.assert_allclose(peft_model.apply(params, x), numpy_forward(params, x, delta), atol=1e-5)
    merged = jp.merge(peft_model, params)  # merge_site moves delta into the bias
    np.testing.assert_allclose(merged["up"]["bias"], params["up"]["bias"] + delta, atol=1e-6)

    base = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)))
    model = jp.apply(OutputShift(targets="layers/0$"), base, jax.random.key(1))
    layer = model.layers[0]
    want = x @ layer.kernel.get_value() + layer.bias.get_value() + layer.delta.get_value()
    np.testing.assert_allclose(model(x), want, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class NotDerived:
    """Every member of ``SiteMethod``, written out, without the ``PeftMethod`` base."""

    targets: Any = "up$"
    adapter: str = "default"
    name: ClassVar[str] = "not_derived"
    scope: ClassVar[str] = "site"
    site_kinds: ClassVar[frozenset] = frozenset({"linear"})
    extends_sequence: ClassVar[bool] = False
    shared_names: ClassVar[tuple] = ()
    shared_key: ClassVar[str] = "not_derived@default"
    updates_base: ClassVar[bool] = False
    dropout: ClassVar[float] = 0.0
    param_axes: ClassVar[None] = None
    merges: ClassVar[bool] = False
    unmerges: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    foldable: ClassVar[bool] = False
    param_names: ClassVar[tuple] = ("shift",)
    trainable: ClassVar[str] = r"shift$"

    def config(self):
        return {"method": self.name}

    def check_site(self, site):
        pass

    def site_patterns(self):
        return ()

    def init_site(self, key, site, base=None):
        return {"shift": jnp.full(site.out_shape, 0.5)}

    def init_shared(self, key, sites):
        return {}

    def apply_site(self, params, site, x, base_fn, *, rng=None, base=None, shared=None):
        return base_fn(x) + params["shift"]

    def merge_site(self, params, base, site=None):
        raise TypeError("not_derived does not merge")

    unmerge_site = merge_site

    def param_axes_at(self, site):
        return None

    def folded(self):
        return self

    def fold_site(self, params, site, shared=None):
        raise TypeError("not foldable")


def test_a_complete_protocol_object_without_the_base_is_a_method():
    method = NotDerived()
    assert isinstance(method, SiteMethod) and not isinstance(method, PeftMethod)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    peft_model, params = jp.apply(method, Mlp(), jax.random.key(1), x)
    np.testing.assert_allclose(peft_model.apply(params, x), numpy_forward(params, x, 0.5), atol=1e-5)


class CountingMlp(Mlp):
    calls: ClassVar[list] = []

    def __call__(self, x):
        CountingMlp.calls.append(1)
        return super().__call__(x)


@dataclasses.dataclass(frozen=True)
class NoApply(PeftMethod):
    targets: Any = "up$"
    adapter: str = "default"
    leaves: ClassVar[tuple[str, ...]] = ("w",)

    def init_site(self, key, site, base=None):
        return {"w": jnp.zeros(site.out_shape)}


@dataclasses.dataclass(frozen=True)
class DuckScale:
    """What a method needed before the protocol (targets, param_names, init_site, apply_site) and no more."""

    targets: Any = "up$"
    param_names: ClassVar[tuple] = ("s",)

    def init_site(self, key, site, base=None):
        return {"s": jnp.ones(site.out_shape)}

    def apply_site(self, params, site, x, base_fn, **kw):
        return base_fn(x) * params["s"]


@pytest.mark.parametrize("bad, message", [
    ("lora", r"str is not a PEFT method: it does not derive jaxpeft.methods.PeftMethod .*as a SiteMethod it lacks "
             r"adapter, apply_site, check_site"),
    (DuckScale(), r"DuckScale is not a PEFT method.*as a SiteMethod it lacks adapter, check_site, config, dropout, "
                  r"extends_sequence, fold_site, .*merge_site.*unmerge_site, unmerges, updates_base$"),
    (NoApply(), r"NoApply is a site method \(PeftMethod, scope='site'\) that does not define apply_site, merge_site, "
                r"unmerge_site$"),
])
def test_a_non_method_fails_early_naming_its_type_and_what_it_lacks(bad, message):
    CountingMlp.calls.clear()
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match=message):
        jp.apply(bad, CountingMlp(), jax.random.key(0), x)
    with pytest.raises(TypeError, match=message):
        jp.apply(jp.chain(jp.lora(2, targets="down$"), bad), CountingMlp(), jax.random.key(0), x)
    assert CountingMlp.calls == []  # refused before the model ran
    with pytest.raises(TypeError, match=message):  # chain refuses it when it is built, nested or not
        jp.chain(jp.lora(2, targets="up$"), jp.chain(bad))
    with pytest.raises(TypeError, match=message):
        base = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)))
        jp.apply(bad, base, jax.random.key(0))


def test_a_model_method_is_checked_against_the_model_protocol():
    @dataclasses.dataclass(frozen=True)
    class HalfPrompt(PeftMethod):
        adapter: str = "default"
        scope: ClassVar[str] = "model"

    assert isinstance(jp.prompt_tuning(2), ModelMethod) and check_method(jp.p_tuning(2)).scope == "model"
    with pytest.raises(TypeError, match=r"HalfPrompt is a model method .* does not define group, init_model, apply_model"):
        check_method(HalfPrompt())

    class Odd(HalfPrompt):
        scope: ClassVar[str] = "layer"

    with pytest.raises(TypeError, match=r"Odd.scope is 'layer'; it must be 'site' or 'model'"):
        check_method(Odd())
    with pytest.raises(TypeError, match=r"NotDerived.scope is 'layer'"):
        check_method(type("NotDerived", (NotDerived,), {"scope": "layer"})())
    with pytest.raises(TypeError, match=r"NotDerived is not a PEFT method.*as a ModelMethod it lacks apply_model, "
                                        r"fold_model, group, init_model$"):
        check_method(type("NotDerived", (NotDerived,), {"scope": "model"})())


def test_site_patterns_are_declared_by_the_methods_that_have_them():
    assert jp.lora(rank_pattern={"q$": 4}, alpha_pattern={"v$": 2.0}).site_patterns() == (
        ("rank_pattern", "q$"), ("alpha_pattern", "v$"))
    assert jp.ia3().site_patterns() == ()  # the default feedforward may miss (no MLP targeted)
    assert jp.ia3(feedforward=["fc2$", "w_out$"]).site_patterns() == (("feedforward", "fc2$"), ("feedforward", "w_out$"))
    x = jnp.ones((2, 4))
    with pytest.raises(jp.SelectorError, match=r"rank_pattern key 'nowhere\$' matches none of its 1 target sites"):
        jp.apply(jp.lora(2, targets="up$", rank_pattern={"nowhere$": 4}), Mlp(), jax.random.key(0), x)
    with pytest.raises(jp.SelectorError, match=r"feedforward key 'nowhere\$' matches none"):
        jp.apply(jp.ia3(targets="up$", feedforward="nowhere$"), Mlp(), jax.random.key(0), x)


def test_lora_declares_its_sharding_axes():
    from jaxpeft.sharding import LORA_PARAM_AXES

    assert jp.lora(adapter="fr").param_axes == {"lora_a@fr": ("in", "rank"), "lora_b@fr": ("rank", "out")}
    assert tuple(jp.lora().param_axes.values()) == LORA_PARAM_AXES


# The optional hooks (and the per-method options that used to be probed): no code outside the
# protocol module reads them with getattr / hasattr. ``name`` and ``config`` are left out: the
# same words name attributes of model configs and registered classes, which are not methods.
HOOKS = ({n for n in vars(PeftMethod) if not n.startswith("_")} - {"name", "config"}) | {
    "init_site", "apply_site", "merge_site", "unmerge_site", "init_model", "apply_model", "group", "adapter",
    "targets", "rank_pattern", "alpha_pattern", "feedforward", "rank_at", "scale_at", "length",
}


def test_no_hook_is_probed_outside_the_protocol_module():
    probes = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "methods" / "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in HOOKS):
                probes.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert {"dropout", "extends_sequence", "shared_names", "updates_base", "scope", "param_axes_at"} <= HOOKS
    assert not probes, "method hooks probed outside jaxpeft/methods/protocol.py:\n" + "\n".join(probes)
