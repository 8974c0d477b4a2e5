"""Read and write the frozen weight of the layer an adapter wraps.

hadapeft's ops take a dense ``(d_out, d_in)`` weight. This module is the only place that knows how each supported
base layer stores it: ``nn.Linear`` (as is), GPT-2's ``Conv1D`` (transposed, ``(d_in, d_out)``), and bitsandbytes'
``Linear8bitLt`` / ``Linear4bit`` (quantized: dequantized for compute, re-quantized on merge).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..seam.bnb import dense_weight_4bit, guard_4bit_layer
from ..seam.hooks import dequantize_bnb_weight


def _bnb_kind(layer: nn.Module) -> str | None:
    name = type(getattr(layer, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


def layer_kind(layer: nn.Module) -> str:
    """"linear" | "conv1d" | "4bit" | "8bit"; raises TypeError for anything else."""
    bnb = _bnb_kind(layer)
    if bnb:
        return bnb
    if isinstance(layer, Conv1D):
        return "conv1d"
    if isinstance(layer, nn.Linear):
        return "linear"
    raise TypeError(f"hadapeft adapters wrap nn.Linear, transformers Conv1D and bitsandbytes Linear8bitLt/Linear4bit "
                    f"layers; got {type(layer).__name__}")


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    return layer.in_features, layer.out_features


def dense_weight(layer: nn.Module, kind: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The frozen weight as a dense (d_out, d_in) tensor (a view where possible)."""
    if kind == "linear":
        w = layer.weight
    elif kind == "conv1d":
        w = layer.weight.t()
    elif kind == "4bit":  # either of bitsandbytes' CPU layouts (hadapeft.seam.bnb)
        w = dense_weight_4bit(layer.weight).reshape(layer.out_features, layer.in_features)
    else:
        w = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None))
        w = w.reshape(layer.out_features, layer.in_features)
    return w if dtype is None else w.to(dtype)


def compute_dtype(layer: nn.Module, kind: str, x: torch.Tensor, autocast: Optional[bool] = None) -> torch.dtype:
    """The dtype the base layer would compute in for input ``x`` (autocast respected; ``autocast``: whether it is on
    for x's device, if the caller knows)."""
    if autocast is None:
        autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        return torch.get_autocast_dtype(x.device.type)
    if kind == "linear" or kind == "conv1d":
        return layer.weight.dtype
    if kind == "4bit" and getattr(layer, "compute_dtype", None) is not None:
        return layer.compute_dtype
    return x.dtype


def write_dense_weight(layer: nn.Module, kind: str, w: torch.Tensor) -> None:
    """Store a dense (d_out, d_in) weight back into the layer, re-quantizing bitsandbytes layers."""
    if kind == "linear":
        layer.weight.data = w.to(layer.weight.dtype).contiguous()
    elif kind == "conv1d":
        layer.weight.data = w.t().to(layer.weight.dtype).contiguous()
    elif kind == "4bit":
        import bitsandbytes as bnb

        old = layer.weight
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        kwargs.pop("quant_state", None)
        layer.weight = bnb.nn.Params4bit(w.to("cpu"), **kwargs).to(old.device)
    else:  # 8bit
        import bitsandbytes as bnb

        old = layer.weight
        layer.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False,
                                         has_fp16_weights=old.has_fp16_weights).to(old.device)
        sync_int8_state(layer, layer.weight.SCB)


def restore_quantized_weight(layer: nn.Module, kind: str, weight, scb=None) -> None:
    """Put back a quantized weight kept aside at merge (bit for bit; no re-quantization)."""
    layer.weight = weight
    if kind == "4bit":  # Linear4bit also keeps the quant state on the module (bitsandbytes reads it after FSDP)
        layer.quant_state = weight.quant_state
    else:
        sync_int8_state(layer, scb)


def guard_4bit_layers(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer of ``model`` safe in both CPU layouts for training and state dicts
    (``hadapeft.seam.bnb``): the wrapped ones and the frozen ones gradients flow through."""
    for module in model.modules():
        if _bnb_kind(module) == "4bit":
            guard_4bit_layer(module)


def sync_int8_state(layer: nn.Module, scb: torch.Tensor) -> None:
    """Point a Linear8bitLt's matmul state at its current int8 weight; bitsandbytes caches both on the state."""
    layer.state.reset_grads()
    layer.weight.SCB = layer.state.SCB = scb
    layer.state.CB = layer.weight.data
