"""The docstring-topic dataset (extraction, determinism, splits, bad input) and BERT's masked-LM inputs."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Masked-LM inputs (jaxpeft.data.mlm): BERT's 15% with 80/10/10
# ---------------------------------------------------------------------------------------------

def _mlm_corpus(rows=3000, seq=40, vocab=1000, seed=0):
    """[CLS]=1 ... [SEP]=2 then padding 0; ordinary ids 5..vocab-1; lengths 3..seq."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, (rows, seq)).astype(np.int32)
    lengths = rng.integers(3, seq + 1, rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    tokens[:, 0] = 1
    tokens[np.arange(rows), lengths - 1] = 2
    tokens[mask == 0] = 0
    return tokens, mask, lengths


def test_masking_chooses_bert_count_of_ordinary_tokens_and_replaces_80_10_10():
    """Against BERT's rule (create_pretraining_data.py) recomputed from the input, and binomial bounds (5 sigma)."""
    from jaxpeft.data.mlm import mask_tokens

    vocab, mask_id = 1000, 3
    tokens, mask, lengths = _mlm_corpus(vocab=vocab)
    before = tokens.copy()
    out = mask_tokens(tokens, mask, np.random.default_rng(1), mask_id=mask_id, vocab_size=vocab, special_ids=(1, 2))
    np.testing.assert_array_equal(tokens, before)  # the caller's array is untouched
    k = round(tokens.shape[1] * 0.15)
    assert out["positions"].shape == out["targets"].shape == out["weights"].shape == (len(tokens), k)
    ordinary = lengths - 2  # real tokens minus [CLS] and [SEP]
    np.testing.assert_array_equal(out["weights"].sum(1), np.minimum(k, np.maximum(1, np.round(ordinary * 0.15))))
    chosen = np.zeros_like(mask, dtype=bool)
    for row in range(len(tokens)):
        pos = out["positions"][row, out["weights"][row] > 0]
        assert len(set(pos)) == len(pos) and np.all((pos >= 1) & (pos <= lengths[row] - 2)), row  # ordinary only
        chosen[row, pos] = True
        np.testing.assert_array_equal(out["targets"][row, : len(pos)], tokens[row, pos])  # the original ids
    # Positions never chosen keep their token (padding, [CLS], [SEP] included).
    np.testing.assert_array_equal(out["tokens"][~chosen], tokens[~chosen])
    n = chosen.sum()
    got = out["tokens"][chosen]
    is_mask, is_same = got == mask_id, got == tokens[chosen]
    is_random = ~is_mask & ~is_same
    # A random id equals [MASK] or the original with probability 1/vocab each.
    for fraction, expected in ((is_mask.mean(), 0.8 + 0.1 / vocab), (is_same.mean(), 0.1 + 0.1 / vocab),
                               (is_random.mean(), 0.1 * (1 - 2 / vocab))):
        assert abs(fraction - expected) < 5 * np.sqrt(expected * (1 - expected) / n), (fraction, expected)
    # Random replacements are uniform over the vocabulary: mean (vocab-1)/2, sd vocab/sqrt(12).
    assert abs(got[is_random].mean() - (vocab - 1) / 2) < 5 * vocab / np.sqrt(12 * is_random.sum())
    # Every ordinary position is equally likely: the first and the last ordinary slot at 15% (rows of length >= 20).
    long = lengths >= 20
    for col in (1, 18):
        rate = chosen[long, col].mean()
        assert abs(rate - 0.15) < 5 * np.sqrt(0.15 * 0.85 / long.sum()), (col, rate)


def test_masking_is_reproducible_and_remasks_with_a_new_draw():
    from jaxpeft.data.mlm import mask_tokens

    tokens, mask, _ = _mlm_corpus(rows=20)
    kw = dict(mask_id=3, vocab_size=1000, special_ids=(1, 2))
    a = mask_tokens(tokens, mask, np.random.default_rng(7), **kw)
    b = mask_tokens(tokens, mask, np.random.default_rng(7), **kw)
    c = mask_tokens(tokens, mask, np.random.default_rng(8), **kw)
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(a["positions"], c["positions"])


def test_a_row_with_no_ordinary_token_predicts_nothing():
    from jaxpeft.data.mlm import mask_tokens

    tokens = np.array([[1, 2, 0, 0], [1, 9, 9, 2]], np.int32)
    out = mask_tokens(tokens, (tokens > 0).astype(np.int32), np.random.default_rng(0), mask_id=3, vocab_size=10,
                      special_ids=(1, 2))
    np.testing.assert_array_equal(out["weights"], [[0.0], [1.0]])
    np.testing.assert_array_equal(out["tokens"][0], tokens[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(probability=0.0), r"probability must be in \(0, 1\)"),
    (dict(replace_with_mask=0.95, replace_with_random=0.1), r"sum to at most 1"),
    (dict(mask_id=10), r"mask_id 10 is outside the vocabulary 0..9"),
    (dict(vocab_size=5), r"token ids span 1..9, outside the vocabulary 0..4"),
    (dict(max_predictions=0), r"max_predictions must be at least 1"),
])
def test_masking_bad_input_is_named(kwargs, message):
    from jaxpeft.data.mlm import mask_tokens

    tokens = np.array([[1, 9, 9, 2]], np.int32)
    options = {"mask_id": 3, "vocab_size": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        mask_tokens(tokens, np.ones_like(tokens), np.random.default_rng(0), **options)
    with pytest.raises(ValueError, match=r"tokens \(1, 4\) and mask \(4,\)"):
        mask_tokens(tokens, np.ones(4), np.random.default_rng(0), mask_id=3, vocab_size=10)


def test_gather_positions_takes_each_rows_positions():
    from jaxpeft.data.mlm import gather_positions

    values = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    positions = np.array([[4, 0], [2, 2]])
    np.testing.assert_array_equal(gather_positions(values, positions),
                                  np.stack([values[0, [4, 0]], values[1, [2, 2]]]))
    with pytest.raises(ValueError, match=r"positions \(3, 2\) must be \[batch, k\]"):
        gather_positions(values, np.zeros((3, 2), np.int32))
