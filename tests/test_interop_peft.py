"""HF PEFT adapters against real ``peft`` on transformers' BertModel (interop).

Both directions on a tiny BERT whose weights are shared (jaxpeft's ``save_pretrained`` writes them,
``transformers.BertModel.from_pretrained`` reads them):
* a jaxpeft adapter (random non-zero leaves) exported loads with ``PeftModel.from_pretrained`` and gives
  jaxpeft's outputs within 1e-4;
* a peft adapter (random non-zero A and B etc., ``save_pretrained``) imports into jaxpeft with peft's outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.interop import export_peft, import_peft
from jaxpeft.models import BertConfig, BertLinen, save_pretrained
from tests._peft_made import saved_peft_model

pytestmark = pytest.mark.interop

CONFIG = BertConfig.tiny()
TOKENS = np.random.default_rng(0).integers(1, 64, (2, 6)).astype(np.int64)
MASK = np.array([[1] * 6, [1] * 4 + [0] * 2])
TOL = 1e-4

JAX_METHODS = {
    "lora_rslora_patterns": lambda: jp.lora(4, 8, targets=r"attention/(query|value)$|intermediate$", rslora=True,
                                            rank_pattern={"intermediate": 2}, alpha_pattern={"value": 3.0}),
    "dora": lambda: jp.dora(2, 4, targets=r"attention/(query|key)$|layer_\d+/output$"),
    "ia3": lambda: jp.ia3(targets=r"attention/(key|value)$|layer_\d+/output$", feedforward=r"layer_\d+/output$"),
    "prompt_tuning": lambda: jp.prompt_tuning(3),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = BertLinen(CONFIG).init(jax.random.key(0), jnp.asarray(TOKENS, jnp.int32))["params"]
    base = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), base)
    directory = save_pretrained(tmp_path_factory.mktemp("bert"), CONFIG, base)
    return base, directory


def _torch_base(directory):
    import transformers

    return transformers.BertModel.from_pretrained(str(directory), attn_implementation="eager").eval()


def _torch_out(model, n_virtual=0):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK)).last_hidden_state
    return out.numpy()[:, n_virtual:]


def _jax_out(peft, base, adapter=None, randomise=False):
    model = BertLinen(CONFIG)
    tokens, mask = jnp.asarray(TOKENS, jnp.int32), jnp.asarray(MASK, jnp.int32)
    peft_model, params = jp.apply(peft, model, jax.random.key(2), tokens, params=base, attention_mask=mask)
    if adapter is not None:
        params = jp.insert(params, adapter)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    if randomise:
        trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape, x.dtype),
                                 trainable)
    return np.asarray(peft_model.apply(jp.combine(trainable, frozen), tokens, attention_mask=mask)), trainable


# DoRA's export runs in the slow set (about 2 min on 2 cores, the CI budget); its import direction stays in CI.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "dora" else n for n in sorted(JAX_METHODS)])
def test_jaxpeft_adapter_loads_in_peft(shared, tmp_path, name):
    from peft import PeftModel

    base, directory = shared
    peft = JAX_METHODS[name]()
    want, trainable = _jax_out(peft, base, randomise=True)
    export_peft(tmp_path, peft, trainable, model_config=CONFIG)
    model = PeftModel.from_pretrained(_torch_base(directory), str(tmp_path)).eval()
    got = _torch_out(model, 3 if name == "prompt_tuning" else 0)
    real = MASK.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= TOL
    assert np.abs(_torch_out(_torch_base(directory))[real] - want[real]).max() > 1e-2  # the adapter matters


def _peft_configs():
    import peft

    return {
        "lora_rslora_patterns": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                                                use_rslora=True, rank_pattern={"intermediate.dense": 2},
                                                alpha_pattern={"value": 3}, init_lora_weights=False),
        "dora": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key"], use_dora=True,
                                init_lora_weights=False),
        "ia3": peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                              init_ia3_weights=False),
        "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="FEATURE_EXTRACTION"),
    }


@pytest.mark.parametrize("name", ["lora_rslora_patterns", "dora", "ia3", "prompt_tuning"])
def test_peft_adapter_imports_into_jaxpeft(shared, tmp_path, name):
    base, directory = shared
    model = saved_peft_model(_torch_base(directory), _peft_configs()[name], tmp_path)
    want = _torch_out(model, 3 if name == "prompt_tuning" else 0)
    imported, adapter = import_peft(tmp_path, params=base)
    got, _ = _jax_out(imported, base, adapter)
    real = MASK.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= TOL


# ---- prefix tuning. Transformers' BertModel numbers the tokens after a cache of P prefix entries from P
# (its position ids start at the cache length), so peft's prefix-tuned BERT sees positions P .. P+seq-1;
# jaxpeft is given the same positions (``positions=``) and then must agree within 1e-4.

N_PREFIX = 3


def _jax_prefix_out(peft, base, adapter=None, randomise=False):
    model = BertLinen(CONFIG)
    tokens, mask = jnp.asarray(TOKENS, jnp.int32), jnp.asarray(MASK, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(N_PREFIX, N_PREFIX + tokens.shape[1]), tokens.shape)
    peft_model, params = jp.apply(peft, model, jax.random.key(2), tokens, params=base, attention_mask=mask)
    if adapter is not None:
        params = jp.insert(params, adapter)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    if randomise:
        trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape, x.dtype),
                                 trainable)
    out = peft_model.apply(jp.combine(trainable, frozen), tokens, attention_mask=mask, positions=positions)
    return np.asarray(out), trainable


def test_jaxpeft_prefix_tuning_loads_in_peft(shared, tmp_path):
    from peft import PeftModel

    base, directory = shared
    peft = jp.prefix_tuning(N_PREFIX)
    want, trainable = _jax_prefix_out(peft, base, randomise=True)
    export_peft(tmp_path, peft, trainable, model_config=CONFIG)
    model = PeftModel.from_pretrained(_torch_base(directory), str(tmp_path)).eval()
    got = _torch_out(model)
    real = MASK.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= TOL
    assert np.abs(_torch_out(_torch_base(directory))[real] - want[real]).max() > 1e-2  # the prefix matters


def test_peft_prefix_tuning_imports_into_jaxpeft(shared, tmp_path):
    import peft

    base, directory = shared
    model = saved_peft_model(_torch_base(directory), peft.PrefixTuningConfig(
        num_virtual_tokens=N_PREFIX, task_type="FEATURE_EXTRACTION"), tmp_path)
    want = _torch_out(model)
    imported, adapter = import_peft(tmp_path, params=base)
    got, _ = _jax_prefix_out(imported, base, adapter)
    real = MASK.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= TOL
