"""A ``peft``-made adapter with every trainable leaf non-trivial, saved with ``save_pretrained`` (interop tests)."""

from __future__ import annotations


def saved_peft_model(torch_model, peft_config, directory, noise: float = 0.3, seed: int = 0):
    """``get_peft_model(torch_model, peft_config)``, ``noise * N(0, 1)`` added to every trainable leaf (a fresh
    LoRA B or IA3 vector would otherwise be trivial), saved to ``directory``; returns the model in eval mode."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = peft.get_peft_model(torch_model, peft_config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model.eval()
