"""Real-text datasets built at run time from text already on the machine (nothing is downloaded)."""

from jaxpeft.data.docstrings import clean_docstring, docstrings_in_file, python_files
from jaxpeft.data.topics import (
    TOPICS,
    DatasetError,
    Example,
    TextDataset,
    Topic,
    check_dataset,
    load_docstring_topics,
)

__all__ = [
    "TOPICS",
    "DatasetError",
    "Example",
    "TextDataset",
    "Topic",
    "check_dataset",
    "clean_docstring",
    "docstrings_in_file",
    "load_docstring_topics",
    "python_files",
]
