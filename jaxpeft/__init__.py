"""jaxpeft: parameter-efficient fine-tuning for JAX and Flax."""

from jaxpeft.tree import (
    ParamSummary,
    Selector,
    SelectorError,
    combine,
    fingerprint,
    leaves_with_paths,
    mask,
    partition,
    paths,
    select,
    summary,
)

__version__ = "0.1.0"
