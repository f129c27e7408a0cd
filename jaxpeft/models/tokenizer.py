"""A ``tokenizers.Tokenizer`` for Gemma, built from a GGUF file's metadata (no tokenizer.json needed).

Gemma's tokenizer is SentencePiece BPE with byte fallback: spaces become ``"▁"``, no prefix space is
added, unknown characters fall back to ``<0xNN>`` byte tokens, and control / user-defined tokens
(``<bos>``, ``<start_of_turn>``, newline runs, ...) match whole. The GGUF holds the pieces, their
scores and types but no merge list; the merges are rebuilt from the vocabulary: every split of a piece
into two pieces is a merge, ranked by the piece's position in the vocabulary (Gemma's pieces are
stored in merge order; its scores do not follow that order).
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxpeft.models import _cache

__all__ = ["TokenizerError", "load_gguf_tokenizer"]

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


class TokenizerError(ValueError):
    """A GGUF whose tokenizer metadata is missing or of a kind this builder does not know."""


def _field(reader, path, key, required=True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise TokenizerError(f"{path}: tokenizer metadata {key!r} is missing")
        return None
    return field.contents()


def _merges(tokens: list[str], vocab: dict[str, int], skip: set[int]) -> list[tuple[str, str]]:
    ranked = []
    for index, token in enumerate(tokens):
        if index in skip or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def load_gguf_tokenizer(path: str | os.PathLike, *, cache: bool = True):
    """Build Gemma's tokenizer from the metadata of a GGUF file.

    Args:
      path: the ``.gguf`` file.
      cache: keep the built tokenizer as JSON under the cache directory (``$JAXPEFT_CACHE``, else
        ``$XDG_CACHE_HOME/jaxpeft``, else ``~/.cache/jaxpeft``), keyed by the file's sha256 and the
        converter version (reading 262k pieces through ``gguf.GGUFReader`` takes most of a minute on a
        small CPU). The entry is hash-checked on read; a corrupt one warns ``CacheCorruptWarning`` and
        is rebuilt.

    Returns:
      a ``tokenizers.Tokenizer``: ``encode(text).ids`` starts with ``<bos>`` when the file says
      ``add_bos_token``; ``decode(ids)`` inverts it.

    Raises:
      TokenizerError: missing tokenizer metadata or a tokenizer model other than SentencePiece
        (``tokenizer.ggml.model == "llama"``), naming the file and the key.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cached = expect = None
    if cache:
        digest = _cache.file_sha256(path)
        cached = _cache.cache_dir() / f"gemma3-tokenizer-{digest[:32]}-v{_cache.CONVERTER_VERSION}.json"
        expect = {"gguf_sha256": digest, "converter_version": str(_cache.CONVERTER_VERSION)}
        body = _cache.read_checked_json(cached, expect)
        if body is not None:
            return Tokenizer.from_str(body)
    reader = gguf.GGUFReader(str(path))
    kind = _field(reader, path, "tokenizer.ggml.model")
    if kind != "llama":
        raise TokenizerError(f"{path}: tokenizer.ggml.model is {kind!r}; only SentencePiece ('llama') is supported")
    tokens = list(_field(reader, path, "tokenizer.ggml.tokens"))
    types = list(_field(reader, path, "tokenizer.ggml.token_type"))
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    # The file spells whitespace-only pieces with real spaces; the normalizer turns spaces into "▁".
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    special = {i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)}
    # User-defined pieces ("\n\n", "<start_of_image>") match whole; runs of spaces are ordinary pieces.
    user = {i for i, t in enumerate(types) if t == _USER_DEFINED and not tokens[i].startswith(SPACE)}
    unk_id = _field(reader, path, "tokenizer.ggml.unknown_token_id", required=False)
    unk = tokens[unk_id] if unk_id is not None else None
    byte = {i for i, t in enumerate(types) if t == _BYTE}
    model = models.BPE(vocab=vocab, merges=_merges(tokens, vocab, special | user | byte),
                       unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in sorted(user)])
    if _field(reader, path, "tokenizer.ggml.add_bos_token", required=False):
        bos = tokens[int(_field(reader, path, "tokenizer.ggml.bos_token_id"))]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    if cached is not None:
        _cache.write_checked_json(cached, tokenizer.to_str(), expect)
    return tokenizer
