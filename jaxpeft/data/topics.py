"""A topic-classification dataset of real, human-written text found on the machine: docstrings.

In-distribution: docstrings of Python's standard library, labelled by the topic of the module they
come from. Shifted: docstrings of third-party packages that jaxpeft's own set-up installs
(numpy, scipy, requests, urllib3, chex, absl, fsspec, pygments, pyparsing, ...), labelled by the same
topics: the same labels in another community's writing style (numpydoc sections, other vocabulary).
See docs/data.md for the provenance of every label.

Deterministic: files are read in sorted order and each text's split is a hash of the text itself,
so the same installed versions give the same dataset on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import pathlib
import sysconfig
from collections.abc import Mapping, Sequence

from jaxpeft.data.docstrings import docstrings_in_file, python_files

__all__ = ["Example", "TextDataset", "DatasetError", "TOPICS", "Topic", "load_docstring_topics", "check_dataset",
           "source_roots"]


class DatasetError(ValueError):
    """A dataset that cannot be trained on: an empty split, a label without examples, a missing source."""


@dataclasses.dataclass(frozen=True)
class Topic:
    """One label: its name, a natural-language description (for zero-shot) and where its text comes from.

    ``stdlib`` are paths under the standard library; ``shifted`` are ``"package"`` or
    ``"package/subpath"`` of installed distributions.
    """

    name: str
    description: str
    stdlib: tuple[str, ...]
    shifted: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic("math", "mathematics: numbers, arithmetic, statistics, linear algebra and random numbers",
          ("statistics.py", "fractions.py", "_pydecimal.py", "random.py", "numbers.py", "colorsys.py"),
          ("numpy/linalg", "numpy/polynomial", "numpy/random", "numpy/fft", "numpy/lib/_function_base_impl.py",
           "scipy/linalg", "scipy/stats", "scipy/special", "scipy/integrate", "scipy/optimize")),
    Topic("web", "networking and the internet: HTTP requests, URLs, sockets, servers and email",
          ("http", "urllib", "email", "smtplib.py", "ftplib.py", "imaplib.py", "poplib.py", "xmlrpc",
           "socketserver.py", "ipaddress.py", "ssl.py", "socket.py", "wsgiref", "mailbox.py", "nntplib.py"),
          ("requests", "urllib3", "idna", "huggingface_hub/utils/_http.py")),
    Topic("testing", "testing and debugging: test cases, assertions, fixtures, debuggers and profilers",
          ("unittest", "doctest.py", "pdb.py", "bdb.py", "trace.py", "timeit.py", "profile.py", "pstats.py",
           "tracemalloc.py", "traceback.py", "cProfile.py"),
          ("chex", "numpy/testing", "absl/testing", "jax/_src/test_util.py")),
    Topic("files", "files and directories: paths, reading and writing files, archives and compression",
          ("shutil.py", "pathlib.py", "glob.py", "tarfile.py", "zipfile.py", "tempfile.py", "filecmp.py",
           "fileinput.py", "gzip.py", "bz2.py", "lzma.py", "os.py", "fnmatch.py", "shelve.py"),
          ("fsspec", "filelock", "huggingface_hub/file_download.py", "orbax/checkpoint/_src/path", "etils/epath")),
    Topic("text", "text processing: strings, regular expressions, parsing, tokenizing and templates",
          ("re", "string.py", "textwrap.py", "difflib.py", "html", "gettext.py", "shlex.py", "tokenize.py",
           "argparse.py", "optparse.py", "_markupbase.py", "stringprep.py", "csv.py", "codecs.py", "encodings",
           "pprint.py", "reprlib.py", "locale.py", "quopri.py"),
          ("pygments/lexer.py", "pygments/lexers/python.py", "pygments/formatters", "markdown_it", "pyparsing",
           "yaml")),
)

SPLITS = ("train", "validation", "test", "shifted")


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled text. ``source`` is ``"<origin>:<file relative to its root>:<qualified name>"``."""

    text: str
    label: int
    source: str


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Labels and their splits. ``splits[name]`` is a tuple of ``Example`` in a fixed order."""

    labels: tuple[str, ...]
    descriptions: tuple[str, ...]
    splits: Mapping[str, tuple[Example, ...]]

    def texts(self, split: str) -> list[str]:
        return [e.text for e in self._split(split)]

    def label_ids(self, split: str) -> list[int]:
        return [e.label for e in self._split(split)]

    def counts(self) -> dict[str, list[int]]:
        """``{split: [number of examples of each label]}``."""
        return {s: [sum(e.label == i for e in xs) for i in range(len(self.labels))] for s, xs in self.splits.items()}

    def _split(self, split: str) -> tuple[Example, ...]:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _package_root(spec: str) -> tuple[str, pathlib.Path]:
    """``"numpy/linalg"`` -> the installed path, found without importing the package."""
    top, _, rest = spec.partition("/")
    found = importlib.util.find_spec(top)
    if found is None:
        raise DatasetError(f"source package {top!r} (for {spec!r}) is not installed; "
                           f"install jaxpeft's extras (pip install -e '.[examples]') or drop it from the topic")
    if found.submodule_search_locations:
        root = pathlib.Path(list(found.submodule_search_locations)[0])
        return top, root / rest if rest else root
    if rest or found.origin is None or not found.origin.endswith(".py"):
        raise DatasetError(f"source {spec!r}: {top!r} is a single module ({found.origin}), not a package "
                           f"with a sub-path")
    return top, pathlib.Path(found.origin)  # a single-file module: just that file


def source_roots(topics: Sequence[Topic] = TOPICS) -> list[pathlib.Path]:
    """Every file or directory the topics read, standard library first (raises for a missing package)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    roots = [stdlib / rel for t in topics for rel in t.stdlib]
    return roots + [_package_root(spec)[1] for t in topics for spec in t.shifted]


