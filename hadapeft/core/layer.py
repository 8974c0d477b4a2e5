"""HadaLayer: the Hadamard modulation of a frozen linear map, shared by every hadapeft adapter.

An adapter layer wraps a frozen linear ``W0 x + b`` and, per active adapter, modulates it element-wise (scales on its
input and/or output, an optional shift, an optional low-rank branch mixed by a gate). The subclasses only say:

* which parameters one adapter owns (``update_layer``),
* how one adapter computes its output from the frozen layer (``adapter_forward``), once as a fused op on the dense
  frozen weight (``inner is None``) and once on top of an inner map (when several adapters are active, each one
  modulates the map built by the ones before it),
* how one adapter folds into the weight (``merge_terms``), as ``W' = W ∘ M + W_add`` and ``b' = b ∘ m + b_add``.

Everything else — weight access for Linear/Conv1D/bitsandbytes, dtype handling, merge / unmerge bookkeeping with exact
restoration, safe_merge — lives here once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import frozen

# Entries of a multiplicative merge term below this magnitude are not divided by on unmerge: their original values are
# kept aside at merge time instead, so that unmerge restores the base weight exactly where division would not.
UNMERGE_TINY = 1e-2


@dataclass
class MergeTerms:
    """``W' = W ∘ M + W_add`` and ``b' = b ∘ m + b_add``; None means "no such term". Shapes broadcast against
    W (d_out, d_in) and b (d_out,)."""

    M: Optional[torch.Tensor] = None
    W_add: Optional[torch.Tensor] = None
    m: Optional[torch.Tensor] = None
    b_add: Optional[torch.Tensor] = None


class HadaLayer(nn.Module, BaseTunerLayer):
    # Subclass names end in "Linear": peft's "all-linear" expansion recognises already-adapted layers by that name.
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, conditioning_state=None, **kwargs) -> None:
        super().__init__()
        # The model's ConditioningState (shared by its layers and tuner): where conditioned adapters read task_ids.
        self.conditioning_state = conditioning_state
        mode = base_layer.training
        self.base_layer = base_layer
        self.base_kind = frozen.layer_kind(self.get_base_layer())
        self.in_features, self.out_features = frozen.in_out_features(self.get_base_layer())
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merge_stash: dict[str, dict] = {}
        self.backend: dict[str, str] = {}
        self.init_adapter_containers()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)
        self.train(mode)  # new modules start in train mode; follow the wrapped model's mode

    # --- what a subclass provides -----------------------------------------------------------------------------
    def init_adapter_containers(self) -> None:
        """Create the ``nn.ParameterDict`` / ``nn.ModuleDict`` containers named in ``adapter_layer_names``."""
        raise NotImplementedError

    def create_adapter(self, adapter_name: str, config, **kwargs) -> None:
        """Create this adapter's parameters (identity when ``config.init_weights``)."""
        raise NotImplementedError

    def adapter_forward(self, name: str, x: torch.Tensor, inner: Optional[Callable], dtype: torch.dtype):
        """Output of adapter ``name``: fused on the frozen layer when ``inner`` is None, else modulating ``inner``."""
        raise NotImplementedError

    def merge_terms(self, name: str) -> MergeTerms:
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self.backend[adapter_name] = config.backend
        self.create_adapter(adapter_name, config, **kwargs)
        self.train(self.training)  # modules the adapter just created follow the layer's mode
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def owns(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if self.conditioning_state is not None:
            self.conditioning_state.active = list(self.active_adapters)

    def conditioning(self, name: str):
        """The validated per-sample conditioning adapter ``name`` uses in this forward (or merge)."""
        return self.conditioning_state.current(name)

    def frozen_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Dense (d_out, d_in) frozen weight and bias in ``dtype``."""
        base = self.get_base_layer()
        w = frozen.dense_weight(base, self.base_kind, dtype)
        b = base.bias
        return w, (None if b is None else b.to(dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if self.owns(a)]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        dtype = frozen.compute_dtype(self.get_base_layer(), self.base_kind, x)
        x = x.to(dtype)
        # Dense bases go through the fused ops (inner=None). Quantized bases keep their own forward (bitsandbytes'
        # int8 / 4-bit matmul, which re-dequantizes in backward) so QLoRA's memory profile is preserved: a fused op
        # would have to hold a dequantized copy of W until backward.
        fn: Optional[Callable] = None if self.base_kind in ("linear", "conv1d") else self.base_layer
        for name in active:  # each adapter modulates the map built so far
            fn = _Bound(self, name, fn, dtype)
        if not torch.is_autocast_enabled(x.device.type):  # entering an autocast context costs host time per call
            return fn(x)
        with torch.autocast(x.device.type, enabled=False):  # the ops run in `dtype`, as the base layer would
            return fn(x)

    # --- merge ------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if not self.owns(name):
                continue
            w0, b0 = self.frozen_weight(torch.float32)
            t = self.merge_terms(name)
            w, stash = _apply_terms(w0, t.M, t.W_add)
            # A shift (FiLM's β, HyperMod's β) on a layer without bias needs one: it is created, and removed on unmerge.
            create_bias = b0 is None and t.b_add is not None and bool(t.b_add.any())
            if create_bias:
                b0 = torch.zeros(self.out_features, device=w0.device)
            b = bstash = None
            if b0 is not None:
                b, bstash = _apply_terms(b0, t.m, t.b_add)
            if safe_merge and not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            # The terms are kept: a conditioned adapter's terms depend on the task merged, unknown at unmerge time.
            record = {"w": stash, "b": bstash, "terms": t, "created_bias": create_bias}
            if self.base_kind in ("4bit", "8bit"):
                # Re-quantizing is lossy: keep the original quantized weight (and 8-bit scales) for unmerge.
                record["quantized"] = base.weight
                if self.base_kind == "8bit":
                    record["scb"] = base.state.SCB if base.state.SCB is not None else base.weight.SCB
            frozen.write_dense_weight(base, self.base_kind, w)
            if create_bias:
                warnings.warn(f"merging {name!r} added a bias to a {type(base).__name__} that had none (to hold the "
                              "adapter's shift); the merged model computes the adapted one exactly, but its "
                              "transformers config does not declare these biases, so save it as a state dict")
                dtype = base.weight.dtype if base.weight.dtype.is_floating_point else \
                    (getattr(base, "compute_dtype", None) or torch.float32)  # bitsandbytes: the compute dtype
                base.bias = nn.Parameter(b.to(dtype), requires_grad=False)
            elif b is not None:
                base.bias.data = b.to(base.bias.dtype)
            self._merge_stash[name] = record
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            record = self._merge_stash.pop(name, None)
            if record is None or not self.owns(name):
                continue
            t = record["terms"]
            if "quantized" in record:
                base.weight = record["quantized"]
                if self.base_kind == "8bit":
                    frozen.sync_int8_state(base, record["scb"])
            else:
                w, _ = self.frozen_weight(torch.float32)
                frozen.write_dense_weight(base, self.base_kind, _undo_terms(w, t.M, t.W_add, record["w"]))
            if record["created_bias"]:
                base.bias = None
            elif base.bias is not None:
                b = _undo_terms(base.bias.data.float(), t.m, t.b_add, record["b"])
                base.bias.data = b.to(base.bias.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.backend.pop(adapter_name, None)


class _Bound:
    """One adapter bound to its inner map: a picklable, introspectable closure."""

    def __init__(self, layer: HadaLayer, name: str, inner: Optional[Callable], dtype: torch.dtype):
        self.layer, self.name, self.inner, self.dtype = layer, name, inner, dtype

    def __call__(self, x):
        return self.layer.adapter_forward(self.name, x, self.inner, self.dtype)


def _apply_terms(t0, M, add):
    """``t0 ∘ M + add`` and what unmerge needs to restore entries where M is tiny."""
    out = t0
    stash = None
    if M is not None:
        M = M.to(t0.device, torch.float32)
        tiny = (M.abs() < UNMERGE_TINY).expand_as(t0)
        if tiny.any():
            stash = (tiny, t0[tiny].clone())
        out = out * M
    if add is not None:
        out = out + add.to(t0.device, torch.float32)
    return out, stash


def _undo_terms(t, M, add, stash):
    if add is not None:
        t = t - add.to(t.device, torch.float32)
    if M is not None:
        M = M.to(t.device, torch.float32)
        t = t / torch.where(M.abs() < UNMERGE_TINY, torch.ones_like(M), M)
    if stash is not None:
        tiny, values = stash
        t = t.clone()
        t[tiny] = values.to(t.device)
    return t
