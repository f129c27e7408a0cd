"""Docstrings out of Python source files, read with ``ast`` (nothing is imported or executed).

One example is one docstring of a module, class or function, cut to its opening paragraphs:
the summary a human wrote, before the sections of parameters, examples or doctests.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import warnings
from collections.abc import Iterator

__all__ = ["clean_docstring", "docstrings_in_file", "python_files"]

# Where a docstring's prose ends: numpydoc / Google / reST sections, doctests, literal blocks.
_SECTION = re.compile(
    r"^\s*(>>>|\.\. |::|:param|:return|:raises|:type|@param|"
    r"(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|See Also|References|"
    r"Attributes|Keyword Arguments|Other Parameters|Warnings?|Usage|Example usage)\s*:?\s*$)",
    re.IGNORECASE,
)
_UNDERLINE = re.compile(r"^\s*[-=~^]{3,}\s*$")
_SPACE = re.compile(r"\s+")


def clean_docstring(doc: str, max_chars: int = 400) -> str:
    """The prose opening of a docstring, one line, at most ``max_chars`` characters (cut at a word).

    Args:
      doc: a raw docstring.
      max_chars: the longest text returned.

    Returns:
      the lines before the first section header, doctest or literal block, whitespace collapsed;
      ``""`` when nothing remains.
    """
    lines = inspect.cleandoc(doc).splitlines()
    kept: list[str] = []
    for i, line in enumerate(lines):
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        if _SECTION.match(line) or _UNDERLINE.match(next_line) or _UNDERLINE.match(line):
            break
        kept.append(line)
    text = _SPACE.sub(" ", " ".join(kept)).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def python_files(root: pathlib.Path, skip_dirs: tuple[str, ...] = ("test", "tests", "testing", "_vendor")) -> list[pathlib.Path]:
    """Every ``*.py`` under ``root`` (or ``root`` itself), sorted, skipping ``skip_dirs`` and ``test_*.py``."""
    root = pathlib.Path(root)
    if root.is_file():
        return [root]
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in skip_dirs or p == "__pycache__" for p in parts[:-1]) or parts[-1].startswith("test_"):
            continue
        files.append(path)
    return files


def docstrings_in_file(path: pathlib.Path, min_words: int = 6, max_chars: int = 400) -> Iterator[tuple[str, str]]:
    """``(qualified name, cleaned docstring)`` for the module and each class / function in ``path``.

    A file that does not parse is skipped with a warning (source trees hold Python 2 or template files).
    Docstrings with fewer than ``min_words`` words after cleaning are dropped.
    """
    try:
        tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8", errors="replace"), filename=str(path))
    except (SyntaxError, ValueError) as e:
        warnings.warn(f"skipping {path}: it does not parse ({e})", stacklevel=2)
        return

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=False)
                if doc:
                    text = clean_docstring(doc, max_chars)
                    if len(text.split()) >= min_words:
                        yield name, text
                yield from visit(child, name + ".")

    doc = ast.get_docstring(tree, clean=False)
    if doc:
        text = clean_docstring(doc, max_chars)
        if len(text.split()) >= min_words:
            yield "<module>", text
    yield from visit(tree, "")
