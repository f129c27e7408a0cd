"""Any einsum layout: every site method against a float64 NumPy einsum reference.

The layouts are those of flax's NNX Gemma example (kernel axes interleaved or outputs first) plus a
per-expert (MoE) kernel whose expert axis is in the input, the kernel and the output (a shared
axis: one adapter per slice). The references build the dense update with ``np.einsum`` from the
definition (``A`` keeps the kernel's input axes, ``B`` its output axes, shared axes lead both) and
run the layer as ``np.einsum(equation, x, W')``. Tolerances: float32 math against float64, values O(1),
contractions of <= 16 terms: 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.methods.protocol import PeftMethod, SiteMethod, init_per_layer

# (equation, x shape, kernel shape)
LAYOUTS = [
    ("BTD,NDH->BTNH", (2, 3, 8), (2, 8, 4)),  # Gemma q_einsum: outputs around the input axis
    ("BTD,CKDH->CBTKH", (2, 3, 8), (2, 2, 8, 4)),  # Gemma kv_einsum: outputs first
    ("BTNH,NHD->BTD", (2, 3, 2, 4), (2, 4, 8)),  # Gemma attn_vec_einsum: inputs first, two of them
    ("BTD,SNDH->SBTNH", (2, 3, 8), (3, 2, 8, 4)),  # Gemma fused qkv_einsum
    ("EBD,EDF->EBF", (3, 4, 8), (3, 8, 6)),  # MoE: per-expert weights, E shared
    ("...i,io->...o", (2, 3, 8), (8, 6)),  # Dense
]
IDS = [eq for eq, _, _ in LAYOUTS]
TOL = dict(rtol=1e-4, atol=1e-4)


def _f64(x):
    return np.asarray(x, np.float64)


def _labels(site):
    return site.shared_labels, site.in_labels, site.out_labels, site.parts[1]


def numpy_delta(site, a, b):
    """``A B`` in the kernel's layout, from the definition."""
    s, i, o, rhs = _labels(site)
    return np.einsum(f"{s}{i}r,{s}r{o}->{rhs}", _f64(a), _f64(b))


