"""
int8 weights for CPU inference: decoding one token at a time reads every weight once per token, so a quarter of
the bytes is most of the speed (see the README's inference table).

    quantize_int8(model)     # a float32 model, in place: every nn.Linear becomes an Int8Linear
"""

import warnings

import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """An nn.Linear for CPU inference with int8 weights (one scale per output row). Each call quantizes its input
    on the fly (one scale per call), multiplies in int8 (fbgemm / oneDNN) and returns float32: a quarter of the
    weight memory to stream per token, which is what bounds the speed of generating one token at a time."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # symmetric: a row's largest weight maps to 127
        zero = torch.zeros(weight.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are marked deprecated, yet remain the way to the kernels
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated", category=UserWarning)
            qweight = torch.quantize_per_channel(weight, scale.double(), zero, axis=0, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        # reduce_range: 7-bit activations, so 16-bit pair sums cannot overflow on x86 CPUs without VNNI
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)


def quantize_int8(model):
    """Replace every nn.Linear of a float32 model by an Int8Linear, in place, for CPU inference; returns the model.

    The output layer is quantized too: in a small model it is the largest matrix, so most of the gain. Where it is
    tied to the token embedding, the input lookup keeps the float table (a lookup costs nothing to speed up): the tie
    is broken, and the model is for inference only.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
