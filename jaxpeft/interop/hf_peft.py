"""Hugging Face PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

``export_peft`` writes a jaxpeft adapter in PEFT's key names and layout; ``import_peft`` reads one back as
``(transform, adapter)``: bind the transform as usual (``jp.apply``) and put the adapter's leaves in
(``jp.insert(params, adapter)`` for Linen, ``load_into_nnx`` for NNX).

Layouts (torch ``Linear.weight`` is ``[out, in]``, a Flax kernel ``[in, out]``):

| jaxpeft leaf | PEFT tensor |
|---|---|
| ``lora_a [in, r]`` | ``base_model.model.<module>.lora_A.weight [r, in]`` |
| ``lora_b [r, out]`` | ``base_model.model.<module>.lora_B.weight [out, r]`` |
| ``dora_magnitude [out]`` | ``base_model.model.<module>.lora_magnitude_vector [out]`` |
| ``ia3_scale [out]`` / feedforward ``[in]`` | ``base_model.model.<module>.ia3_l [out, 1]`` / ``[1, in]`` |
| ``prompt/embeddings [n, d]`` | ``prompt_embeddings [n, d]`` |
| ``<layer i>/key/prefix``, ``.../value/prefix [n, d]`` | ``prompt_embeddings [n, layers * 2 * d]``, column block ``2 i`` key, ``2 i + 1`` value; ``d``: the key/value width (GQA: ``num_key_value_heads * head_dim``) |

What PEFT's format cannot express is refused by name (``PeftFormatError``): other methods (Compacter,
bottleneck adapters, LoKr, P-tuning's encoder, ...), a chain of methods, sites whose kernel is not one
``[in, out]`` matrix (DenseGeneral / Einsum with several input or output axes, stacked ``scan`` layers),
prefix tuning's reparameterisation, and PEFT options jaxpeft has no equivalent of.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxpeft._files import write_bytes_atomic
from jaxpeft.interop.mapping import PathMapping, get_mapping
from jaxpeft.methods.protocol import check_method

__all__ = ["PeftFormatError", "export_peft", "import_peft", "load_into_nnx", "PREFIX"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEAVES = ("lora_a", "lora_b", "dora_magnitude", "ia3_scale", "prefix", "embeddings")
_SUPPORTED = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")
# LoRA inits that change the base weights too: the adapter alone does not reproduce the model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "eva", "loftq")


class PeftFormatError(ValueError):
    """An adapter that the HF PEFT format cannot express, or a PEFT directory jaxpeft cannot read."""


# ------------------------------------------------------------------------------------------------ helpers


def _flatten(tree: Any) -> dict[str, Any]:
    """Nested dict (or NNX model / state) -> {"a/b/c": leaf}."""
    try:
        from flax import nnx

        if isinstance(tree, nnx.Module):
            tree = nnx.to_pure_dict(nnx.state(tree, nnx.Param))
        elif isinstance(tree, nnx.State):
            tree = nnx.to_pure_dict(tree)
    except ImportError:  # pragma: no cover
        pass
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif node is not None:
            out[prefix] = node

    walk(tree, "")
    return out


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _split_leaf(path: str, adapter: str) -> tuple[str, str] | None:
    """'mod/path/lora_a@name' -> ('mod/path', 'lora_a') for this adapter's leaves, else None."""
    module, _, leaf = path.rpartition("/")
    if adapter == "default":
        if "@" in leaf:
            return None
    else:
        suffix = f"@{adapter}"
        if not leaf.endswith(suffix):
            return None
        leaf = leaf[: -len(suffix)]
    return (module, leaf) if leaf in _LEAVES else None


def _layer_index(path: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path))


