"""HF PEFT adapter format: round trip without torch, refusals, and bad input.

Reference: the invariant that an exported-then-imported adapter gives the same model outputs as the
original (on a tiny BERT with random non-zero adapter leaves), and the PEFT layout table (shapes of the
written tensors). Parity with real ``peft`` is in test_interop_peft.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.interop import PathMapping, PeftFormatError, export_peft, import_peft, load_into_nnx
from jaxpeft.models import BertConfig, BertLinen, BertNnx, bert_nnx_from_params

CONFIG = BertConfig.tiny()
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)
MASK = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)

METHODS = {
    "lora_rslora_patterns": lambda: jp.lora(4, 8, targets=r"attention/(query|value)$|intermediate$", rslora=True,
                                            rank_pattern={"intermediate": 2}, alpha_pattern={"value": 3.0}),
    "dora": lambda: jp.dora(2, 4, targets=r"attention/(query|key)$"),
    "ia3": lambda: jp.ia3(targets=r"attention/(key|value)$|layer_\d+/output$", feedforward=r"layer_\d+/output$"),
    "prompt_tuning": lambda: jp.prompt_tuning(3),
    "prefix_tuning": lambda: jp.prefix_tuning(3, targets=r"attention/(key|value)$"),
}


def _base():
    return BertLinen(CONFIG).init(jax.random.key(0), TOKENS)["params"]


def _randomised(params, trainable_selector, seed=1):
    def bump(path, x):
        key = jax.random.fold_in(jax.random.key(seed), hash(path) % 2**31)
        return x + 0.3 * jax.random.normal(key, x.shape, x.dtype)

    trainable, frozen = jp.partition(params, trainable_selector)
    leaves = {p: bump(p, v) for p, v in jp.leaves_with_paths(trainable)}
    trainable = jax.tree_util.tree_map_with_path(
        lambda kp, v: leaves[jp.tree.path_to_str(kp)] if v is not None else None, trainable)
    return trainable, frozen


def _linen_run(peft, base, adapter=None, seed=1):
    model = BertLinen(CONFIG)
    peft_model, params = jp.apply(peft, model, jax.random.key(2), TOKENS, params=base, attention_mask=MASK)
    if adapter is None:
        trainable, frozen = _randomised(params, peft_model.trainable, seed)
    else:
        trainable, frozen = jp.partition(jp.insert(params, adapter), peft_model.trainable)
    out = peft_model.apply(jp.combine(trainable, frozen), TOKENS, attention_mask=MASK)
    return np.asarray(out), trainable


@pytest.mark.parametrize("name", sorted(METHODS))
def test_round_trip_gives_the_same_outputs(tmp_path, name):
    base = _base()
    peft = METHODS[name]()
    want, trainable = _linen_run(peft, base)
    export_peft(tmp_path, peft, trainable, model_config=CONFIG)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    imported, adapter = import_peft(tmp_path, params=base)
    got, _ = _linen_run(imported, base, adapter)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(want, BertLinen(CONFIG).apply({"params": base}, TOKENS, attention_mask=MASK), atol=1e-3)


def test_layout_matches_peft_table(tmp_path):
    from safetensors.numpy import load_file

    base = _base()
    peft = METHODS["lora_rslora_patterns"]()
    _, trainable = _linen_run(peft, base)
    export_peft(tmp_path, peft, trainable)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = np.asarray(trainable["encoder"]["layer_1"]["intermediate"]["lora_a"])
    np.testing.assert_array_equal(tensors["base_model.model.encoder.layer.1.intermediate.dense.lora_A.weight"], a.T)
    assert tensors["base_model.model.encoder.layer.0.attention.self.value.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"]
    assert config["rank_pattern"] == {r"encoder\.layer\.0\.intermediate\.dense": 2,
                                      r"encoder\.layer\.1\.intermediate\.dense": 2}
    assert set(config["alpha_pattern"].values()) == {3.0}
    assert "encoder.layer.1.attention.self.query" in config["target_modules"]


def test_nnx_export_and_import(tmp_path):
    base = _base()
    peft = METHODS["dora"]()
    want, trainable = _linen_run(peft, base)
    export_peft(tmp_path / "a", peft, trainable)
    imported, adapter = import_peft(tmp_path / "a")
    model = jp.apply(imported, bert_nnx_from_params(CONFIG, base), jax.random.key(5))
    load_into_nnx(model, adapter)
    np.testing.assert_allclose(np.asarray(model(TOKENS, attention_mask=MASK)), want, atol=1e-5)
    export_peft(tmp_path / "b", imported, model)  # an NNX model exports too
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_own_mapping_for_any_flax_model(tmp_path):
    mapping = PathMapping.from_rules([(r"encoder/layer_(\d+)/attention/(query|value)", r"blocks.\1.\2_proj")],
                                     [(r"blocks\.(\d+)\.(query|value)_proj", r"encoder/layer_\1/attention/\2")])
    base = _base()
    peft = jp.lora(2, targets=r"attention/(query|value)$")
    want, trainable = _linen_run(peft, base)
    export_peft(tmp_path, peft, trainable, mapping=mapping)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "blocks.1.value_proj" in config["target_modules"]
    imported, adapter = import_peft(tmp_path, mapping=mapping, params=base)
    np.testing.assert_allclose(_linen_run(imported, base, adapter)[0], want, atol=1e-6)


def test_what_peft_cannot_express_is_refused_by_name(tmp_path):
    base = _base()
    for peft, pattern in ((jp.compacter(targets=r"attention/query$"), "Compacter"),
                          (jp.lokr(2, targets=r"attention/query$"), "LoKr"),
                          (jp.p_tuning(3), "PTuning"), (jp.houlsby(), "BottleneckAdapter")):
        with pytest.raises(PeftFormatError, match=pattern):
            export_peft(tmp_path, peft, base)
    chained = jp.chain(jp.lora(2, targets=r"attention/query$"), jp.ia3(targets=r"attention/key$"))
    with pytest.raises(PeftFormatError, match="Chain"):
        export_peft(tmp_path, chained, base)
    stacked = {"layers": {"attn": {"query": {"lora_a": np.zeros((3, 8, 2)), "lora_b": np.zeros((3, 2, 8))}}}}
    with pytest.raises(PeftFormatError, match="stacked"):
        export_peft(tmp_path, jp.lora(2, targets="query"), stacked, mapping="identity")
    assert not (tmp_path / "adapter_config.json").exists()


def test_bad_peft_directories_fail_before_work(tmp_path):
    base = _base()
    peft = jp.lora(2, targets=r"attention/query$")
    _, trainable = _linen_run(peft, base)
    export_peft(tmp_path, peft, trainable)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(PeftFormatError, match="peft_type 'LOHA' is not supported"):
        import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["pooler"]}))
    with pytest.raises(PeftFormatError, match="modules_to_save"):
        import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    small = BertLinen(BertConfig.tiny(num_hidden_layers=1)).init(jax.random.key(0), TOKENS)["params"]
    with pytest.raises(PeftFormatError, match=r"encoder\.layer\.1\.attention\.self\.query.*not a layer"):
        import_peft(tmp_path, params=small)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(tmp_path / "nowhere")


def test_cli_convert_both_directions(tmp_path, capsys):
    from jaxpeft.cli import main

    base = _base()
    peft = METHODS["lora_rslora_patterns"]()
    want, trainable = _linen_run(peft, base)
    jp.save_adapter(tmp_path / "jax", trainable, config=peft.config())
    assert main(["convert", "to-peft", str(tmp_path / "jax"), str(tmp_path / "peft")]) == 0
    assert main(["convert", "from-peft", str(tmp_path / "peft"), str(tmp_path / "jax2")]) == 0
    adapter, metadata = jp.restore_adapter(tmp_path / "jax2")
    from jaxpeft.registry import from_config

    got, _ = _linen_run(from_config(metadata["config"]), base, adapter)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert "wrote" in capsys.readouterr().out
