"""Prompt tuning and P-tuning against a float64 NumPy LM with the virtual tokens concatenated, Linen and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _soft_reference as ref
import jaxpeft as jp
from jaxpeft.bind.fold import fold
from jaxpeft.demo import data
from jaxpeft.methods.prompt import PromptTuning, p_tuning, prompt_tuning
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params

CONFIG = LMConfig.tiny()
N = 4
X = jax.random.randint(jax.random.key(0), (2, 10), 0, CONFIG.vocab_size)
MASK = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)  # row 1: 3 padding tokens at the end
# float32 model against the float64 reference, logits O(3) through 2 blocks: a few ulps each op.
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def base():
    model = LinenLM(CONFIG)
    return model, model.init(jax.random.key(1), X)["params"]


def _bind(peft, base, key=2):
    model, params = base
    return jp.apply(peft, model, jax.random.key(key), X, params=params)


def _expected(params, base_params, prompt, attention_mask=None, positions=None):
    """The NumPy LM on [prompt; embed(X)], its virtual positions dropped (prompt tuning by hand)."""
    embeds = np.asarray(base_params["embed"]["embedding"])[np.asarray(X)]
    prompt = np.broadcast_to(np.asarray(prompt), (X.shape[0], *np.shape(prompt)))
    mask = None if attention_mask is None else np.concatenate([np.ones((X.shape[0], N)), attention_mask], 1)
    if positions is not None:
        positions = np.concatenate([np.broadcast_to(np.arange(N), (X.shape[0], N)), np.asarray(positions) + N], 1)
    embeds = np.concatenate([prompt, embeds], 1)
    logits = ref.lm(base_params, CONFIG, embeds=embeds, attention_mask=mask, positions=positions)
    return logits[:, N:]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_prompt_tuning_equals_numpy_reference(base, use_jit, with_mask):
    peft_model, params = _bind(prompt_tuning(N), base)
    assert params["prompt"]["embeddings"].shape == (N, CONFIG.d_model)
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    mask = MASK if with_mask else None
    out = run(params, X, attention_mask=mask)
    assert out.shape == (*X.shape, CONFIG.vocab_size)  # lined up with the caller's tokens
    np.testing.assert_allclose(out, _expected(params, base[1], params["prompt"]["embeddings"], mask), **TOL)


def test_explicit_positions_shift_by_n(base):
    # Left padding: real tokens count from their first one; the virtual tokens take 0..n-1 before them.
    mask = jnp.ones((2, 10), jnp.int32).at[1, :3].set(0)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    peft_model, params = _bind(prompt_tuning(N), base)
    out = peft_model.apply(params, X, attention_mask=mask, positions=positions)
    np.testing.assert_allclose(out, _expected(params, base[1], params["prompt"]["embeddings"], mask, positions), **TOL)


def test_inputs_embeds_are_prompted_too(base):
    model, base_params = base
    peft_model, params = _bind(prompt_tuning(N), base)
    embeds = model.apply({"params": base_params}, X, method=LinenLM.embed_tokens)
    np.testing.assert_allclose(
        peft_model.apply(params, inputs_embeds=embeds), peft_model.apply(params, X), rtol=1e-6, atol=1e-6
    )


def _numpy_mlp(p, x, layers):
    for i in range(layers):
        x = x @ p[f"mlp_{i}_kernel"] + p[f"mlp_{i}_bias"]
        x = np.maximum(x, 0) if i < layers - 1 else x
    return x


def _numpy_lstm(x, w_ih, w_hh, b, reverse):
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h = c = np.zeros(w_hh.shape[0])
    out = [None] * len(x)
    for t in (reversed(range(len(x))) if reverse else range(len(x))):
        i, f, g, o = np.split(x[t] @ w_ih + h @ w_hh + b, 4)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out[t] = h
    return np.stack(out)


def _numpy_encoder(p, encoder, lstm_layers=2):
    p = ref.f64(p)
    x = p["embeddings"]
    if encoder == "mlp":
        return _numpy_mlp(p, x, 3)
    for layer in range(lstm_layers):
        x = np.concatenate([
            _numpy_lstm(x, *(p[f"lstm_{layer}_{d}_{n}"] for n in ("w_ih", "w_hh", "bias")), reverse=d == "bwd")
            for d in ("fwd", "bwd")
        ], axis=-1)
    return _numpy_mlp(p, x, 2)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_equals_numpy_encoder_and_lm(base, encoder):
    peft = p_tuning(N, encoder=encoder, hidden_size=8)
    peft_model, params = _bind(peft, base)
    group = params["prompt_encoder"]
    prompt = _numpy_encoder(group, encoder)
    assert prompt.shape == (N, CONFIG.d_model)
    np.testing.assert_allclose(peft.prompt(group), prompt, rtol=1e-5, atol=1e-6)
    out = jax.jit(peft_model.apply)(params, X, attention_mask=MASK)
    np.testing.assert_allclose(out, _expected(params, base[1], prompt, MASK), **TOL)


@pytest.mark.parametrize(
    "peft", [prompt_tuning(N), p_tuning(N, encoder="lstm", hidden_size=8)], ids=["prompt", "p_tuning"]
)
def test_linen_and_nnx_agree_and_fold_keeps_outputs(base, peft):
    model, base_params = base
    linen_model, params = _bind(peft, base)
    nnx_model = jp.apply(peft, nnx_from_linen_params(CONFIG, base_params), jax.random.key(9))
    assert isinstance(nnx_model, type(nnx_from_linen_params(CONFIG, base_params)))  # still the user's class
    trainable, _ = jp.partition(params, linen_model.trainable)
    graphdef, nnx_trainable, rest = nnx.split(nnx_model, jp.PeftParam, ...)
    assert sorted(jp.paths(nnx_trainable)) == sorted(p for p, x in jp.leaves_with_paths(trainable) if x is not None)
    nnx.update(nnx_model, jp.prune(trainable))  # the same leaf paths in both bindings
    y = linen_model.apply(params, X, attention_mask=MASK)
    run = nnx.jit(lambda m, x, a: m(x, attention_mask=a))
    np.testing.assert_allclose(run(nnx_model, X, MASK), y, rtol=1e-5, atol=1e-5)

    folded_model, folded = fold(linen_model, params)
    assert isinstance(folded_model.peft, PromptTuning) and set(folded) - set(base_params) == {"prompt"}
    np.testing.assert_allclose(folded_model.apply(folded, X, attention_mask=MASK), y, rtol=1e-5, atol=1e-5)
    folded_nnx = fold(nnx_model)
    assert isinstance(folded_nnx.peft_model_methods[0], PromptTuning)
    assert sorted(jp.paths(nnx.state(folded_nnx, jp.PeftParam))) == ["prompt/embeddings"]
    np.testing.assert_allclose(folded_nnx(X, attention_mask=MASK), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx_model(X, attention_mask=MASK), y, rtol=1e-5, atol=1e-5)  # input untouched


def test_initialisations(base):
    _, base_params = base
    table = np.asarray(base_params["embed"]["embedding"])
    _, params = _bind(prompt_tuning(N), base)
    e = np.asarray(params["prompt"]["embeddings"])
    assert e.min() >= -0.5 and e.max() <= 0.5 and e.std() > 0.2  # U(-0.5, 0.5)
    _, params = _bind(prompt_tuning(N, init="vocab", vocab_size=CONFIG.vocab_size), base)
    rows = np.asarray(params["prompt"]["embeddings"])
    assert all(np.any(np.all(table == row, axis=1)) for row in rows)  # each one a vocabulary row
    ids = [5, 9, 11]
    _, params = _bind(prompt_tuning(N, init="text", init_token_ids=ids), base)
    np.testing.assert_array_equal(params["prompt"]["embeddings"], table[[5, 9, 11, 5]])  # repeated, truncated to n
    _, params = _bind(prompt_tuning(2, init="text", init_token_ids=ids), base)
    np.testing.assert_array_equal(params["prompt"]["embeddings"], table[[5, 9]])


def test_masks_padding_invisible_virtual_tokens_visible_to_all(base):
    peft_model, params = _bind(prompt_tuning(N), base)
    y = peft_model.apply(params, X, attention_mask=MASK)
    # Changing a padded-out token changes nothing at the real positions.
    changed = X.at[1, 8].set((X[1, 8] + 1) % CONFIG.vocab_size)
    out = peft_model.apply(params, changed, attention_mask=MASK)
    np.testing.assert_allclose(out[1, :7], y[1, :7], rtol=1e-6, atol=1e-6)
    # Changing the prompt changes every real position, the first one included.
    moved = jax.tree.map(lambda x: x, params)
    moved["prompt"] = {"embeddings": params["prompt"]["embeddings"] + 0.5}
    diff = np.abs(peft_model.apply(moved, X, attention_mask=MASK) - y).max(-1)
    assert (diff[0] > 1e-3).all() and (diff[1, :7] > 1e-3).all()


def test_adapter_selection_and_deletion(base):
    model, base_params = base
    peft_model, params = _bind(prompt_tuning(N, adapter="fr"), base)
    assert peft_model.adapter_names == ("fr",) and "prompt@fr" in params
    plain = model.apply({"params": base_params}, X)
    np.testing.assert_array_equal(peft_model.apply(params, X, adapters=False), plain)

    nnx_model = jp.apply(prompt_tuning(N, adapter="fr"), nnx_from_linen_params(CONFIG, base_params), jax.random.key(2))
    assert jp.adapter_names(nnx_model) == ("fr",)
    with jp.adapters_disabled(nnx_model):
        np.testing.assert_allclose(nnx_model(X), plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(nnx_model(X), plain, atol=1e-3)
    both = jp.add_adapter(nnx_model, jp.lora(2, targets="query$", adapter="de"), jax.random.key(3))
    bare = jp.delete_adapter(both, "fr")
    assert type(bare).__name__ == "NnxLM" and jp.adapter_names(bare) == ("de",)  # the model's own class again
    np.testing.assert_allclose(bare(X), plain, rtol=1e-5, atol=1e-5)  # LoRA's B = 0
    with pytest.raises(TypeError, match="mixed-adapter batches take site methods only"):
        peft_model.apply(params, X, adapters=["fr"], adapter_ids=jnp.zeros(2, jnp.int32))


class NoProtocol(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(4)(nn.Embed(10, 4)(tokens))


class NnxNoProtocol(nnx.Module):
    def __init__(self):
        self.embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))

    def __call__(self, tokens, *, attention_mask=None):
        return self.embed(tokens)


def test_bad_input_raises_before_work(base):
    bad_configs = (
        lambda: prompt_tuning(0), lambda: prompt_tuning(-2), lambda: p_tuning(0), lambda: p_tuning(4, encoder="gru")
    )
    for bad in bad_configs:
        with pytest.raises(ValueError, match="must be|must be one of"):
            bad()
    with pytest.raises(ValueError, match="needs vocab_size"):
        prompt_tuning(4, init="vocab")
    with pytest.raises(ValueError, match="needs init_token_ids"):
        prompt_tuning(4, init="text")

    class InitFails(NoProtocol):
        def init(self, *args, **kwargs):
            raise AssertionError("the protocol check must come before any initialisation")

    with pytest.raises(TypeError, match=r"lacks an embed_tokens\(tokens\) method, a inputs_embeds= keyword"):
        jp.apply(prompt_tuning(4), InitFails(), jax.random.key(0), X)
    with pytest.raises(TypeError, match="NnxNoProtocol lacks an embed_tokens.*positions= keyword"):
        jp.apply(prompt_tuning(4), NnxNoProtocol(), jax.random.key(0))
    with pytest.raises(ValueError, match="cannot be added to a bound Linen model"):
        peft_model, params = _bind(jp.lora(2, targets="query$"), base)
        jp.add_adapter(peft_model, prompt_tuning(4, adapter="x"), jax.random.key(0), params=params)


CHAR_CONFIG = LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size)


def _train(loss_fn, trainable, frozen, lr, seed):
    opt = optax.adam(lr)
    evals = data.eval_set("recipes", 2, 8, 32)
    evaluate = jax.jit(loss_fn)
    before = np.mean([evaluate(trainable, frozen, b, None) for b in evals])
    step = jp.make_train_step(loss_fn, opt)
    result = jp.fit(step, trainable, frozen, opt.init(trainable), data.batches("recipes", 8, 32, seed=seed),
                    num_steps=30, rng=None, progress=False)
    return before, np.mean([evaluate(result.trainable, frozen, b, None) for b in evals])


@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_prompt_tuning_trains_the_demo_task_linen():
    model = LinenLM(CHAR_CONFIG)
    example = np.zeros((1, 32), np.int32)
    peft_model, params = jp.apply(prompt_tuning(8), model, jax.random.key(1), example)
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(t, f, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), batch["inputs"]), batch["targets"])[0]

    before, after = _train(loss_fn, trainable, frozen, 3e-2, seed=0)
    assert after < before - 0.2, (before, after)


@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_p_tuning_trains_the_demo_task_nnx():
    base = LinenLM(CHAR_CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    model = nnx_from_linen_params(CHAR_CONFIG, base)
    peft_model = jp.apply(p_tuning(8, encoder="lstm", hidden_size=16), model, jax.random.key(1))
    graphdef, trainable, frozen = nnx.split(peft_model, jp.PeftParam, ...)

    def loss_fn(t, f, batch, rng):
        return jp.cross_entropy(nnx.merge(graphdef, t, f)(batch["inputs"]), batch["targets"])[0]

    before, after = _train(loss_fn, trainable, frozen, 1e-2, seed=1)
    assert after < before - 0.2, (before, after)