def _pattern_value(pattern: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """jaxpeft's rank/alpha pattern semantics: the first regex ``re.search`` finds in the path wins."""
    for regex, value in (pattern or {}).items():
        if re.search(regex, path):
            return value
    return default


def _peft_pattern_value(pattern: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's semantics: a key matches a module name that equals it or ends with ``.key`` (keys are regexes)."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _method_name(peft: Any) -> str:
    try:
        check_method(peft)
    except TypeError as error:
        raise PeftFormatError(f"{type(peft).__name__} is not a jaxpeft method transform: {error}") from None
    config = peft.config()
    if not isinstance(config, Mapping) or "method" not in config:
        raise PeftFormatError(f"{type(peft).__name__}.config() has no 'method' key: {config!r}")
    return config["method"]


# ------------------------------------------------------------------------------------------------ export


def export_peft(directory: str | os.PathLike, peft: Any, adapter: Any, *, mapping: str | PathMapping = "bert",
                model_config: Any = None, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> pathlib.Path:
    """Write a jaxpeft adapter as a HF PEFT adapter directory.

    Args:
      directory: created if absent; the two files are written atomically.
      peft: the transform the adapter was trained with (``jp.lora(...)``, ``jp.dora``, ``jp.ia3``,
        ``jp.prompt_tuning``, ``jp.prefix_tuning``).
      adapter: a tree holding the adapter's leaves: the trainable partition, the whole Linen params, an
        NNX model or its ``nnx.State``.
      mapping: a registered mapping name (``"bert"``, ``"identity"``, ...) or a ``PathMapping``.
      model_config: prompt/prefix tuning only: an object or dict with ``hidden_size``, ``num_hidden_layers``,
        ``num_attention_heads`` (e.g. a ``BertConfig``), written into the PEFT config.
      base_model_name_or_path: recorded in ``adapter_config.json``.
      task_type: PEFT's ``task_type`` (default: None for LoRA / IA3, ``"FEATURE_EXTRACTION"`` for prompt
        learning).

    Returns:
      the directory.
    """
    from safetensors.numpy import save

    from jaxpeft.transform import Chain

    mapping = get_mapping(mapping)
    if isinstance(peft, Chain):
        raise PeftFormatError("export_peft: a Chain of methods has no HF PEFT form (one method per adapter "
                              "directory); export each method's adapter separately")
    method = _method_name(peft)
    if method not in ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"):
        raise PeftFormatError(f"export_peft: {type(peft).__name__} ({method!r}) has no HF PEFT adapter format; "
                              f"exportable: LoRA (incl. rsLoRA, patterns), DoRA, IA3, prompt tuning, prefix tuning")
    config = peft.config()
    name = config.get("adapter", "default")
    flat = _flatten(adapter)
    leaves: dict[str, dict[str, np.ndarray]] = {}
    for path, value in flat.items():
        split = _split_leaf(path, name)
        if split:
            leaves.setdefault(split[0], {})[split[1]] = np.asarray(value)
    if not leaves:
        raise PeftFormatError(f"export_peft: the adapter tree holds no {method} leaves of adapter {name!r} "
                              f"(looked for {_LEAVES}); paths seen: {sorted(flat)[:5]}")
    if method in ("lora", "dora"):
        hf_config, tensors = _export_lora(method, config, leaves, mapping)
    elif method == "ia3":
        hf_config, tensors = _export_ia3(peft, config, leaves, mapping)
    elif method == "prompt_tuning":
        hf_config, tensors = _export_prompt(config, leaves, model_config)
    elif method == "prefix_tuning":
        hf_config, tensors = _export_prefix(config, leaves, mapping, model_config)
    else:
        raise PeftFormatError(f"export_peft: {type(peft).__name__} ({method!r}) has no HF PEFT adapter format; "
                              f"exportable: LoRA (incl. rsLoRA, patterns), DoRA, IA3, prompt tuning, prefix tuning")
    if task_type is None and method in ("prompt_tuning", "prefix_tuning"):
        task_type = "FEATURE_EXTRACTION"
    hf_config.update(task_type=task_type, base_model_name_or_path=base_model_name_or_path, inference_mode=True,
                     revision=None)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v.astype(np.float32) if v.dtype.kind == "f" and v.dtype.itemsize < 2 else v)
               for k, v in tensors.items()}
    write_bytes_atomic(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    write_bytes_atomic(directory / CONFIG_NAME, (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _check_matrix(path: str, leaf: str, value: np.ndarray, ndim: int) -> None:
    if value.ndim != ndim:
        raise PeftFormatError(
            f"export_peft: {path}/{leaf} has shape {value.shape}; the HF PEFT format holds one [in, out] matrix per "
            "module, so a multi-axis (DenseGeneral / Einsum, per-head or stacked scan-layer) site cannot be written")


def _export_lora(method: str, config: Mapping, leaves: Mapping, mapping: PathMapping):
    if config.get("init") in _BASE_CHANGING_INITS:
        raise PeftFormatError(f"export_peft: LoRA with init={config['init']!r} also changes the base weights; "
                              "convert it first (jp.pissa_to_lora) so the adapter alone reproduces the model")
    rank, alpha = config["rank"], float(config["alpha"])
    tensors, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    for path in sorted(leaves, key=_layer_index):
        site = leaves[path]
        if "lora_a" not in site or "lora_b" not in site:
            raise PeftFormatError(f"export_peft: {path} lacks lora_a or lora_b (has {sorted(site)})")
        a, b = site["lora_a"], site["lora_b"]
        _check_matrix(path, "lora_a", a, 2)
        _check_matrix(path, "lora_b", b, 2)
        torch_name = mapping.torch_name(path)
        targets.append(torch_name)
        tensors[f"{PREFIX}{torch_name}.lora_A.weight"] = a.T
        tensors[f"{PREFIX}{torch_name}.lora_B.weight"] = b.T
        if method == "dora":
            if "dora_magnitude" not in site:
                raise PeftFormatError(f"export_peft: DoRA site {path} lacks dora_magnitude")
            tensors[f"{PREFIX}{torch_name}.lora_magnitude_vector"] = site["dora_magnitude"].reshape(-1)
        site_rank = a.shape[1]
        site_alpha = float(_pattern_value(config.get("alpha_pattern"), path, alpha))
        if site_rank != rank:
            rank_pattern[re.escape(torch_name)] = int(site_rank)
        if site_alpha != alpha:
            alpha_pattern[re.escape(torch_name)] = site_alpha
    hf = dict(peft_type="LORA", r=int(rank), lora_alpha=alpha, lora_dropout=float(config.get("dropout", 0.0)),
              target_modules=targets, use_rslora=bool(config.get("rslora", False)), use_dora=method == "dora",
              rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none", fan_in_fan_out=False,
              init_lora_weights=True, modules_to_save=None, layers_to_transform=None, layers_pattern=None)
    return hf, tensors


def _export_ia3(peft: Any, config: Mapping, leaves: Mapping, mapping: PathMapping):
    tensors, targets, feedforward = {}, [], []
    for path in sorted(leaves, key=_layer_index):
        scale = leaves[path]["ia3_scale"]
        torch_name = mapping.torch_name(path)
        targets.append(torch_name)
        # jaxpeft's Dense layouts: a feedforward (input-scaling) vector is [in, 1] (the kernel's rank), an
        # output vector [out]. PEFT's are [1, in] and [out, 1].
        if scale.ndim == 2 and scale.shape[1] == 1:
            feedforward.append(torch_name)
            tensors[f"{PREFIX}{torch_name}.ia3_l"] = scale.reshape(1, -1)
        else:
            _check_matrix(path, "ia3_scale", scale, 1)
            tensors[f"{PREFIX}{torch_name}.ia3_l"] = scale[:, None]
    hf = dict(peft_type="IA3", target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=False,
              init_ia3_weights=True, modules_to_save=None)
    return hf, tensors


def _model_dims(model_config: Any, method: str) -> tuple[int, int, int]:
    """``(token_dim, num_layers, num_attention_heads)`` as PEFT's ``_prepare_prompt_learning_config`` sets them.

    Prompt tuning: ``token_dim`` is the model width. Prefix tuning on a grouped-query model (the config has
    ``num_key_value_heads``, e.g. Gemma 3): PEFT sizes the cache entries of one layer as the key/value
    projection's output, ``token_dim = head_dim * num_key_value_heads`` (``head_dim`` from the config, else
    ``hidden_size // num_attention_heads``) and ``num_attention_heads = num_key_value_heads``.
    """
    from jaxpeft.models.gemma import GemmaConfig

    if model_config is None:
        raise PeftFormatError(f"export_peft: {method} needs model_config= (hidden_size, num_hidden_layers, "
                              "num_attention_heads; a transformers config, its config.json dict or a GemmaConfig) "
                              "for PEFT's prompt-learning config")
    if isinstance(model_config, GemmaConfig):
        model_config = {"hidden_size": model_config.d_model, "num_hidden_layers": model_config.num_layers,
                        "num_attention_heads": model_config.num_heads,
                        "num_key_value_heads": model_config.num_kv_heads, "head_dim": model_config.head_dim}
    if isinstance(model_config, Mapping):
        get, has = model_config.__getitem__, model_config.__contains__
    else:
        get, has = (lambda k: getattr(model_config, k)), (lambda k: getattr(model_config, k, None) is not None)
    try:
        d, layers, heads = int(get("hidden_size")), int(get("num_hidden_layers")), int(get("num_attention_heads"))
    except (KeyError, AttributeError) as e:
        raise PeftFormatError(f"export_peft: model_config lacks {e}") from e
    if method == "prefix tuning" and has("num_key_value_heads"):
        head_dim = int(get("head_dim")) if has("head_dim") and get("head_dim") is not None else d // heads
        heads = int(get("num_key_value_heads"))
        d = head_dim * heads
    return d, layers, heads


def _prompt_learning_config(peft_type: str, n: int, dims: tuple[int, int, int]) -> dict:
    d, layers, heads = dims
    return dict(peft_type=peft_type, num_virtual_tokens=int(n), token_dim=d, num_layers=layers,
                num_attention_heads=heads, num_transformer_submodules=1, modules_to_save=None)


def _export_prompt(config: Mapping, leaves: Mapping, model_config: Any):
    embeddings = leaves.get("prompt", {}).get("embeddings")
    if embeddings is None:
        raise PeftFormatError(f"export_peft: no prompt/embeddings leaf among {sorted(leaves)}")
    dims = _model_dims(model_config, "prompt tuning")
    if embeddings.shape != (config["length"], dims[0]):
        raise PeftFormatError(f"export_peft: prompt/embeddings has shape {embeddings.shape}, expected "
                              f"({config['length']}, {dims[0]})")
    hf = _prompt_learning_config("PROMPT_TUNING", config["length"], dims)
    hf.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    return hf, {"prompt_embeddings": embeddings}


def _export_prefix(config: Mapping, leaves: Mapping, mapping: PathMapping, model_config: Any):
    if config.get("reparam") is not None:
        raise PeftFormatError(f"export_peft: prefix tuning with reparam={config['reparam']!r} has no PEFT "
                              "checkpoint form jaxpeft writes; fold it first (jp.fold) to plain prefixes")
    if mapping.prefix_sites is None:
        raise PeftFormatError("export_peft: prefix tuning needs a mapping with prefix_sites (the key and value "
                              "projection of each layer)")
    dims = _model_dims(model_config, "prefix tuning")
    d, layers, _ = dims
    blocks = []
    for i in range(layers):
        for template in mapping.prefix_sites:
            path = template.format(i=i)
            if path not in leaves or "prefix" not in leaves[path]:
                raise PeftFormatError(f"export_peft: PEFT's prefix tuning extends every layer's key and value; "
                                      f"{path}/prefix is missing (prefix sites found: {sorted(leaves)[:6]})")
            blocks.append(leaves[path]["prefix"])
    extra = set(leaves) - {t.format(i=i) for i in range(layers) for t in mapping.prefix_sites}
    if extra:
        raise PeftFormatError(f"export_peft: prefixes at {sorted(extra)} are not key/value projections of a layer")
    for block in blocks:
        if block.shape != (config["length"], d):
            raise PeftFormatError(f"export_peft: a prefix has shape {block.shape}, expected ({config['length']}, {d}): "
                                  "[P, the key/value projection's output width] (PEFT's token_dim; with "
                                  "grouped-query attention num_key_value_heads * head_dim)")
    return _prompt_learning_config("PREFIX_TUNING", config["length"], dims) | dict(
        prefix_projection=False, encoder_hidden_size=d), {"prompt_embeddings": np.concatenate(blocks, axis=1)}


# ------------------------------------------------------------------------------------------------ import


def _read(directory: pathlib.Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"import_peft: {p} not found (a PEFT adapter directory holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}; adapter_model.bin is not read)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PeftFormatError(f"import_peft: {config_path} is not JSON: {e}") from e
    peft_type = config.get("peft_type")
    if peft_type not in _SUPPORTED:
        raise PeftFormatError(f"import_peft: {config_path}: peft_type {peft_type!r} is not supported "
                              f"(supported: {list(_SUPPORTED)})")
    return config, load_file(str(weights_path))


def _refuse_options(config: Mapping, where: pathlib.Path) -> None:
    checks = {
        "modules_to_save": lambda v: v, "layer_replication": lambda v: v, "trainable_token_indices": lambda v: v,
        "target_parameters": lambda v: v, "use_qalora": lambda v: v, "lora_bias": lambda v: v,
        "alora_invocation_tokens": lambda v: v, "fan_in_fan_out": lambda v: v,
        "bias": lambda v: v not in (None, "none"),
        "init_lora_weights": lambda v: isinstance(v, str) and v.split("_")[0].lower() in _BASE_CHANGING_INITS,
        "num_transformer_submodules": lambda v: v not in (None, 1),
        "prefix_projection": lambda v: v,
    }
    for key, bad in checks.items():
        if key in config and bad(config[key]):
            raise PeftFormatError(f"import_peft: {where}: {key}={config[key]!r} has no jaxpeft equivalent")


def _model_kernels(model_params: Any) -> dict[str, tuple[int, ...]] | None:
    if model_params is None:
        return None
    kernels = {}
    for path, value in _flatten(model_params).items():
        module, _, leaf = path.rpartition("/")
        if leaf == "kernel":
            kernels[module.removesuffix("/base_layer")] = tuple(value.shape)
    return kernels


def import_peft(directory: str | os.PathLike, *, mapping: str | PathMapping = "bert", params: Any = None,
                adapter: str = "default") -> tuple[Any, dict]:
    """Read a HF PEFT adapter directory as ``(transform, adapter)``.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      mapping: a registered mapping name or a ``PathMapping`` (torch module names -> Flax paths).
      params: optional base params (Linen tree, NNX model or state): every target module must exist there
        with a kernel of the adapter's shapes, checked before anything is built.
      adapter: the jaxpeft adapter name to give the result.

    Returns:
      ``(transform, adapter_tree)``: a jaxpeft transform equal to the PEFT config, and a nested dict of the
      adapter's leaves at their module paths (``jp.insert(params, adapter_tree)`` after ``jp.apply``).
    """
    import jax.numpy as jnp

    import jaxpeft as jp

    directory = pathlib.Path(directory)
    mapping = get_mapping(mapping)
    config, tensors = _read(directory)
    _refuse_options(config, directory / CONFIG_NAME)
    kernels = _model_kernels(params)
    suffix = "" if adapter == "default" else f"@{adapter}"
    peft_type = config["peft_type"]
    flat: dict[str, Any] = {}

    def check_site(path: str, name: str, d_in: int | None, d_out: int | None):
        if kernels is None:
            return
        if path not in kernels:
            near = sorted(kernels, key=lambda k: -len(os.path.commonprefix([k, path])))[:3]
            raise PeftFormatError(f"import_peft: target module {name!r} maps to {path!r}, which is not a layer of "
                                  f"the model (nearest: {near})")
        shape = kernels[path]
        if len(shape) != 2 or (d_in is not None and shape[0] != d_in) or (d_out is not None and shape[1] != d_out):
            raise PeftFormatError(f"import_peft: {name!r} -> {path!r}: kernel {shape} does not fit the adapter "
                                  f"(in {d_in}, out {d_out})")

    if peft_type in ("LORA", "IA3"):
        sites: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector"
                             rf"(?:\.weight)?|ia3_l)", key)
            if not m:
                raise PeftFormatError(f"import_peft: {directory / WEIGHTS_NAME}: tensor {key!r} is not a "
                                      f"{peft_type} tensor jaxpeft reads")
            sites.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = value
        if not sites:
            raise PeftFormatError(f"import_peft: {directory / WEIGHTS_NAME} holds no tensors")
        paths = {name: mapping.flax_path(name) for name in sites}
        targets = "^(?:" + "|".join(re.escape(p) for p in sorted(paths.values(), key=_layer_index)) + ")$"
        if peft_type == "LORA":
            r, alpha = int(config["r"]), float(config["lora_alpha"])
            rank_pattern, alpha_pattern = {}, {}
            for name, site in sites.items():
                if "lora_A" not in site or "lora_B" not in site:
                    raise PeftFormatError(f"import_peft: module {name!r} lacks lora_A or lora_B")
                a, b = site["lora_A"], site["lora_B"]
                check_site(paths[name], name, a.shape[1], b.shape[0])
                if config.get("use_dora") and "lora_magnitude_vector" not in site:
                    raise PeftFormatError(f"import_peft: DoRA module {name!r} lacks lora_magnitude_vector")
                site_r = a.shape[0]
                if site_r != _peft_pattern_value(config.get("rank_pattern"), name, r):
                    raise PeftFormatError(f"import_peft: module {name!r} has rank {site_r}, the config says "
                                          f"{_peft_pattern_value(config.get('rank_pattern'), name, r)}")
                site_alpha = float(_peft_pattern_value(config.get("alpha_pattern"), name, alpha))
                anchored = "^" + re.escape(paths[name]) + "$"
                if site_r != r:
                    rank_pattern[anchored] = site_r
                if site_alpha != alpha:
                    alpha_pattern[anchored] = site_alpha
                flat[f"{paths[name]}/lora_a{suffix}"] = jnp.asarray(a.T)
                flat[f"{paths[name]}/lora_b{suffix}"] = jnp.asarray(b.T)
                if config.get("use_dora"):
                    flat[f"{paths[name]}/dora_magnitude{suffix}"] = jnp.asarray(site["lora_magnitude_vector"])
            common = dict(rank=r, alpha=alpha, targets=targets, rslora=bool(config.get("use_rslora", False)),
                          dropout=float(config.get("lora_dropout", 0.0)), adapter=adapter)
            if config.get("use_dora"):
                if rank_pattern or alpha_pattern:
                    raise PeftFormatError("import_peft: DoRA with rank_pattern / alpha_pattern: jaxpeft's DoRA has "
                                          "one rank and alpha for all sites")
                transform = jp.dora(**common)
            else:
                transform = jp.lora(**common, rank_pattern=rank_pattern or None, alpha_pattern=alpha_pattern or None)
        else:
            feedforward_names = set()
            for name, site in sites.items():
                scale = site["ia3_l"]
                if scale.ndim != 2 or 1 not in scale.shape:
                    raise PeftFormatError(f"import_peft: {name}.ia3_l has shape {scale.shape}, expected [1, in] or "
                                          "[out, 1]")
                # PEFT: [1, in] scales the input (a feedforward module), [out, 1] the output.
                ff = scale.shape[0] == 1 and (scale.shape[1] != 1 or name in (config.get("feedforward_modules") or []))
                if ff:
                    feedforward_names.add(name)
                    check_site(paths[name], name, scale.shape[1], None)
                    flat[f"{paths[name]}/ia3_scale{suffix}"] = jnp.asarray(scale.reshape(-1, 1))
                else:
                    check_site(paths[name], name, None, scale.shape[0])
                    flat[f"{paths[name]}/ia3_scale{suffix}"] = jnp.asarray(scale.reshape(-1))
            ff_regex = ("^(?:" + "|".join(re.escape(paths[n]) for n in sorted(feedforward_names)) + ")$"
                        if feedforward_names else "(?!)")  # (?!) matches nothing
            transform = jp.ia3(targets=targets, feedforward=ff_regex, adapter=adapter)
        return transform, _nest(flat)

    n, d = int(config["num_virtual_tokens"]), int(config["token_dim"])
    if set(tensors) != {"prompt_embeddings"}:
        raise PeftFormatError(f"import_peft: {directory / WEIGHTS_NAME}: expected only 'prompt_embeddings', got "
                              f"{sorted(tensors)}")
    embeddings = tensors["prompt_embeddings"]
    if peft_type == "PROMPT_TUNING":
        if embeddings.shape != (n, d):
            raise PeftFormatError(f"import_peft: prompt_embeddings has shape {embeddings.shape}, expected ({n}, {d})")
        name = "prompt" if adapter == "default" else f"prompt@{adapter}"
        return jp.prompt_tuning(n, adapter=adapter), {name: {"embeddings": jnp.asarray(embeddings)}}
    layers = int(config["num_layers"])
    if embeddings.shape != (n, layers * 2 * d):
        raise PeftFormatError(f"import_peft: prompt_embeddings has shape {embeddings.shape}, expected "
                              f"({n}, {layers} * 2 * {d})")
    if mapping.prefix_sites is None:
        raise PeftFormatError("import_peft: prefix tuning needs a mapping with prefix_sites")
    blocks = embeddings.reshape(n, layers * 2, d)
    site_paths = []
    for i in range(layers):
        for j, template in enumerate(mapping.prefix_sites):
            path = template.format(i=i)
            check_site(path, path, None, d)
            site_paths.append(path)
            flat[f"{path}/prefix{suffix}"] = jnp.asarray(blocks[:, 2 * i + j])
    targets = "^(?:" + "|".join(re.escape(p) for p in site_paths) + ")$"
    return jp.prefix_tuning(n, targets=targets, adapter=adapter), _nest(flat)


def load_into_nnx(model: Any, adapter: Mapping) -> Any:
    """Put an adapter tree's leaves into a bound NNX model (in place, like any NNX state update); returns it."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    have = _flatten(pure)
    for path, value in _flatten(adapter).items():
        if path not in have:
            raise PeftFormatError(f"load_into_nnx: the model has no {path} (bind the imported transform with "
                                  "jp.apply first)")
        if tuple(have[path].shape) != tuple(value.shape):
            raise PeftFormatError(f"load_into_nnx: {path} is {tuple(have[path].shape)} in the model, "
                                  f"{tuple(value.shape)} in the adapter")
    nnx.replace_by_pure_dict(state, _merge(pure, adapter))
    nnx.update(model, state)
    return model


def _merge(base: Mapping, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
