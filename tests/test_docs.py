"""Every ```python block in docs/ and README.md runs: the docs never rot."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks():
    for page in PAGES:
        if page.exists():
            for i, code in enumerate(BLOCK.findall(page.read_text())):
                yield pytest.param(code, id=f"{page.name}[{i}]")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__doc_snippet__"})


def test_every_doc_page_has_a_runnable_snippet():
    missing = [p.name for p in PAGES if p.exists() and p.name != "README.md" and not BLOCK.search(p.read_text())]
    assert not missing, f"doc pages without a ```python snippet: {missing}"
