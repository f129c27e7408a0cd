"""``jaxpeft convert``: jaxpeft adapter checkpoints <-> HF PEFT adapter directories."""

from __future__ import annotations

import argparse
import json
import pathlib
from jaxpeft.interop.hf_peft import PeftFormatError, export_peft, import_peft
from jaxpeft.interop.mapping import mappings
from jaxpeft.registry import from_config

USAGE = """usage:
  jaxpeft convert to-peft   JAXPEFT_ADAPTER_DIR PEFT_DIR [--mapping bert] [--model-config config.json]
  jaxpeft convert from-peft PEFT_DIR JAXPEFT_ADAPTER_DIR [--mapping bert]
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxpeft convert", usage=USAGE)
    parser.add_argument("direction", choices=("to-peft", "from-peft"))
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--mapping", default="bert", help=f"module-path mapping: one of {mappings()}")
    parser.add_argument("--model-config", help="to-peft, prompt/prefix tuning: the model's HF config.json")
    parser.add_argument("--base-model", help="to-peft: base_model_name_or_path to record")
    args = parser.parse_args(argv)
    import jaxpeft as jp

    if args.direction == "to-peft":
        adapter, metadata = jp.restore_adapter(args.source)
        if not metadata.get("config"):
            raise PeftFormatError(f"convert: {args.source} was saved without a transform config; "
                                  "save it with jp.save_adapter(..., config=peft)")
        peft = from_config(metadata["config"], where=str(args.source))
        model_config = None
        if args.model_config:
            model_config = json.loads(pathlib.Path(args.model_config).read_text())
        out = export_peft(args.destination, peft, adapter, mapping=args.mapping, model_config=model_config,
                          base_model_name_or_path=args.base_model)
    else:
        peft, adapter = import_peft(args.source, mapping=args.mapping)
        out = jp.save_adapter(args.destination, adapter, config=peft.config())
    print(f"jaxpeft convert {args.direction}: wrote {out}")
    return 0
