"""jaxpeft: parameter-efficient fine-tuning for JAX and Flax (Linen and NNX).

Public API; everything not listed here is private and free to change.
"""

from jaxpeft.bind import PeftLayer, PeftLinen, PeftParam, adapters_disabled, apply, peft_layers
from jaxpeft.merge import merge, unmerge
from jaxpeft.methods import LoRA, Site, lora
from jaxpeft.transform import Chain, chain
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

__all__ = [
    "Chain",
    "LoRA",
    "ParamSummary",
    "PeftLayer",
    "PeftLinen",
    "PeftParam",
    "Selector",
    "SelectorError",
    "Site",
    "adapters_disabled",
    "apply",
    "chain",
    "combine",
    "fingerprint",
    "leaves_with_paths",
    "lora",
    "mask",
    "merge",
    "partition",
    "paths",
    "select",
    "summary",
    "unmerge",
]
