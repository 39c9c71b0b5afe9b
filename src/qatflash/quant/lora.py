"""QAT with LoRA: low-rank adapters trained beside a frozen, fake-quantized base, merged into it
before conversion (torchao's and torchtune's QAT + LoRA recipe, through peft).

After the recipe has prepared the model, peft's LoRA wraps each target's fake-quantized Linear
(`Recipe.prepared_linear`): the output is the base layer's, fake-quantized as in full QAT, plus
(alpha / r) · B·A·x in float. Only the adapters train, and the float Linears the recipe leaves out
(the task's head), unless their weight is the input embeddings' (a tied LM head stays frozen with
them). At the end of the fit the adapters are merged into the base weights (W + (alpha / r)·B·A)
and their wrappers removed, so evaluation, ONNX export and conversion see a plain prepared model;
the recipe then sets the weights' ranges again for the merged weights (`Recipe.reobserve_weights`).
Not simulated in training: the adapters' term joins after the base layer's fake quantization (for
torch.ao eager after its output's too), so the merged weight's rounding is first met at conversion.
"""

from __future__ import annotations

from torch import nn

from qatflash.config import LoraConfig
from qatflash.quant.targeting import replace_module


def add_adapters(model: nn.Module, linears: list[str], cfg: LoraConfig) -> int:
    """Wrap `linears` (names in `model`) with LoRA adapters in place and freeze what they adapt;
    returns the number of trainable parameters."""
    import peft

    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=linears)
    peft.inject_adapter_in_model(config, model)
    # peft freezes all but the adapters; the head the recipe leaves float trains too.
    tied = model.get_input_embeddings().weight
    for module in model.modules():
        if type(module) is nn.Linear and module.weight is not tied:
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapters(model: nn.Module) -> int:
    """Each LoRA layer's adapter merged into its base weight, the layer replaced by its base; returns
    how many were merged (0 once merged)."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        replace_module(model, name, layer.get_base_layer())
    return len(layers)
