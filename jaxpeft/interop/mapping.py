"""Module-path mappings between a Flax model's paths and the torch model's module names.

A ``PathMapping`` turns a jaxpeft module path (``"encoder/layer_0/attention/query"``) into the module
name HF PEFT writes (``"encoder.layer.0.attention.self.query"``) and back. It is a list of regex
rewrite rules, tried in order, each a pair ``(flax_regex, torch_template)`` with a twin
``(torch_regex, flax_template)`` for the way back; a path no rule matches falls through to the
default ``"/" -> "."`` rewrite (right for a Flax model whose names mirror the torch one).

Built in: ``"bert"`` (``jaxpeft.models.BertLinen`` / ``BertNnx`` <-> ``transformers.BertModel``), ``"gemma3"``
(``jaxpeft.models.gemma`` <-> ``transformers.Gemma3ForCausalLM``) and
``"identity"``. Other families register theirs with ``register_mapping(name, mapping)``.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["PathMapping", "register_mapping", "get_mapping", "mappings"]


@dataclasses.dataclass(frozen=True)
class PathMapping:
    """Bidirectional rewrite of module paths.

    Attributes:
      to_torch: ``((flax_regex, torch_template), ...)``; ``re.fullmatch`` then ``Match.expand``.
      to_flax: ``((torch_regex, flax_template), ...)`` for the way back.
      prefix_sites: ``(key_template, value_template)`` with ``{i}`` for the layer index: the attention key and
        value projections prefix tuning extends (PEFT's prompt-learning format stores them by layer).

    Example::

      mapping = PathMapping.from_rules([
          (r"blocks_(\\d+)/attn/(q|v)", r"h.\\1.attn.\\2_proj"),      # flax -> torch
      ], [
          (r"h\\.(\\d+)\\.attn\\.(q|v)_proj", r"blocks_\\1/attn/\\2"),   # torch -> flax
      ])
    """

    to_torch: tuple[tuple[str, str], ...] = ()
    to_flax: tuple[tuple[str, str], ...] = ()
    prefix_sites: tuple[str, str] | None = None

    @classmethod
    def from_rules(cls, to_torch, to_flax, prefix_sites: tuple[str, str] | None = None) -> "PathMapping":
        """Build from two lists of ``(regex, template)`` pairs (see the class docstring)."""
        for regex, _ in (*to_torch, *to_flax):
            re.compile(regex)  # fail here, not at export time
        return cls(tuple(map(tuple, to_torch)), tuple(map(tuple, to_flax)), prefix_sites)

    def torch_name(self, path: str) -> str:
        """Flax module path -> torch module name."""
        for regex, template in self.to_torch:
            m = re.fullmatch(regex, path)
            if m:
                return m.expand(template)
        return path.replace("/", ".")

    def flax_path(self, name: str) -> str:
        """Torch module name -> Flax module path."""
        for regex, template in self.to_flax:
            m = re.fullmatch(regex, name)
            if m:
                return m.expand(template)
        return name.replace(".", "/")


_MAPPINGS: dict[str, PathMapping] = {}


def register_mapping(name: str, mapping: PathMapping) -> None:
    """Make ``mapping`` available as ``mapping=name`` in ``export_peft`` / ``import_peft`` / the CLI."""
    if not isinstance(mapping, PathMapping):
        raise TypeError(f"register_mapping({name!r}, ...) needs a PathMapping, got {type(mapping).__name__}")
    _MAPPINGS[name] = mapping


def mappings() -> list[str]:
    """Names of the registered mappings."""
    return sorted(_MAPPINGS)


def get_mapping(mapping: str | PathMapping) -> PathMapping:
    """A mapping by name, or the mapping itself."""
    if isinstance(mapping, PathMapping):
        return mapping
    if mapping not in _MAPPINGS:
        raise ValueError(f"unknown path mapping {mapping!r}; registered: {mappings()} (or pass a PathMapping)")
    return _MAPPINGS[mapping]


register_mapping("identity", PathMapping())
register_mapping("bert", PathMapping.from_rules(
    [
        (r"encoder/layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
        (r"encoder/layer_(\d+)/attention/output", r"encoder.layer.\1.attention.output.dense"),
        (r"encoder/layer_(\d+)/(intermediate|output)", r"encoder.layer.\1.\2.dense"),
        (r"encoder/layer_(\d+)/attention_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
        (r"encoder/layer_(\d+)/output_norm", r"encoder.layer.\1.output.LayerNorm"),
        (r"embeddings/layer_norm", r"embeddings.LayerNorm"),
        (r"pooler", r"pooler.dense"),
    ],
    [
        (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)", r"encoder/layer_\1/attention/\2"),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"encoder/layer_\1/attention/output"),
        (r"encoder\.layer\.(\d+)\.(intermediate|output)\.dense", r"encoder/layer_\1/\2"),
        (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"encoder/layer_\1/attention_norm"),
        (r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"encoder/layer_\1/output_norm"),
        (r"embeddings\.LayerNorm", r"embeddings/layer_norm"),
        (r"pooler\.dense", r"pooler"),
    ],
    prefix_sites=("encoder/layer_{i}/attention/key", "encoder/layer_{i}/attention/value"),
))

_GEMMA_NAMES = [  # jaxpeft.models.gemma module  <->  transformers Gemma3ForCausalLM module (per layer)
    ("attn/query", "self_attn.q_proj"), ("attn/key", "self_attn.k_proj"), ("attn/value", "self_attn.v_proj"),
    ("attn/out", "self_attn.o_proj"), ("attn/query_norm", "self_attn.q_norm"), ("attn/key_norm", "self_attn.k_norm"),
    ("mlp/gate", "mlp.gate_proj"), ("mlp/up", "mlp.up_proj"), ("mlp/down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
    ("mlp_norm", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm"),
]
register_mapping("gemma3", PathMapping.from_rules(
    [(rf"layers_(\d+)/{re.escape(ours)}", rf"model.layers.\1.{theirs}") for ours, theirs in _GEMMA_NAMES]
    + [(r"embed", "model.embed_tokens"), (r"final_norm", "model.norm")],
    [(rf"model\.layers\.(\d+)\.{re.escape(theirs)}", rf"layers_\1/{ours}") for ours, theirs in _GEMMA_NAMES]
    + [(r"model\.embed_tokens", "embed"), (r"model\.norm", "final_norm")],
    prefix_sites=("layers_{i}/attn/key", "layers_{i}/attn/value"),
))
