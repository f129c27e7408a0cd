"""PEFT methods as pure array math: one file per method family, no Flax in here."""

from jaxpeft.methods.dora import DoRA, dora
from jaxpeft.methods.ia3 import IA3, ia3
from jaxpeft.methods.lokr import LoKr, lokr
from jaxpeft.methods.lora import LoRA, lora, lora_delta, lora_product, pissa_to_lora
from jaxpeft.methods.site import Site

__all__ = [
    "DoRA",
    "IA3",
    "LoKr",
    "LoRA",
    "Site",
    "dora",
    "ia3",
    "lokr",
    "lora",
    "lora_delta",
    "lora_product",
    "pissa_to_lora",
]
