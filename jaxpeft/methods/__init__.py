"""PEFT methods as pure array math: one file per method family, no Flax in here."""

from jaxpeft.methods.lora import LoRA, lora, lora_delta, lora_product
from jaxpeft.methods.site import Site

__all__ = ["LoRA", "Site", "lora", "lora_delta", "lora_product"]
