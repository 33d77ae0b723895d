"""int8 dynamic quantization of a trained model for CPU serving.

Linear weights become int8 with one scale per output channel, and activations are quantized
on the fly: PyTorch's fbgemm kernels, the CPU int8 path that is faster than fp32 here
(torchao's `Int8DynamicActivationInt8WeightConfig` ran slower than fp32 on this CPU).
Per-channel scales lose less than per-tensor ones (SmolLM2-135M, held-out loss 2.04 in fp32:
3.91 per-tensor, 3.68 per-channel) and run faster (56 vs 82 ms per 64-token forward).
Quantization is a deterministic function of the weights, so the variant is stored as the fp32
model plus this recipe and rebuilt at load time: nothing quantized is pickled.
"""

from __future__ import annotations

import io
import warnings

import torch


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantized to int8 (CPU only)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, whose CPU path is slower.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.ao.quantization.quantize_dynamic(
            model.cpu(),
            {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=False,
        )
    return quantized.eval()


def state_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's serialized state (int8 weights with their scales when quantized)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
