"""The docstring-topic dataset: extraction, determinism, splits, and bad input."""

from __future__ import annotations

import textwrap
import warnings

import pytest

from jaxpeft.data import (
    DatasetError,
    Example,
    TextDataset,
    Topic,
    check_dataset,
    clean_docstring,
    docstrings_in_file,
    load_docstring_topics,
    python_files,
)

NUMPYDOC = """Compute the inverse of a matrix.

    Given a square matrix `a`, return the matrix `ainv`
    satisfying ``a @ ainv = I``.

    Parameters
    ----------
    a : array_like
    """
GOOGLE = """Save the adapter.

    Writes every leaf atomically.

    Args:
      directory: where it goes.
    """
DOCTEST = """Add two numbers together.
    >>> add(1, 2)
    3
    """


@pytest.mark.parametrize("doc, expected", [
    (NUMPYDOC, "Compute the inverse of a matrix. Given a square matrix `a`, return the matrix `ainv` "
               "satisfying ``a @ ainv = I``."),
    (GOOGLE, "Save the adapter. Writes every leaf atomically."),
    (DOCTEST, "Add two numbers together."),
    ("Params:\n  x: nothing before the section", ""),
])
def test_clean_docstring_keeps_the_prose_before_sections(doc, expected):
    assert clean_docstring(doc) == expected


def test_clean_docstring_cuts_at_a_word():
    text = clean_docstring("alpha beta gamma delta " * 10, max_chars=23)
    assert text == "alpha beta gamma delta"


def test_docstrings_in_file_reads_module_classes_and_nested_functions(tmp_path):
    source = textwrap.dedent('''
        """The module docstring has more than six words in it."""
        class Reader:
            """Read records from a file one at a time, lazily."""
            def next(self):
                """Return the next record, or raise StopIteration at the end."""
            def short(self):
                """Too short."""
        async def fetch(url):
            """Fetch the page at this url and return its body."""
        def undocumented():
            pass
    ''')
    path = tmp_path / "mod.py"
    path.write_text(source)
    got = list(docstrings_in_file(path))
    assert [name for name, _ in got] == ["<module>", "Reader", "Reader.next", "fetch"]
    assert got[2][1] == "Return the next record, or raise StopIteration at the end."


def test_a_file_that_does_not_parse_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "py2.py"
    path.write_text('print "hello"\n')
    with pytest.warns(UserWarning, match="py2.py"):
        assert list(docstrings_in_file(path)) == []


def test_python_files_are_sorted_and_skip_tests(tmp_path):
    for rel in ["b.py", "a.py", "sub/c.py", "tests/t.py", "sub/test_x.py", "sub/__pycache__/c.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in python_files(tmp_path)] == ["a.py", "b.py", "sub/c.py"]


# Small topics over real installed sources: stdlib modules in-distribution, stdlib packages as "shifted".
SMALL = (
    Topic("files", "files", ("shutil.py", "glob.py", "tempfile.py"), ("zipfile",)),
    Topic("web", "web", ("http", "smtplib.py"), ("urllib",)),
    Topic("math", "math", ("statistics.py", "fractions.py", "_pydecimal.py"), ("json",)),
)


@pytest.fixture(scope="module")
def small():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_docstring_topics(SMALL, max_per_label=60, max_shifted_per_label=10, check=False)


def test_small_dataset_is_deterministic_and_disjoint(small):
    again = load_docstring_topics(SMALL, max_per_label=60, max_shifted_per_label=10, check=False)
    assert again == small
    texts = {s: {e.text for e in xs} for s, xs in small.splits.items()}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    assert small.labels == ("files", "web", "math")
    for s, xs in small.splits.items():
        for e in xs:
            origin = e.source.split(":")[0]
            assert (origin == "stdlib") == (s != "shifted"), e.source
    # Sources match the labels they were read for.
    for e in small.splits["train"]:
        path = e.source.split(":")[1]
        want = {0: ("shutil", "glob", "tempfile"), 1: ("http", "smtplib"), 2: ("statistics", "fractions", "_pydecimal")}
        assert path.startswith(want[e.label]), e.source


def test_split_of_a_text_depends_on_the_text_only(small):
    """Adding a topic does not move any other text between train / validation / test."""
    extra = SMALL + (Topic("text", "text", ("textwrap.py", "difflib.py"), ("html",)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bigger = load_docstring_topics(extra, max_per_label=60, max_shifted_per_label=10, check=False)
    for s in ("train", "validation", "test"):
        assert {e.text for e in small.splits[s]} <= {e.text for e in bigger.splits[s]}


def test_caps_and_fractions(small):
    counts = small.counts()
    per_label = [sum(counts[s][i] for s in ("train", "validation", "test")) for i in range(3)]
    assert max(per_label) <= 60 and counts["shifted"] == [10, 10, 10]
    total = sum(per_label)
    assert 0.55 < sum(counts["train"]) / total < 0.85  # 70 % by hash, with sampling noise over ~180 texts


def _dataset(splits):
    return TextDataset(("a", "b"), ("a", "b"), splits)


def test_empty_split_is_named():
    d = _dataset({"train": (Example("x", 0, "s"), Example("y", 1, "s")), "test": ()})
    with pytest.raises(DatasetError, match="split 'test' is empty"):
        check_dataset(d)


def test_label_without_examples_is_named():
    d = _dataset({"train": (Example("x", 0, "s"), Example("y", 0, "s"))})
    with pytest.raises(DatasetError, match="label 'b' has no examples in split 'train'"):
        check_dataset(d)


def test_label_id_out_of_range():
    d = _dataset({"train": (Example("x", 0, "s"), Example("y", 1, "s"), Example("z", 7, "s"))})
    with pytest.raises(DatasetError, match=r"label ids \[7\]"):
        check_dataset(d)


def test_topic_with_no_examples_fails_before_training():
    topics = SMALL[:2] + (Topic("empty", "nothing", ("this_module_does_not_exist.py",), ("json",)),)
    with pytest.raises(DatasetError, match="this_module_does_not_exist"):
        load_docstring_topics(topics)


def test_missing_source_package_is_named():
    topics = SMALL[:2] + (Topic("x", "x", ("glob.py",), ("no_such_package_jaxpeft",)),)
    with pytest.raises(DatasetError, match="no_such_package_jaxpeft"):
        load_docstring_topics(topics)


def test_label_whose_sources_yield_nothing_is_named(tmp_path, monkeypatch):
    """A source that exists but holds no usable docstring: the label has no examples -> named."""
    topics = SMALL[:2] + (Topic("silent", "silent", ("this.py",), ("json",)),)  # `this` has no docstrings
    with pytest.raises(DatasetError, match="label 'silent' has no examples"):
        load_docstring_topics(topics)


@pytest.mark.slow
def test_the_default_dataset_is_big_enough():
    d = load_docstring_topics()
    counts = d.counts()
    assert len(d.labels) >= 3 and sum(map(sum, counts.values())) >= 1000
    assert all(c > 0 for xs in counts.values() for c in xs)