def _collect(origin: str, root: pathlib.Path, base: pathlib.Path, label: int, min_words: int) -> list[Example]:
    if not root.exists():
        raise DatasetError(f"source {origin}:{root} does not exist (installed version moved it?)")
    out = []
    for path in python_files(root):
        rel = path.relative_to(base).as_posix()
        for name, text in docstrings_in_file(path, min_words=min_words):
            out.append(Example(text, label, f"{origin}:{rel}:{name}"))
    return out


def load_docstring_topics(
    topics: Sequence[Topic] = TOPICS,
    *,
    max_per_label: int | None = 400,
    max_shifted_per_label: int | None = 200,
    fractions: tuple[float, float] = (0.7, 0.15),
    min_words: int = 6,
    check: bool = True,
) -> TextDataset:
    """Build the docstring-topic dataset from the installed standard library and packages.

    Args:
      topics: the labels and their sources (default ``TOPICS``).
      max_per_label: in-distribution examples kept per label (the lowest text hashes: a fixed,
        unbiased subsample), before the train / validation / test split; None keeps all.
      max_shifted_per_label: shifted examples kept per label, the same way.
      fractions: train and validation fractions of the in-distribution examples; the rest is test.
      min_words: docstrings shorter than this after cleaning are dropped.
      check: run ``check_dataset`` (an empty split or a label without examples raises ``DatasetError``).

    Returns:
      a ``TextDataset`` with splits ``train``, ``validation``, ``test`` (standard library) and
      ``shifted`` (third-party packages). A text found in both sources, or twice, is kept once, in
      the standard library.
    """
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    in_dist: list[Example] = []
    shifted: list[Example] = []
    for label, topic in enumerate(topics):
        examples = []
        for rel in topic.stdlib:
            examples += _collect("stdlib", stdlib / rel, stdlib, label, min_words)
        kept = _dedupe(examples, seen)
        in_dist += sorted(kept, key=lambda e: _hash(e.text))[:max_per_label]
    for label, topic in enumerate(topics):
        examples = []
        for spec in topic.shifted:
            top, root = _package_root(spec)
            depth = len(pathlib.Path(spec).parts) if root.is_dir() else 1  # relative to the package's parent
            examples += _collect(top, root, root.parents[depth - 1], label, min_words)
        kept = _dedupe(examples, seen)
        shifted += sorted(kept, key=lambda e: _hash(e.text))[:max_shifted_per_label]
    train_end, val_end = fractions[0], fractions[0] + fractions[1]
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for e in in_dist:
        u = (_hash("split:" + e.text) % 10_000) / 10_000
        splits["train" if u < train_end else "validation" if u < val_end else "test"].append(e)
    splits["shifted"] = shifted
    ordered = {s: tuple(sorted(xs, key=lambda e: _hash(e.text))) for s, xs in splits.items()}
    dataset = TextDataset(tuple(t.name for t in topics), tuple(t.description for t in topics), ordered)
    if check:
        check_dataset(dataset)
    return dataset


def _dedupe(examples: list[Example], seen: set[str]) -> list[Example]:
    out = []
    for e in examples:
        key = e.text.lower()
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def check_dataset(dataset: TextDataset, splits: Sequence[str] | None = None) -> None:
    """Raise ``DatasetError`` naming the split, or the split and label, that has no examples.

    Call it before any training: an empty split makes every metric NaN, a label without training
    examples can never be learned, one without test examples can never be measured.
    """
    names = list(dataset.splits) if splits is None else list(splits)
    for split in names:
        if split not in dataset.splits:
            raise DatasetError(f"dataset has no split {split!r}; it has {sorted(dataset.splits)}")
        examples = dataset.splits[split]
        if not examples:
            raise DatasetError(f"split {split!r} is empty: no examples came out of its sources")
        for i, name in enumerate(dataset.labels):
            if not any(e.label == i for e in examples):
                raise DatasetError(f"label {name!r} has no examples in split {split!r} "
                                   f"(counts per label: {dict(zip(dataset.labels, dataset.counts()[split]))})")
        bad = sorted({e.label for e in examples if not 0 <= e.label < len(dataset.labels)})
        if bad:
            raise DatasetError(f"split {split!r} has label ids {bad} outside 0..{len(dataset.labels) - 1}")
