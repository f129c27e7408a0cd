"""Interoperability: Hugging Face PEFT adapter directories in and out, and module-path mappings."""

from jaxpeft.interop.hf_peft import PeftFormatError, export_peft, import_peft, load_into_nnx
from jaxpeft.interop.mapping import PathMapping, get_mapping, mappings, register_mapping

__all__ = ["PeftFormatError", "export_peft", "import_peft", "load_into_nnx", "PathMapping", "get_mapping",
           "mappings", "register_mapping"]
