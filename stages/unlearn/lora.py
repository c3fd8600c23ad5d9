"""LoRA through peft: unlearn trains low-rank adapters on the target's linear layers instead of every weight, and
the saved model is the merged one, so evaluate and everything downstream read an ordinary model folder."""

from __future__ import annotations

from stages.config import LoraConfig


def with_lora(model, lora: LoraConfig):
    """`model` with fresh adapters (only they require gradients) when lora.r > 0, else `model` itself."""
    if not lora.r:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged(module):
    """The plain model to save: adapters folded into a copy of the weights they adapt, so training can go on after
    a snapshot (the module itself without adapters)."""
    import copy

    from peft import PeftModel

    return copy.deepcopy(module).merge_and_unload() if isinstance(module, PeftModel) else module


def trainable(model) -> list:
    """The parameters the optimizer updates: the adapters under LoRA, every weight otherwise."""
    return [p for p in model.parameters() if p.requires_grad]
