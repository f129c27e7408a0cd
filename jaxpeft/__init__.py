"""jaxpeft: parameter-efficient fine-tuning for JAX and Flax (Linen and NNX).

Public API; everything not listed here is private and free to change.
"""

from jaxpeft.adapters import add_adapter, adapter_names, delete_adapter
from jaxpeft.bind import (
    PeftLayer,
    PeftLinen,
    PeftParam,
    adapters_disabled,
    apply,
    dequantize,
    mixed_adapters,
    peft_layers,
    quantize,
    use_adapters,
)
from jaxpeft.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    insert,
    load_metadata,
    prune,
    restore_adapter,
    save_adapter,
)
from jaxpeft.merge import merge, unmerge
from jaxpeft.methods import LoRA, Site, lora
from jaxpeft.losses import cross_entropy
from jaxpeft.quant import QuantizedArray, quant_summary
from jaxpeft.optim import decay_mask, masked_weight_decay, multi_lr, state_bytes, tree_bytes, warmup_cosine
from jaxpeft.train import EarlyStopping, TrainResult, evaluate, fit, make_eval_step, make_train_step
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
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "EarlyStopping",
    "LoRA",
    "ParamSummary",
    "PeftLayer",
    "PeftLinen",
    "PeftParam",
    "QuantizedArray",
    "Selector",
    "SelectorError",
    "Site",
    "TrainResult",
    "adapter_names",
    "adapters_disabled",
    "add_adapter",
    "apply",
    "chain",
    "combine",
    "cross_entropy",
    "decay_mask",
    "delete_adapter",
    "dequantize",
    "evaluate",
    "fingerprint",
    "fit",
    "insert",
    "leaves_with_paths",
    "load_metadata",
    "lora",
    "make_eval_step",
    "make_train_step",
    "mask",
    "masked_weight_decay",
    "merge",
    "mixed_adapters",
    "multi_lr",
    "partition",
    "paths",
    "prune",
    "restore_adapter",
    "save_adapter",
    "select",
    "state_bytes",
    "summary",
    "tree_bytes",
    "unmerge",
    "use_adapters",
    "warmup_cosine",
]
