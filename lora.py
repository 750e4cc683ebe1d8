"""
LoRA (Hu et al. 2021): fine-tune a frozen model through small low-rank updates of its linear layers.

    add_lora(model, rank=8, alpha=16)      # every attention and MLP projection gets an adapter; train those
    state = merged_state_dict(model)       # the updates folded in: loads into a plain GPT, costs nothing at inference
"""

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + (alpha / rank) * B A x.

    A is (rank, in) and B is (out, rank), so a 768 x 768 layer trains 2 * 768 * rank numbers instead of 768 * 768.
    B starts at zero: training starts exactly from the pretrained model.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear uses for its own weight
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """The plain nn.Linear with the update folded into its weight: no extra cost at inference."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A)
        return self.base


LORA_TARGETS = ("qkv_proj", "out_proj", "up_proj", "down_proj")  # attention and MLP projections of every block


def add_lora(model, rank=8, alpha=16):
    """Wrap every attention and MLP projection of model.blocks in a LoRALinear; returns the model."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in LORA_TARGETS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Fold every LoRALinear back into a plain nn.Linear, in place; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def merged_state_dict(model):
    """model.state_dict() with each LoRA update folded into its weight, under the plain layers' names: it loads
    into a model without LoRA, and the training model keeps its adapters."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            delta = module.scale * (module.lora_B @ module.lora_A).detach()
            state[f"{name}.weight"] = state.pop(f"{name}.base.weight") + delta
            if f"{name}.base.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state
