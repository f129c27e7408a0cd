"""HF PEFT adapters on Gemma 3 against real ``peft`` on transformers' Gemma3ForCausalLM (interop).

A tiny random Gemma 3 (2 layers) is written by jaxpeft's ``save_pretrained`` in Hugging Face names and read
by ``transformers.Gemma3ForCausalLM.from_pretrained``: both sides hold the same weights. Then
* a jaxpeft adapter (random non-zero leaves) exported with the ``"gemma3"`` mapping loads with
  ``PeftModel.from_pretrained`` and gives jaxpeft's logits within 1e-4;
* a peft adapter (``init_lora_weights=False`` plus noise, ``save_pretrained``) imports into jaxpeft with
  peft's logits within 1e-4;
* the same both ways for prefix tuning and prompt tuning (PEFT's prompt-learning formats, ``CAUSAL_LM``).

The config has one key/value head (GQA, 4 query heads): the key/value width (16) differs from the model
width (32), as in Gemma 3 270M (256 vs 640), which is what PEFT sizes a prefix by.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.interop import export_peft, import_peft
from jaxpeft.methods.prefix import PrefixTuning
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen
from jaxpeft.models.pretrained import save_pretrained
from tests._peft_made import saved_peft_model

pytestmark = pytest.mark.interop

CONFIG = GemmaConfig.tiny(query_pre_attn_scalar=12.0, rope_local_base=100.0, num_kv_heads=1)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9)).astype(np.int64)  # longer than the window
TOL = 1e-4

JAX_METHODS = {
    "lora_rslora_patterns": lambda: jp.lora(4, 8, targets=r"attn/(query|value)$|mlp/down$", rslora=True,
                                            rank_pattern={"mlp/down": 2}, alpha_pattern={"value": 3.0}),
    "dora": lambda: jp.dora(2, 4, targets=r"attn/(query|key)$|mlp/up$"),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[interop]')")
    pytest.importorskip("peft", reason="needs peft (pip install -e '.[interop]')")
    base = GemmaLinen(CONFIG).init(jax.random.key(0), jnp.asarray(TOKENS, jnp.int32))["params"]
    base = jax.tree.map(lambda x: np.asarray(x + 0.05 * jax.random.normal(jax.random.key(3), x.shape)), base)
    directory = save_pretrained(tmp_path_factory.mktemp("gemma"), CONFIG, base)
    return base, directory


def _torch_base(directory):
    import torch
    import transformers

    return transformers.Gemma3ForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


def _jax_logits(peft, base, adapter=None, randomise=False, positions=None):
    tokens = jnp.asarray(TOKENS, jnp.int32)
    peft_model, params = jp.apply(peft, GemmaLinen(CONFIG), jax.random.key(2), tokens, params=base)
    if adapter is not None:
        params = jp.insert(params, adapter)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    if randomise:
        trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape, x.dtype),
                                 trainable)
    return np.asarray(peft_model.apply(jp.combine(trainable, frozen), tokens, positions=positions)), trainable


def test_base_logits_equal(shared):
    base, directory = shared
    want = np.asarray(GemmaLinen(CONFIG).apply({"params": base}, jnp.asarray(TOKENS, jnp.int32)))
    assert np.abs(_torch_logits(_torch_base(directory)) - want).max() <= TOL


# DoRA runs in the slow set only: the CI interop budget is tight and LoRA exercises the same mapping.
NAMES = ["lora_rslora_patterns", pytest.param("dora", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", NAMES)
def test_jaxpeft_gemma_adapter_loads_in_peft(shared, tmp_path, name):
    from peft import PeftModel

    base, directory = shared
    peft = JAX_METHODS[name]()
    want, trainable = _jax_logits(peft, base, randomise=True)
    export_peft(tmp_path, peft, trainable, mapping="gemma3")
    model = PeftModel.from_pretrained(_torch_base(directory), str(tmp_path)).eval()
    assert np.abs(_torch_logits(model) - want).max() <= TOL
    assert np.abs(_torch_logits(_torch_base(directory)) - want).max() > 1e-2  # the adapter matters


def _peft_configs():
    import peft

    return {
        "lora_rslora_patterns": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                use_rslora=True, rank_pattern={"down_proj": 2},
                                                alpha_pattern={"v_proj": 3}, init_lora_weights=False),
        "dora": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], use_dora=True,
                                init_lora_weights=False),
    }


@pytest.mark.parametrize("name", NAMES)
def test_peft_gemma_adapter_imports_into_jaxpeft(shared, tmp_path, name):
    base, directory = shared
    model = saved_peft_model(_torch_base(directory), _peft_configs()[name], tmp_path)
    want = _torch_logits(model)
    imported, adapter = import_peft(tmp_path, mapping="gemma3", params=base)
    got, _ = _jax_logits(imported, base, adapter)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(_torch_logits(_torch_base(directory)) - want).max() > 1e-2  # the adapter matters


# ---- prompt learning. PEFT runs prefix tuning on Gemma 3 as a cache of P earlier tokens: the prefix keys
# skip k_norm and RoPE, the real tokens take RoPE positions P .. P+seq-1 (transformers counts from the cache
# length), and a sliding-window layer's query at row index t sees prefix key j only while t + P - j < window.
# jaxpeft's Gemma does the same with the prefix (jaxpeft.models.gemma._prefix_visible) and is given the same
# positions (``positions=``). TOKENS has 9 tokens and the window is 4, so the window cuts into the prefix.
# Prompt tuning needs nothing: the virtual tokens are ordinary positions 0 .. n-1 on both sides.

N_VIRTUAL = 3


def _hf_config(directory):
    import json

    return json.loads((directory / "config.json").read_text())


def _jax_prompt_logits(peft, base, adapter=None, randomise=False):
    positions = None
    if isinstance(peft, PrefixTuning):  # PEFT's numbering after a cache of N_VIRTUAL prefix entries
        positions = jnp.broadcast_to(jnp.arange(N_VIRTUAL, N_VIRTUAL + TOKENS.shape[1]), TOKENS.shape)
    return _jax_logits(peft, base, adapter, randomise, positions=positions)


def _peft_prompt_logits(model, n_virtual):
    return _torch_logits(model)[:, n_virtual:]  # peft's prompt tuning returns the virtual positions too


PROMPT_METHODS = {"prefix_tuning": lambda: jp.prefix_tuning(N_VIRTUAL, targets=r"attn/(key|value)$"),
                  "prompt_tuning": lambda: jp.prompt_tuning(N_VIRTUAL)}


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
def test_jaxpeft_gemma_prompt_learning_loads_in_peft(shared, tmp_path, name):
    from peft import PeftModel

    base, directory = shared
    peft = PROMPT_METHODS[name]()
    want, trainable = _jax_prompt_logits(peft, base, randomise=True)
    export_peft(tmp_path, peft, trainable, mapping="gemma3", model_config=_hf_config(directory), task_type="CAUSAL_LM")
    model = PeftModel.from_pretrained(_torch_base(directory), str(tmp_path)).eval()
    got = _peft_prompt_logits(model, N_VIRTUAL if name == "prompt_tuning" else 0)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(_torch_logits(_torch_base(directory)) - want).max() > 1e-2  # the prompt matters


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
def test_peft_gemma_prompt_learning_imports_into_jaxpeft(shared, tmp_path, name):
    import peft

    base, directory = shared
    config = {"prefix_tuning": peft.PrefixTuningConfig, "prompt_tuning": peft.PromptTuningConfig}[name](
        num_virtual_tokens=N_VIRTUAL, task_type="CAUSAL_LM")
    model = saved_peft_model(_torch_base(directory), config, tmp_path)
    want = _peft_prompt_logits(model, N_VIRTUAL if name == "prompt_tuning" else 0)
    imported, adapter = import_peft(tmp_path, mapping="gemma3", params=base)
    assert type(imported) is type(PROMPT_METHODS[name]())
    got, _ = _jax_prompt_logits(imported, base, adapter)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(_torch_logits(_torch_base(directory)) - want).max() > 1e-2
