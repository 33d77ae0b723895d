"""Quantized variants of a trained model for CPU serving, each a deterministic function of the
float weights: a variant is stored as the float model plus its recipe and rebuilt at load
time, so nothing quantized is pickled.

  int8          weight-only int8, one scale per output channel; activations stay in the
                model's float dtype (torchao's `Int8WeightOnlyConfig`, which runs on CPU
                with our torch). The default: LLM activations have outliers that a per-tensor
                activation scale clips, and weights alone lose almost nothing.
  int8-dynamic  weights int8 per output channel and activations quantized per tensor at run
                time (PyTorch's fbgemm kernels: the fastest CPU path here, and the lossiest on
                models with outlier activations: SmolLM2-135M's held-out loss 2.47 -> 3.91).
  int4          weight-only int4 in groups of `group_size` input weights, each group with its
                own scale (and, asymmetric, its own minimum), by llama.cpp's Q4_0 / Q4_1
                rules. torchao's int4 layouts need CUDA or its `mslk` kernels here, so
                `Int4Linear` is ours (tested against the gguf package's Q4_0 and Q4_1): two
                codes share a byte, and the forward pass dequantizes them.

Every Linear of the transformer blocks is quantized; the output head is not (it is tied to
the input embeddings in our models, so a quantized copy would add its bytes, not save them).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmpipe.runs.config import QUANTIZATIONS


def _block_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(qualified name, parent, attribute) of every nn.Linear but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (f"{prefix}.{name}".lstrip("."), parent, name)
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear) and child is not head
    ]


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose Linears are dynamically quantized to int8 (CPU only)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, whose CPU path is slower.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        quantized = torch.ao.quantization.quantize_dynamic(
            model.cpu(),
            {name: qconfig for name, _, _ in _block_linears(model)},
            dtype=torch.qint8,
            inplace=False,
        )
    return quantized.eval()


def quantize_weight_only_int8(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (in place, on the CPU) with int8 weights, one scale per output channel."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    targets = {name for name, _, _ in _block_linears(model)}
    quantize_(model.cpu(), Int8WeightOnlyConfig(), filter_fn=lambda _module, fqn: fqn in targets)
    return model.eval()


class Int4Linear(torch.nn.Module):
    """A Linear whose weight is 4-bit codes in groups of `group_size` input weights, two
    codes per byte, by llama.cpp's rules. Symmetric (Q4_0): the group's largest-magnitude
    weight w* maps to code -8, a step d = w* / -8 (finer than the max|w| / 7.5 of one scale for
    both signs), w = d x code for codes -8..7. Asymmetric (Q4_1): d = (max - min) / 15 and
    w = min + d x code for codes 0..15, the group's minimum kept as a float: a model that was
    itself Q4_1 (SmolLM2's GGUF) comes back on its own grid."""

    def __init__(self, linear: torch.nn.Linear, group_size: int, symmetric: bool) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if group_size < 2 or group_size % 2:
            raise ValueError(f"deploy.quantize.group_size={group_size}: it must be even")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        # A width that is no multiple of the group (688 = 21.5 x 32) ends in a group padded
        # with zero weights, which no input ever meets.
        weight = F.pad(linear.weight.detach().float(), (0, -in_features % group_size))
        groups = weight.reshape(out_features, -1, group_size)
        tiny = torch.finfo(torch.float32).tiny
        if symmetric:
            extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
            scale = extreme / -8
            codes = (groups / torch.where(scale == 0, tiny, scale)).round().clamp(-8, 7) + 8
            offset = None
        else:
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            scale = (high - low) / 15
            codes = ((groups - low) / torch.where(scale == 0, tiny, scale)).round().clamp(0, 15)
            offset = low.squeeze(-1)
        nibbles = codes.to(torch.uint8).reshape(out_features, -1)  # 0..15
        self.register_buffer("packed", nibbles[:, 0::2] | (nibbles[:, 1::2] << 4))
        self.register_buffer("scale", scale.squeeze(-1))
        self.register_buffer("offset", offset)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach())

    def nibbles(self) -> torch.Tensor:
        """The stored 4-bit values, unpacked: 0..15 (symmetric codes + 8)."""
        return torch.stack([self.packed & 0xF, self.packed >> 4], dim=-1).flatten(1)

    def dequantized(self) -> torch.Tensor:
        values = self.nibbles().float().reshape(self.out_features, -1, self.group_size)
        scale = self.scale.unsqueeze(-1)
        if self.offset is None:
            weight = (values - 8) * scale
        else:
            weight = values * scale + self.offset.unsqueeze(-1)
        return weight.reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, {kind}")  # fmt: skip


def quantize_int4(model: torch.nn.Module, group_size: int, symmetric: bool) -> torch.nn.Module:
    """`model` (in place, on the CPU) with every block Linear an `Int4Linear`."""
    model = model.cpu()
    for _, parent, name in _block_linears(model):
        setattr(parent, name, Int4Linear(getattr(parent, name), group_size, symmetric))
    return model.eval()


def quantizer(method: str, group_size: int = 32, symmetric: bool = True) -> Callable:
    """The function that makes variant `method` (one of QUANTIZATIONS) of a float model."""
    if method == "int8":
        return quantize_weight_only_int8
    if method == "int8-dynamic":
        return quantize_dynamic_int8
    if method == "int4":
        return lambda model: quantize_int4(model, group_size, symmetric)
    raise ValueError(f"invalid quantization {method!r} (allowed: {QUANTIZATIONS})")


def state_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's serialized state (quantized weights with their scales)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