def _arrays(site, rank=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    kernel = jax.random.normal(keys[0], site.kernel_shape)
    a = jax.random.normal(keys[1], site.a_shape(rank)) / np.sqrt(site.in_features)
    b = jax.random.normal(keys[2], site.b_shape(rank)) / np.sqrt(rank)
    return kernel, a, b, keys[3]


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("equation, x_shape, kernel_shape", LAYOUTS, ids=IDS)
def test_site_axes_follow_the_equation(equation, x_shape, kernel_shape):
    site = jp.Site("attn/q", "Einsum", equation, kernel_shape)
    lhs, rhs, out = site.parts
    for c in site.shared_labels:
        assert c in lhs and c in out
    for c in site.in_labels:
        assert c in lhs and c not in out
    for c in site.out_labels:
        assert c in out and c not in lhs
    assert sorted(site.shared_labels + site.in_labels + site.out_labels) == sorted(rhs)
    kernel = np.arange(np.prod(kernel_shape), dtype=np.float32).reshape(kernel_shape)
    matrix = site.to_matrix(jnp.asarray(kernel))
    assert matrix.shape == (*site.shared_shape, site.in_features, site.out_features)
    np.testing.assert_array_equal(site.from_matrix(matrix), kernel)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("equation, x_shape, kernel_shape", LAYOUTS, ids=IDS)
def test_lora_any_layout_matches_numpy(equation, x_shape, kernel_shape, jit):
    site = jp.Site("attn/q", "Einsum", equation, kernel_shape)
    method = jp.lora(3, 6.0, targets="q")
    kernel, a, b, key = _arrays(site)
    x = jax.random.normal(key, x_shape)
    params = dict(zip(method.param_names, (a, b)))
    base_fn = lambda x: jnp.einsum(equation, x, kernel)  # noqa: E731
    y = _maybe_jit(lambda p, x: method.apply_site(p, site, x, base_fn), jit)(params, x)
    w_merged = _f64(kernel) + method.scale * numpy_delta(site, a, b)
    expected = np.einsum(equation, _f64(x), w_merged)
    np.testing.assert_allclose(y, expected, **TOL)
    # merge returns a kernel in the kernel's own layout; unmerge takes the update back out
    merged = _maybe_jit(lambda p, base: method.merge_site(p, base, site), jit)(params, {"kernel": kernel})["kernel"]
    assert merged.shape == kernel.shape
    np.testing.assert_allclose(merged, w_merged, **TOL)
    np.testing.assert_allclose(site.apply_kernel(x, merged), expected, **TOL)
    restored = method.unmerge_site(params, {"kernel": merged}, site)["kernel"]
    np.testing.assert_allclose(restored, kernel, **TOL)


@pytest.mark.parametrize("equation, x_shape, kernel_shape", LAYOUTS, ids=IDS)
def test_lora_init_shapes_and_identity(equation, x_shape, kernel_shape):
    site = jp.Site("attn/q", "Einsum", equation, kernel_shape)
    method = jp.lora(2, targets="q")
    leaves = method.init_site(jax.random.key(1), site)
    a, b = (leaves[n] for n in method.param_names)
    # A keeps the kernel's input axes (shared axes first), B its output axes
    assert a.shape == (*site.shared_shape, *site.in_shape, 2)
    assert b.shape == (*site.shared_shape, 2, *site.out_shape)
    bound = 1 / np.sqrt(site.in_features)
    assert float(jnp.max(jnp.abs(a))) <= bound and float(jnp.max(jnp.abs(b))) == 0.0


@pytest.mark.parametrize("equation, x_shape, kernel_shape", LAYOUTS, ids=IDS)
def test_dora_any_layout_matches_numpy(equation, x_shape, kernel_shape):
    site = jp.Site("attn/q", "Einsum", equation, kernel_shape)
    method = jp.dora(3, 6.0, targets="q")
    kernel, a, b, key = _arrays(site)
    x = jax.random.normal(key, x_shape)
    s, i, o, rhs = _labels(site)
    magnitude = 1.0 + jax.random.uniform(jax.random.key(7), (*site.shared_shape, *site.out_shape))
    params = dict(zip(method.param_names, (a, b, magnitude)))
    base_fn = lambda x: jnp.einsum(equation, x, kernel)  # noqa: E731
    y = method.apply_site(params, site, x, base_fn, base={"kernel": kernel})
    # DoRA eq. 5: W' = m (W + sAB) / ||W + sAB||_c, the norm over the input axes of each column of each slice
    direction = _f64(kernel) + method.scale * numpy_delta(site, a, b)
    norm = np.sqrt(np.einsum(f"{rhs},{rhs}->{s}{o}", direction, direction))
    w_merged = np.einsum(f"{rhs},{s}{o}->{rhs}", direction, _f64(magnitude) / norm)
    np.testing.assert_allclose(y, np.einsum(equation, _f64(x), w_merged), **TOL)
    merged = method.merge_site(params, {"kernel": kernel}, site)["kernel"]
    np.testing.assert_allclose(merged, w_merged, **TOL)
    # at init (B = 0, m = ||W||_c) the layer is the base
    leaves = method.init_site(jax.random.key(2), site, {"kernel": kernel})
    y0 = method.apply_site(leaves, site, x, base_fn, base={"kernel": kernel})
    np.testing.assert_allclose(y0, base_fn(x), **TOL)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("equation, x_shape, kernel_shape", LAYOUTS, ids=IDS)
def test_ia3_any_layout_matches_numpy(equation, x_shape, kernel_shape, feedforward):
    site = jp.Site("mlp/down", "Einsum", equation, kernel_shape)
    method = jp.ia3(targets="down", feedforward="down" if feedforward else None)
    (name,) = method.param_names
    ones = method.init_site(jax.random.key(0), site)[name]
    scale = 0.5 + jax.random.uniform(jax.random.key(3), ones.shape)
    kernel = jax.random.normal(jax.random.key(4), kernel_shape)
    x = jax.random.normal(jax.random.key(5), x_shape)
    base_fn = lambda x: jnp.einsum(equation, x, kernel)  # noqa: E731
    y = method.apply_site({name: scale}, site, x, base_fn)
    s, i, o, rhs = _labels(site)
    if feedforward:  # a vector over the input axes (and shared ones), in kernel rank: W rows times l
        w_scaled = _f64(kernel) * _f64(scale)
    else:  # a vector over the shared and output axes: W columns times l
        w_scaled = np.einsum(f"{rhs},{s}{o}->{rhs}", _f64(kernel), _f64(scale))
    expected = np.einsum(equation, _f64(x), w_scaled)
    np.testing.assert_allclose(y, expected, **TOL)
    merged = method.merge_site({name: scale}, {"kernel": kernel}, site)["kernel"]
    np.testing.assert_allclose(merged, w_scaled, **TOL)
    restored = method.unmerge_site({name: scale}, {"kernel": merged}, site)["kernel"]
    np.testing.assert_allclose(restored, kernel, **TOL)


@pytest.mark.parametrize("equation, x_shape, kernel_shape", [LAYOUTS[4], LAYOUTS[5]], ids=["moe", "dense"])
def test_lokr_shared_axis_matches_numpy(equation, x_shape, kernel_shape):
    site = jp.Site("mlp/up", "Einsum", equation, kernel_shape)
    method = jp.lokr(factor=2, targets="up")
    (a, c), (bb, d) = method.shapes(site)
    lead = site.shared_shape
    w1 = jax.random.normal(jax.random.key(0), (*lead, a, c))
    w2 = jax.random.normal(jax.random.key(1), (*lead, bb, d))
    params = dict(zip(method.param_names, (w1, w2)))
    kernel = jax.random.normal(jax.random.key(2), kernel_shape)
    x = jax.random.normal(jax.random.key(3), x_shape)
    y = method.apply_site(params, site, x, lambda x: jnp.einsum(equation, x, kernel))
    # one Kronecker product per shared slice, in the kernel's layout
    flat_w1, flat_w2 = _f64(w1).reshape(-1, a, c), _f64(w2).reshape(-1, bb, d)
    kron = np.stack([np.kron(p, q) for p, q in zip(flat_w1, flat_w2)]).reshape(*lead, a * bb, c * d)
    s, i, o, rhs = _labels(site)
    delta = np.einsum(f"{s}{i}{o}->{rhs}", kron)
    expected = np.einsum(equation, _f64(x), _f64(kernel) + method.scale * delta)
    np.testing.assert_allclose(y, expected, **TOL)
    merged = method.merge_site(params, {"kernel": kernel}, site)["kernel"]
    np.testing.assert_allclose(method.unmerge_site(params, {"kernel": merged}, site)["kernel"], kernel, **TOL)


@pytest.mark.parametrize("equation, x_shape, kernel_shape", LAYOUTS, ids=IDS)
def test_pissa_any_layout_keeps_the_base(equation, x_shape, kernel_shape):
    site = jp.Site("attn/q", "Einsum", equation, kernel_shape)
    method = jp.lora(2, 4.0, targets="q", init="pissa")
    kernel = jax.random.normal(jax.random.key(0), kernel_shape)
    leaves = method.init_site(jax.random.key(1), site, {"kernel": kernel})
    a, b = (leaves[n] for n in method.param_names)
    assert a.shape == site.a_shape(2) and b.shape == site.b_shape(2)
    # residual + s A B is the original kernel, and s A B is the best rank-2 part of each slice
    np.testing.assert_allclose(_f64(leaves["kernel"]) + method.scale * numpy_delta(site, a, b), kernel, **TOL)
    s, i, o, rhs = _labels(site)
    matrix = np.einsum(f"{rhs}->{s}{i}{o}", _f64(kernel)).reshape(-1, site.in_features, site.out_features)
    top = np.linalg.svd(matrix, compute_uv=False)[:, :2]
    got = np.einsum(f"{rhs}->{s}{i}{o}", method.scale * numpy_delta(site, a, b))
    got = np.linalg.svd(got.reshape(matrix.shape), compute_uv=False)[:, :2]
    np.testing.assert_allclose(got, top, **TOL)


def test_stacked_site_leads_every_leaf_with_the_layer_axis():
    site = jp.Site("layers/attn/q", "Einsum", "BTD,NDH->BTNH", (2, 8, 4))
    stacked = site.stacked((5,))
    assert stacked.kernel_shape == (5, 2, 8, 4) and stacked.num_stacked == 1
    assert stacked.shared_shape == (5,) and stacked.in_shape == site.in_shape
    assert stacked.unstacked() == site
    lora = jp.lora(2, targets="q").init_site(jax.random.key(0), stacked)
    assert lora["lora_a"].shape == (5, 8, 2) and lora["lora_b"].shape == (5, 2, 2, 4)
    # methods written for one layer initialise each layer of a stack with its own key
    dense = jp.Site("layers/mlp/down", "Dense", "...i,io->...o", (8, 6)).stacked((3,))
    houlsby = jp.houlsby(bottleneck=2, targets="down")
    leaves = houlsby.init_site(jax.random.key(0), dense)
    down = leaves["bottleneck_down"]
    assert down.shape == (3, 6, 2)
    assert not np.allclose(down[0], down[1])
    keys = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(down[2], houlsby.init_site(keys[2], dense.unstacked())["bottleneck_down"])


def test_per_head_shared_axes_are_refused_by_name_where_unsupported():
    site = jp.Site("moe/up", "Einsum", "EBD,EDF->EBF", (3, 8, 6))
    for method in (jp.houlsby(bottleneck=2, targets="up"), jp.prefix_tuning(2, targets="up")):
        with pytest.raises(ValueError, match=r"moe/up.*'E'.*shared by the input and the output"):
            method.check_site(site)


def test_every_method_follows_the_protocol():
    methods = [jp.lora(), jp.dora(), jp.ia3(), jp.lokr(), jp.houlsby(), jp.pfeiffer(), jp.compacter(),
               jp.compacter_pp(), jp.prefix_tuning()]
    for m in methods:
        assert isinstance(m, PeftMethod) and isinstance(m, SiteMethod), type(m).__name__
        assert m.scope == "site"
    for m in (jp.prompt_tuning(), jp.p_tuning()):
        assert isinstance(m, jp.methods.protocol.ModelMethod) and m.scope == "model"
    # the derived names: the default adapter keeps the stems, others are suffixed
    assert jp.lora(adapter="fr").param_names == ("lora_a@fr", "lora_b@fr")
    assert jp.lokr(rank=2).param_names == ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
    # hooks have their defaults where a method does not set them
    assert jp.lora().shared_names == () and jp.lora().extends_sequence is False and jp.ia3().dropout == 0.0
    assert jp.prefix_tuning().extends_sequence is True and jp.compacter().shared_names == ("phm_rule",)
    assert jp.lora(init="pissa").updates_base and not jp.lora().updates_base
    assert jp.dora().merges and not jp.dora().unmerges and not jp.houlsby().merges


def test_init_per_layer_is_plain_init_at_a_plain_site():
    calls = []

    class Probe:
        @init_per_layer
        def init_site(self, key, site, base=None):
            calls.append(site.num_stacked)
            return {"w": jnp.zeros(site.out_shape)}

    site = jp.Site("d", "Dense", "...i,io->...o", (4, 3))
    assert Probe().init_site(jax.random.key(0), site)["w"].shape == (3,)
    assert Probe().init_site(jax.random.key(0), site.stacked((2, 5)))["w"].shape == (2, 5, 3)
    assert calls[0] == 0 and all(c == 0 for c in calls)


class _GemmaLinen(__import__("flax").linen.Module):
    """The four einsum layers of flax's Gemma attention, chained so each one's output feeds the next."""

    @__import__("flax").linen.compact
    def __call__(self, x):  # x: [B, T, D=8]
        nn = __import__("flax").linen
        q = nn.Einsum((2, 8, 4), "BTD,NDH->BTNH", name="q_einsum")(x)  # [B, T, N, H]
        kv = nn.Einsum((2, 2, 8, 4), "BTD,CKDH->CBTKH", name="kv_einsum")(x)  # [C, B, T, K, H]
        qkv = nn.Einsum((3, 2, 8, 4), "BTD,SNDH->SBTNH", name="qkv_einsum")(x)
        h = q + kv[0] + kv[1] + qkv.sum(0)
        return nn.Einsum((2, 4, 8), "BTNH,NHD->BTD", name="attn_vec_einsum")(h)


@pytest.mark.parametrize("binding", ["linen", "nnx"])
def test_gemma_einsum_layouts_bind_and_merge(binding):
    from flax import nnx

    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    method = jp.lora(2, 4.0, targets="einsum$")
    if binding == "linen":
        model = _GemmaLinen()
        base = model.init(jax.random.key(1), x)["params"]
        peft_model, params = jp.apply(method, model, jax.random.key(2), x, params=base)
        np.testing.assert_allclose(peft_model.apply(params, x), model.apply({"params": base}, x), **TOL)
        params = jax.tree.map(lambda p: p + 0.1, params)  # B != 0 everywhere
        y = peft_model.apply(params, x)
        merged = model.apply({"params": jp.merge(peft_model, params)}, x)
    else:
        class Gemma(nnx.Module):
            def __init__(self, rngs):
                self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (2, 8, 4), rngs=rngs)
                self.kv_einsum = nnx.Einsum("BTD,CKDH->CBTKH", (2, 2, 8, 4), rngs=rngs)
                self.qkv_einsum = nnx.Einsum("BTD,SNDH->SBTNH", (3, 2, 8, 4), rngs=rngs)
                self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (2, 4, 8), rngs=rngs)

            def __call__(self, x):
                kv = self.kv_einsum(x)
                return self.attn_vec_einsum(self.q_einsum(x) + kv[0] + kv[1] + self.qkv_einsum(x).sum(0))

        model = Gemma(nnx.Rngs(1))
        peft_model = jp.apply(method, model, jax.random.key(2))
        np.testing.assert_allclose(peft_model(x), model(x), **TOL)
        for _, layer in jp.peft_layers(peft_model):
            for name in method.param_names:
                getattr(layer, name).set_value(getattr(layer, name).get_value() + 0.1)
        y = peft_model(x)
        merged = jp.merge(peft_model)(x)
    assert float(jnp.max(jnp.abs(y - (model.apply({"params": base}, x) if binding == "linen" else model(x))))) > 1e-2
    np.testing.assert_allclose(merged, y, **TOL)
