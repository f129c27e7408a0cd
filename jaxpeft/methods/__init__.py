"""PEFT methods as pure array math: one file per method family, no Flax in here."""

from jaxpeft.methods.dora import DoRA, dora
from jaxpeft.methods.ia3 import IA3, ia3
from jaxpeft.methods.lokr import LoKr, lokr
from jaxpeft.methods.lora import LoRA, lora, lora_delta, lora_product, pissa_to_lora
from jaxpeft.methods.protocol import ModelMethod, PeftMethod, SiteMethod
from jaxpeft.methods.site import ConvSite, EmbedSite, Site, conv_site, embed_site

__all__ = [
    "ConvSite",
    "EmbedSite",
    "ModelMethod",
    "PeftMethod",
    "SiteMethod",
    "conv_site",
    "embed_site",
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
