"""Tests for jaxpeft.distill against a float64 NumPy reference of Hinton et al.'s loss.

Reference: ``T^2 * mean_positions sum_vocab p (log p - log q)`` with ``p = softmax(t / T)``,
``q = softmax(s / T)`` computed in float64 from a max-shifted logsumexp. The library computes in
float32; on logits of order 1-10 the float32 log-softmax is good to ~1e-6 relative, so values are
compared at rtol 1e-5 / atol 1e-6 (times T^2 for the scaled loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft as jp
from jaxpeft.distill import combined_loss, distillation_loss, make_distillation_loss
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.train import make_train_step

TEMPERATURES = [0.5, 1.0, 2.0, 5.0]


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_kl(student, teacher, temperature):
    """KL(p_teacher || q_student) per position, float64."""
    log_p = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    log_q = np_log_softmax(np.asarray(student, np.float64) / temperature)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def np_distillation(student, teacher, temperature, mask=None):
    kl = np_kl(student, teacher, temperature)
    if mask is None:
        return temperature**2 * kl.mean()
    mask = np.asarray(mask, np.float64)
    return temperature**2 * (kl * mask).sum() / mask.sum()


def np_cross_entropy(logits, targets, mask=None):
    nll = -np.take_along_axis(np_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]
    mask = np.ones(nll.shape) if mask is None else np.asarray(mask, np.float64)
    return (nll * mask).sum() / mask.sum()


def logits_pair(seed, shape=(3, 5, 11), scale=3.0):
    rng = np.random.default_rng(seed)
    student = (scale * rng.standard_normal(shape)).astype(np.float32)
    teacher = (scale * rng.standard_normal(shape)).astype(np.float32)
    return student, teacher


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_numpy_reference(temperature, jit):
    student, teacher = logits_pair(0)
    loss = maybe_jit(lambda s, t: distillation_loss(s, t, temperature=temperature), jit)(student, teacher)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    expected = np_distillation(student, teacher, temperature)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6 * temperature**2)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_includes_the_t_squared_factor(temperature):
    student, teacher = logits_pair(1)
    loss = float(distillation_loss(student, teacher, temperature=temperature))
    plain_kl = np_kl(student, teacher, temperature).mean()
    np.testing.assert_allclose(loss / plain_kl, temperature**2, rtol=1e-5)


def test_zero_for_identical_logits():
    student, _ = logits_pair(2)
    for temperature in TEMPERATURES:
        assert float(distillation_loss(student, student, temperature=temperature)) == 0.0


def test_stable_for_large_logits():
    # exp(1e4) overflows float32 (and float64): only a log-softmax formulation stays finite.
    student, teacher = logits_pair(3, scale=1e4)
    loss = distillation_loss(student, teacher, temperature=2.0)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), np_distillation(student, teacher, 2.0), rtol=1e-5)


def test_teacher_zero_probabilities_contribute_zero():
    # A -inf teacher logit (a padded vocabulary entry) is p = 0: 0 * log 0 = 0, not NaN.
    student, teacher = logits_pair(4)
    teacher[..., -1] = -np.inf
    loss = distillation_loss(student, teacher, temperature=2.0)
    expected = np_distillation(student[..., :-1], teacher[..., :-1], 2.0)
    # The student's softmax still spans the full vocabulary: add the mass it puts on the padded entry.
    log_q_full = np_log_softmax(student / 2.0)
    log_q_part = np_log_softmax(student[..., :-1] / 2.0)
    correction = 4.0 * (log_q_part - log_q_full[..., :-1]).mean(-1).mean()
    np.testing.assert_allclose(float(loss), expected + correction, rtol=1e-5)
    assert np.all(np.isfinite(jax.grad(lambda s: distillation_loss(s, teacher, temperature=2.0))(student)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_gradient_closed_form(temperature, jit):
    # d/ds [T^2 KL(p || softmax(s / T))] averaged over N positions = T (softmax(s / T) - p) / N.
    student, teacher = logits_pair(5)
    grad = maybe_jit(jax.grad(lambda s: distillation_loss(s, teacher, temperature=temperature)), jit)(student)
    positions = student.shape[0] * student.shape[1]
    q = np.exp(np_log_softmax(student / temperature))
    p = np.exp(np_log_softmax(teacher / temperature))
    expected = temperature * (q - p) / positions
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-7 * max(temperature, 1.0))


def test_gradient_matches_finite_differences():
    student, teacher = logits_pair(6, shape=(2, 7))
    f = lambda s: float(np_distillation(s, teacher, 3.0))  # noqa: E731
    grad = np.asarray(jax.grad(lambda s: distillation_loss(s, teacher, temperature=3.0))(student))
    eps = 1e-5
    numeric = np.zeros(student.shape)
    for index in np.ndindex(student.shape):
        up, down = student.astype(np.float64), student.astype(np.float64)
        up[index] += eps
        down[index] -= eps
        numeric[index] = (f(up) - f(down)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-6)


def test_teacher_receives_no_gradient():
    student, teacher = logits_pair(7)
    grad_teacher = jax.grad(lambda t: distillation_loss(student, t, temperature=2.0))(teacher)
    assert not np.any(np.asarray(grad_teacher))
    grad_teacher = jax.grad(
        lambda t: combined_loss(student, t, np.zeros(student.shape[:-1], np.int32), alpha=0.5, temperature=2.0)[0]
    )(teacher)
    assert not np.any(np.asarray(grad_teacher))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mask(jit):
    student, teacher = logits_pair(8)
    mask = np.random.default_rng(0).random(student.shape[:-1]) < 0.6
    fn = maybe_jit(lambda s, t, m: distillation_loss(s, t, temperature=2.0, mask=m), jit)
    expected = np_distillation(student, teacher, 2.0, mask)
    np.testing.assert_allclose(float(fn(student, teacher, mask)), expected, rtol=1e-5)
    # positions outside the mask do not matter, in value or gradient
    changed = np.where(mask[..., None], student, 100.0 * student + 7.0).astype(np.float32)
    np.testing.assert_allclose(float(fn(changed, teacher, mask)), float(fn(student, teacher, mask)), rtol=1e-6)
    grad = jax.grad(lambda s: distillation_loss(s, teacher, temperature=2.0, mask=mask))(student)
    assert not np.any(np.asarray(grad)[~mask])
    # an all-ones mask is no mask; an all-zeros mask gives 0 with a zero gradient, not NaN
    np.testing.assert_allclose(float(fn(student, teacher, np.ones(mask.shape))), float(fn(student, teacher, None)),
                               rtol=1e-6)
    zeros = np.zeros(mask.shape)
    assert float(fn(student, teacher, zeros)) == 0.0
    grad = jax.grad(lambda s: distillation_loss(s, teacher, temperature=2.0, mask=zeros))(student)
    assert np.all(np.asarray(grad) == 0.0)
    # fractional weights: a weighted mean
    weights = np.random.default_rng(1).random(mask.shape)
    np.testing.assert_allclose(float(fn(student, teacher, weights)), np_distillation(student, teacher, 2.0, weights),
                               rtol=1e-5)


def test_bfloat16_logits_are_computed_in_float32():
    student, teacher = logits_pair(9)
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    loss = distillation_loss(s16, t16, temperature=2.0)
    assert loss.dtype == jnp.float32
    # the reference on the bf16-rounded logits: only the inputs are rounded, not the math
    expected = np_distillation(np.asarray(s16, np.float64), np.asarray(t16, np.float64), 2.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_combined_loss(alpha, jit):
    student, teacher = logits_pair(10)
    targets = np.random.default_rng(2).integers(0, student.shape[-1], student.shape[:-1]).astype(np.int32)
    mask = np.random.default_rng(3).random(targets.shape) < 0.7
    fn = maybe_jit(lambda s, t, y, m: combined_loss(s, t, y, alpha=alpha, temperature=3.0, mask=m), jit)
    loss, metrics = fn(student, teacher, targets, mask)
    kd = np_distillation(student, teacher, 3.0, mask)
    ce = np_cross_entropy(student, targets, mask)
    np.testing.assert_allclose(float(loss), alpha * kd + (1 - alpha) * ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distillation"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["cross_entropy"]), ce, rtol=1e-5)
    assert set(metrics) == {"loss", "distillation", "cross_entropy", "accuracy"}


def test_bad_inputs_raise_naming_what_is_wrong():
    student, teacher = logits_pair(11)
    with pytest.raises(ValueError, match=r"\(3, 5, 11\).*\(3, 5, 10\)"):
        distillation_loss(student, teacher[..., :10], temperature=1.0)
    for bad in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="temperature"):
            distillation_loss(student, teacher, temperature=bad)
    with pytest.raises(ValueError, match=r"mask.*\(3, 5\).*\(3, 4\)"):
        distillation_loss(student, teacher, temperature=1.0, mask=np.ones((3, 4)))
    with pytest.raises(ValueError, match="alpha"):
        combined_loss(student, teacher, np.zeros((3, 5), np.int32), alpha=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="alpha"):
        make_distillation_loss(lambda *a: None, lambda *a: None, temperature=1.0, alpha=-0.1)
    loss_fn = make_distillation_loss(lambda t, f, b, r: b["x"], lambda f, b: b["x"], temperature=1.0, alpha=0.5)
    with pytest.raises(KeyError, match=r"targets.*'targets'.*\['x'\]"):
        loss_fn(None, None, {"x": student}, None)


# ------------------------------------------------------------------ with make_train_step


@pytest.fixture(scope="module")
def tiny_setup():
    config = LMConfig.tiny()
    model = LinenLM(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (4, 16)).astype(np.int32)
    base = model.init(jax.random.key(0), tokens)["params"]
    return config, model, tokens, base


def test_lora_student_with_its_base_as_teacher(tiny_setup):
    config, model, tokens, base = tiny_setup
    peft_model, params = jp.apply(jp.lora(rank=4, targets=r"attn/(query|value)$"), model, jax.random.key(1), tokens,
                                  params=base)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    loss_fn = make_distillation_loss(
        lambda t, f, batch, rng: peft_model.apply(jp.combine(t, f), batch["inputs"]),
        lambda f, batch: peft_model.apply(f, batch["inputs"], adapters=False),
        temperature=2.0,
        alpha=0.5,
    )
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1)}
    # B = 0: the student is its teacher, the distillation term is exactly 0
    loss, metrics = loss_fn(trainable, frozen, batch, None)
    assert float(metrics["distillation"]) == 0.0
    np.testing.assert_allclose(float(loss), 0.5 * float(metrics["cross_entropy"]), rtol=1e-6)

    frozen_before = jax.tree.map(np.array, frozen)
    opt = optax.adam(1e-2)
    step = make_train_step(loss_fn, opt, has_aux=True)
    state = opt.init(trainable)
    for _ in range(5):
        trainable, state, metrics = step(trainable, frozen, state, batch, None)
    assert float(metrics["distillation"]) > 0.0  # the adapter moved the student away from its base
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        assert np.array_equal(a, b)


# eager is ~25 s on 2 cores: slow (CI budget); the jit run checks the same math in CI
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])
def test_distilling_into_a_smaller_model_reduces_the_loss(tiny_setup, jit):
    config, teacher, tokens, teacher_params = tiny_setup
    student = LinenLM(config.replace(d_model=16, d_ff=32, num_layers=1))
    student_params = student.init(jax.random.key(5), tokens)["params"]
    loss_fn = make_distillation_loss(
        lambda t, f, batch, rng: student.apply({"params": t}, batch["inputs"]),
        lambda f, batch: teacher.apply({"params": f["teacher"]}, batch["inputs"]),
        temperature=2.0,
    )
    frozen = {"teacher": teacher_params}
    batch = {"inputs": tokens}
    opt = optax.adam(3e-2)
    step = make_train_step(loss_fn, opt, has_aux=True, jit=jit)
    state = opt.init(student_params)
    first = float(loss_fn(student_params, frozen, batch, None)[0])
    for _ in range(20):
        student_params, state, metrics = step(student_params, frozen, state, batch, None)
    last = float(loss_fn(student_params, frozen, batch, None)[0])
    assert last < 0.5 * first, (first, last)
    assert float(metrics["loss"]) == pytest.approx(float(metrics["distillation"]))
