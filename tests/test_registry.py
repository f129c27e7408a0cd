"""Configs round-trip: jaxpeft.registry rebuilds every transform, chains included, from its saved config."""

from __future__ import annotations

import json
import re

import flax.linen as nn
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft import registry
from jaxpeft.registry import ConfigError, decode_selector, encode_selector, from_config, to_config

# One row per method family and option that changes the config (the registry's contract table).
TRANSFORMS = {
    "lora": jp.lora(4, 8, targets=r"attn/(query|value)$"),
    "lora_patterns": jp.lora(4, 8, targets=["q$", "v$"], rank_pattern={"q$": 2}, alpha_pattern={"v$": 3.0}),
    "lora_rslora_gaussian": jp.lora(2, 4, rslora=True, init="gaussian", dropout=0.1, adapter="second"),
    "lora_pissa_bf16": jp.lora(2, 4, init="pissa", param_dtype="bfloat16"),
    "dora": jp.dora(4, 8, targets=("query$", "value$"), detach_norm=False),
    "ia3": jp.ia3(targets=["key$", "value$", "down$"], feedforward=["down$"]),
    "ia3_no_feedforward": jp.ia3(targets="value$", feedforward=None),
    "lokr": jp.lokr(factor=4, rank=2, targets="up$"),
    "houlsby": jp.houlsby(bottleneck=4),
    "pfeiffer": jp.pfeiffer(reduction_factor=8.0, activation="gelu"),
    "compacter": jp.compacter(phm_dim=2, bottleneck=4),
    "compacter_pp": jp.compacter_pp(phm_dim=2, reduction_factor=4),
    "prefix": jp.prefix_tuning(length=3),
    "prefix_reparam": jp.prefix_tuning(length=3, reparam="shared", reparam_hidden=8),
    "prompt": jp.prompt_tuning(length=4),
    "prompt_text": jp.prompt_tuning(length=4, init="text", init_token_ids=(3, 1, 4)),
    "p_tuning": jp.p_tuning(length=4, encoder="mlp", hidden_size=8),
    "regex_object": jp.lora(2, 2, targets=re.compile("QUERY$", re.IGNORECASE)),
    "layer_type_linen": jp.lora(2, 2, targets=nn.Dense),
    "layer_type_nnx": jp.lora(2, 2, targets=[nnx.Linear, "value$"]),
    "chain": jp.chain(jp.lora(2, 4, targets="query$"), jp.ia3(targets="value$", feedforward=None)),
    "nested_chain": jp.chain(jp.chain(jp.lora(2, 4, targets="query$"), jp.lokr(rank=2, targets="up$")), jp.houlsby(4)),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_config_rebuilds_an_equal_transform_through_json(name):
    peft = TRANSFORMS[name]
    config = json.loads(json.dumps(to_config(peft)))  # what a checkpoint stores
    rebuilt = from_config(config)
    assert rebuilt == peft
    assert type(rebuilt) is type(peft)
    assert rebuilt.config() == config  # and again: a fixed point


def test_every_registered_method_has_a_row():
    rows = {t.name for peft in TRANSFORMS.values() for t in _leaves(peft)}
    assert rows | {"chain"} == set(registry.method_names())


def _leaves(peft):
    return [m for t in peft.transforms for m in _leaves(t)] if isinstance(peft, jp.Chain) else [peft]


@pytest.mark.parametrize(
    "selector, encoded",
    [
        ("query$", "query$"),
        (("a", "b"), ["a", "b"]),
        (re.compile("q", re.I), {"selector_regex": "q", "flags": int(re.I)}),
        (nn.Dense, {"selector_type": "flax.linen.linear:Dense"}),
        ((nn.Dense, "v$"), [{"selector_type": "flax.linen.linear:Dense"}, "v$"]),
        (True, True),
    ],
)
def test_selector_encoding_is_json_and_decodes_back(selector, encoded):
    assert encode_selector(selector) == encoded
    assert json.loads(json.dumps(encoded)) == encoded
    assert decode_selector(encoded) == selector


def _local_layer_type():
    class Local(nn.Module):
        pass

    return Local


@pytest.mark.parametrize(
    "targets, reason",
    [
        (lambda path, module: "query" in path, r"<lambda>.* is a predicate \(code, not data\)"),
        (["value$", lambda path, module: True], r"<lambda>"),
        (_local_layer_type(), r"cannot be imported back by that name"),
    ],
)
def test_unserialisable_selectors_are_refused_when_saving(tmp_path, targets, reason):
    peft = jp.lora(2, 2, targets=targets)
    for config in (peft, peft.config()):  # the transform itself, or its config
        with pytest.raises(ConfigError, match=r"config field 'targets.*cannot be saved: .*" + reason):
            jp.save_adapter(tmp_path / "a", {"w": np.ones(2)}, config=config)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="config field 'targets"):
        from_config(json.loads(json.dumps(peft.config())))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rank": 2}, r"config field 'method' is missing; known methods: \[.*'lora'"),
        ({"method": "loar", "rank": 2}, r"config field 'method': unknown method 'loar'; known: \["),
        ({"method": "lora", "rnak": 2}, r"config field 'rnak' is not a field of LoRA \('lora'\); its fields: \["),
        ({"method": "lora", "rank": 0}, r"LoRA rank must be a positive int, got 0"),
        ({"method": "lora", "targets": {"selector_type": "jaxpeft.nothing:Here"}}, r"field 'targets': cannot import"),
        ({"method": "lora", "targets": {"selector_type": "jaxpeft:lora"}}, r"field 'targets'.* is a function, not a type"),
        ({"method": "lora", "targets": {"selector_regex": "(q", "flags": 0}}, r"field 'targets'.* not a valid regex"),
        ({"method": "chain", "transforms": []}, r"config field 'transforms': a chain has exactly 'transforms'"),
        (
            {"method": "chain", "transforms": [{"method": "lora"}, {"method": "ia3", "size": 1}]},
            r"config field 'transforms\[1\]\.size' is not a field of IA3",
        ),
        ("lora", r"config '<config>' is a str, expected a mapping"),
    ],
)
def test_a_config_that_cannot_be_rebuilt_names_the_field(config, message):
    with pytest.raises(ConfigError, match=message):
        from_config(config)


def test_register_refuses_a_taken_name_and_non_dataclasses():
    with pytest.raises(ConfigError, match="'lora' is already registered for LoRA"):
        registry.register(_dataclass_named("lora"))
    with pytest.raises(ConfigError, match="is not a dataclass"):
        registry.register(type("Plain", (), {"name": "plain"}))
    with pytest.raises(ConfigError, match="'chain' is already registered for jp.chain"):
        registry.register(_dataclass_named("chain"))


def _dataclass_named(name):
    import dataclasses

    return dataclasses.dataclass(frozen=True)(type("Custom", (), {"name": name, "__annotations__": {}}))


def test_a_user_method_registers_and_rebuilds():
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Scaled:
        factor: float = 1.0
        targets: object = "q$"
        name: ClassVar[str] = "test_registry_scaled"

        def config(self):
            return {"method": self.name, "factor": self.factor, "targets": encode_selector(self.targets)}

    registry.register(Scaled)
    assert from_config(Scaled(2.0, targets=("a", "b")).config()) == Scaled(2.0, targets=("a", "b"))
