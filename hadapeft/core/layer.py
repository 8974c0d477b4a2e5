"""HadaLayer: the Hadamard modulation of a frozen linear map, shared by every hadapeft adapter.

An adapter layer wraps a frozen linear ``h = W x + b`` and, per active adapter, modulates it element-wise. Every
adapter is one instance of a single formula, :class:`Modulation`:

    y = γ ∘ (Σ_k o_k ∘ (W (i_k ∘ x)) + b∘o or b  +  β)  +  (1 − γ) ∘ (s · B A dropout(x))

with per-sample tables (input scales i_k, output scales o_k, shift β; one row per task or per sample) and an optional
gated low-rank branch. A subclass says only which parameters one adapter owns (``create_adapter``) and what its
modulation is (``modulation``). From that one description this class derives

* the fused forward on the dense frozen weight (``hadapeft.ops``: Triton kernel or PyTorch reference),
* the composed forward on top of an inner map (several active adapters: each modulates the map built by the ones
  before it; bitsandbytes bases keep their own matmul),
* the merge terms ``W' = W ∘ M + W_add``, ``b' = b ∘ m + b_add`` (for one task),

and weight access for Linear/Conv1D/bitsandbytes, dtype handling, merge / unmerge bookkeeping with exact restoration
and safe_merge live here once. ``tests/test_contract.py`` checks fused, composed and merged paths against each other
for every registered adapter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

import torch.nn.functional as F

from ..backend import resolve_backend
from ..ops import gated_lora_linear, modulated_linear, unit_gate
from ..seam.tuner import SeamTunerLayer
from . import frozen

# Entries of a multiplicative merge term below this magnitude are not divided by on unmerge: their original values are
# kept aside at merge time instead, so that unmerge restores the base weight exactly where division would not.
UNMERGE_TINY = 1e-2


@dataclass
class LowRank:
    """The gated low-rank branch ``(1 − γ) ∘ (s · B A dropout(x))``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float  # s = lora_alpha / r
    gate: torch.Tensor  # the gate parameter g, (d_out,) or (1,); γ = unit_gate(g) in [0, 1] (hadapeft.ops)
    dropout: Optional[nn.Module] = None  # applied to x for the branch while training (None: no dropout)
    recompute: bool = False  # keep no N × d_out activation for dγ: recompute W x in backward (one more GEMM)


@dataclass
class Modulation:
    """What one adapter does to its frozen layer (see the module docstring); tables have T rows."""

    scales: tuple = ((None, None),)  # ((i_k (T, d_in) | None, o_k (T, d_out) | None), ...): one pair per term
    shift: Optional[torch.Tensor] = None  # β, (T, d_out)
    rows: Optional[Callable] = None  # (n_rows, device) -> (n_rows,) table row of each input row; None: T == 1
    scale_bias: bool = True  # True: o ∘ (W(i∘x) + b) (IA³, FiLM); False: o ∘ W(i∘x) + b (HyperMod: W ∘ (o iᵀ))
    lora: Optional[LowRank] = None
    per_sample: bool = False  # the tables have one row per sample (T = B): no gather needed when rows == B

    def index(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(rows,) table row of each input row of x, or None when the tables line up with x's rows as they are."""
        if self.rows is None:
            return None
        if self.per_sample:
            table = self.shift if self.shift is not None else next(t for pair in self.scales for t in pair
                                                                   if t is not None)
            if table.shape[0] == x.shape[0]:
                return None
        return self.rows(x.shape[0], x.device)


@dataclass
class MergeTerms:
    """``W' = W ∘ M + W_add`` and ``b' = b ∘ m + b_add``; None means "no such term". Shapes broadcast against
    W (d_out, d_in) and b (d_out,)."""

    M: Optional[torch.Tensor] = None
    W_add: Optional[torch.Tensor] = None
    m: Optional[torch.Tensor] = None
    b_add: Optional[torch.Tensor] = None


class SharedModules:
    """A plain (non-module) reference from a layer to model-level modules held by the tuner (HyperMod's
    hypernetworks), so that they are not registered, saved or moved a second time as children of every layer."""

    def __init__(self, modules: nn.ModuleDict):
        self.modules = modules


class HadaLayer(nn.Module, SeamTunerLayer):
    # Subclass names end in "Linear": peft's "all-linear" expansion recognises already-adapted layers by that name.
    adapter_layer_names: tuple[str, ...] = ()
    # Per-adapter dicts; ``backend`` is in every layer, so it also says which adapters a layer holds.
    other_param_names: tuple[str, ...] = ("backend",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, conditioning_state=None, shared=None,
                 **kwargs) -> None:
        super().__init__()
        # The model's ConditioningState (shared by its layers and tuner): where conditioned adapters read task_ids.
        self.conditioning_state = conditioning_state
        self.shared: Optional[SharedModules] = shared
        mode = base_layer.training
        self.base_layer = base_layer
        self.base_kind = frozen.layer_kind(self.get_base_layer())
        self.in_features, self.out_features = frozen.in_out_features(self.get_base_layer())
        self.init_tuner_layer(adapter_name)
        self.merged_adapters: list[str] = []
        self._merge_stash: dict[str, dict] = {}
        self.backend: dict[str, str] = {}
        self.init_adapter_containers()
        self.update_layer(adapter_name, config, **kwargs)
        self.train(mode)  # new modules start in train mode; follow the wrapped model's mode

    # --- what a subclass provides -----------------------------------------------------------------------------
    def init_adapter_containers(self) -> None:
        """Create the ``nn.ParameterDict`` / ``nn.ModuleDict`` containers named in ``adapter_layer_names``."""
        raise NotImplementedError

    def create_adapter(self, adapter_name: str, config, **kwargs) -> None:
        """Create this adapter's parameters (identity when ``config.init_weights``)."""
        raise NotImplementedError

    def modulation(self, name: str) -> Modulation:
        """Adapter ``name``'s formula, as tables for the current conditioning (see :class:`Modulation`)."""
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self.backend[adapter_name] = config.backend
        self.create_adapter(adapter_name, config, **kwargs)
        self.train(self.training)  # modules the adapter just created follow the layer's mode
        self.move_adapter_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def owns(self, name: str) -> bool:
        return name in self.backend

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if self.conditioning_state is not None:
            self.conditioning_state.active = list(self.active_adapters)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if self.conditioning_state is not None:  # disabled adapters ignore task_ids (ConditioningState.disabled)
            self.conditioning_state.disabled = not enabled

    def conditioning(self, name: str):
        """The validated per-sample conditioning adapter ``name`` uses in this forward (or merge)."""
        return self.conditioning_state.current(name)

    def frozen_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Dense (d_out, d_in) frozen weight and bias in ``dtype``."""
        base = self._modules["base_layer"]
        if self.base_kind == "linear":
            w, b = _module_tensor(base, "weight"), _module_tensor(base, "bias")
        else:
            w, b = frozen.dense_weight(base, self.base_kind), base.bias
        return (w if w.dtype == dtype else w.to(dtype)), (b if b is None or b.dtype == dtype else b.to(dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The hot path of every adapted layer: plain attribute reads, no per-call allocations beyond the math.
        base = self._modules["base_layer"]
        disabled, active = self.switch_state()
        if disabled:
            if self.merged_adapters:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged_adapters:
            return base(x, *args, **kwargs)
        if isinstance(active, str):
            active = (active,) if active in self.backend else ()
        else:
            active = [a for a in active if a in self.backend]
        if not active:
            return base(x, *args, **kwargs)
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        kind = self.base_kind
        if not autocast and (kind == "linear" or kind == "conv1d"):
            dtype = _module_tensor(base, "weight").dtype  # what frozen.compute_dtype returns, without the call
        else:
            dtype = frozen.compute_dtype(base, kind, x, autocast)
        if x.dtype != dtype:
            x = x.to(dtype)
        # Dense bases: the first adapter runs on the frozen weight itself (inner=None). Quantized bases keep their own
        # forward (bitsandbytes' int8 / 4-bit matmul, which re-dequantizes in backward) so QLoRA's memory profile is
        # preserved: a fused op would have to hold a dequantized copy of W until backward.
        dense = kind == "linear" or kind == "conv1d"
        if dense and not autocast and len(active) == 1:  # the common case, without the closure
            return self.adapter_forward(active[0], x, None, dtype)
        fn: Optional[Callable] = None if dense else base
        for name in active:  # each adapter modulates the map built so far
            fn = _Bound(self, name, fn, dtype)
        if not autocast:  # entering an autocast context costs host time per call
            return fn(x)
        with torch.autocast(device, enabled=False):  # the ops run in `dtype`, as the base layer would
            return fn(x)

    def adapter_forward(self, name: str, x: torch.Tensor, inner: Optional[Callable], dtype: torch.dtype):
        """Output of adapter ``name``, modulating the frozen dense layer (``inner`` None) or the map ``inner``.

        On the dense layer this is one op of ``hadapeft.ops`` (the Triton kernel, or on the PyTorch backend one
        autograd Function per layer for Gated LoRA). Otherwise it is the :class:`Modulation` formula in native torch
        ops, on the frozen linear or on ``inner``: autograd's C++ nodes cost less host time per layer than a Python
        autograd Function for these few element-wise ops."""
        mod = self.modulation(name)
        if mod.lora is not None:
            return self._low_rank_forward(mod.lora, name, x, inner, dtype)
        index = mod.index(x)
        if inner is None:
            w, b = self.frozen_weight(dtype)
            if resolve_backend(self.backend[name], x.device) == "triton":
                return self._fused(mod, x, w, b, index, dtype)
            full = (lambda z: F.linear(z, w, b))  # noqa: E731  the frozen map, A z + c
            linear, const = (lambda z: F.linear(z, w)), b  # noqa: E731  its linear part A z and constant c
        else:
            full = inner
            const = None  # c = inner(0), computed only where needed

            def linear(z):
                return inner(z) - constant()

        def constant():  # c, once: on one position per row for a generic inner map
            nonlocal const
            if const is None and inner is not None:
                const = inner(x.new_zeros(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]))
            return const

        def row(t):  # a table's rows for the input rows, shaped to broadcast over x
            return None if t is None else _per_row(_cast(t, dtype), index, x)

        if mod.scale_bias:  # y = o ∘ inner(i ∘ x) + β: the constant is scaled with the output
            (i, o), = mod.scales
            i, o = row(i), row(o)
            y = full(x if i is None else x * i)
            y = y if o is None else y * o
        else:  # y = Σ_k o_k ∘ A(i_k ∘ x) + c + β: W' = A ∘ Σ o_k i_kᵀ leaves the constant alone
            y = None
            for i, o in mod.scales:
                i, o = row(i), row(o)
                t = linear(x if i is None else x * i)
                t = t if o is None else t * o
                y = t if y is None else y + t
            c = constant()
            y = y if c is None else y + c
        return y if mod.shift is None else y + row(mod.shift)

    def _low_rank_forward(self, lora: LowRank, name: str, x, inner: Optional[Callable], dtype: torch.dtype):
        """``y = l + γ ∘ (h − l)``, l = s · B A dropout(x), γ = unit_gate(g): on the dense frozen weight one op
        (``hadapeft.ops.gated_lora_linear``); on an inner map (a bitsandbytes base, or the map built by the adapters
        before this one) native ops, with ``recompute`` keeping no N × d_out tensor for backward."""
        lora_x = lora.dropout(x) if self.training and lora.dropout is not None else None
        A, B, g = _cast(lora.A, dtype), _cast(lora.B, dtype), _cast(lora.gate, dtype)
        if inner is None:
            w, b = self.frozen_weight(dtype)
            return gated_lora_linear(x, w, b, A, B, g, lora.scaling, lora_x, lora.recompute, self.backend[name])
        gate = unit_gate(g)

        def low_rank(u):
            return F.linear(u, B) * lora.scaling if lora.scaling != 1 else F.linear(u, B)

        u = F.linear(x if lora_x is None else lora_x, A)  # (..., r)
        low = low_rank(u)
        diff = inner(x) - low  # h − l, what dγ = Σ dy ∘ (h − l) needs
        if not lora.recompute or not torch.is_grad_enabled():
            return torch.addcmul(low, gate, diff)
        if torch.compiler.is_compiling():  # dynamo cannot trace saved-tensor hooks; checkpointing it can
            def mix(x, u, gate):
                low = low_rank(u)
                return torch.addcmul(low, gate, inner(x) - low)
            return torch.utils.checkpoint.checkpoint(mix, x, u, gate, use_reentrant=False)
        # Keep no N × d_out tensor for backward: autograd stores a recipe for h − l (x and u, which the low-rank
        # branch keeps anyway) and backward recomputes it, one more pass of the inner map.
        with _recomputed(diff, lambda: inner(x) - low_rank(u)):
            return torch.addcmul(low, gate, diff)

    def _fused(self, mod: Modulation, x, w, b, index, dtype):
        """The fused Triton kernels of ``hadapeft.ops`` on the dense frozen weight."""
        backend = "triton"
        if index is None and mod.per_sample:  # the ops read a table with several rows through an index
            index = mod.rows(x.shape[0], x.device)
        y = None
        for k, (i, o) in enumerate(mod.scales):
            term = modulated_linear(x, w, b if k == 0 else None, in_scale=_cast(i, dtype), out_scale=_cast(o, dtype),
                                    shift=_cast(mod.shift, dtype) if k == 0 else None, index=index,
                                    scale_bias=mod.scale_bias, backend=backend)
            y = term if y is None else y + term
        return y

    def merge_terms(self, name: str) -> MergeTerms:
        """Adapter ``name`` as ``W' = W ∘ M + W_add``, ``b' = b ∘ m + b_add``, in fp32; a conditioned adapter folds
        the one task of the current conditioning (``merge_adapter(task_id=...)`` sets it)."""
        with torch.no_grad():
            mod = self.modulation(name)
            lora = mod.lora
            if lora is not None:
                gate = unit_gate(lora.gate.detach().float())
                delta = (lora.B.detach().float() * lora.scaling) @ lora.A.detach().float()
                return MergeTerms(M=gate.unsqueeze(-1), W_add=(1 - gate).unsqueeze(-1) * delta, m=gate)
            k = 0 if mod.rows is None or mod.per_sample else mod.rows(1, torch.device("cpu"))[0]

            def pick(t):  # row k of a table, fp32
                return None if t is None else t.detach().float()[k]

            M = None
            for i, o in mod.scales:
                i, o = pick(i), pick(o)
                if i is None and o is None:
                    term = torch.ones(1, 1)
                elif i is None:
                    term = o.unsqueeze(-1)
                elif o is None:
                    term = i.unsqueeze(0)
                else:
                    term = torch.outer(o, i)
                M = term if M is None else M + term
            out = pick(mod.scales[0][1]) if len(mod.scales) == 1 else None
            return MergeTerms(M=M, m=out if mod.scale_bias else None, b_add=pick(mod.shift))

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
            state = self.conditioning_state
            if state is not None and name in state.specs:  # which task: later conditioning must not ask another
                state.merged[name] = self.conditioning(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.conditioning_state is not None:
                self.conditioning_state.merged.pop(name, None)
            record = self._merge_stash.pop(name, None)
            if record is None or not self.owns(name):
                continue
            t = record["terms"]
            if "quantized" in record:
                frozen.restore_quantized_weight(base, self.base_kind, record["quantized"], record.get("scb"))
            else:
                w, _ = self.frozen_weight(torch.float32)
                frozen.write_dense_weight(base, self.base_kind, _undo_terms(w, t.M, t.W_add, record["w"]))
            if record["created_bias"]:
                base.bias = None
            elif base.bias is not None:
                b = _undo_terms(base.bias.data.float(), t.m, t.b_add, record["b"])
                base.bias.data = b.to(base.bias.dtype)


class _Bound:
    """One adapter bound to its inner map: a picklable, introspectable closure."""

    def __init__(self, layer: HadaLayer, name: str, inner: Optional[Callable], dtype: torch.dtype):
        self.layer, self.name, self.inner, self.dtype = layer, name, inner, dtype

    def __call__(self, x):
        return self.layer.adapter_forward(self.name, x, self.inner, self.dtype)


def adapter_tensor(layer: nn.Module, container: str, name: str) -> torch.Tensor:
    """``layer.<container>[name]`` (a ParameterDict entry) for the hot path: two dict reads instead of
    ``nn.Module.__getattr__`` and ``ParameterDict.__getitem__`` (~2 µs a read, as much as a small tensor op). An entry
    that an engine swapped for a plain tensor attribute (FSDP1 without ``use_orig_params``) takes the normal lookup."""
    return _module_tensor(layer._modules[container], name)


def _module_tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` for a parameter (or None), without ``nn.Module.__getattr__`` where it is registered. Indexed,
    never ``.get()``: DeepSpeed ZeRO-3 replaces ``_parameters`` by a dict whose ``__getitem__`` gathers a partitioned
    parameter (``dict.get`` would hand back the empty partition)."""
    parameters = module._parameters
    if name in parameters:
        return parameters[name]
    return getattr(module, name)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _recomputed(torch.autograd.graph.saved_tensors_hooks):
    """Within the block, autograd saves ``tensor`` as a recipe and calls ``recompute()`` when backward needs it; every
    other saved tensor is kept as usual."""

    def __init__(self, tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]):
        target = id(tensor)  # not the tensor: autograd keeps the hooks with what they packed

        def pack(t):
            return _Recipe(recompute) if id(t) == target else t

        def unpack(packed):
            return packed.recompute() if isinstance(packed, _Recipe) else packed

        super().__init__(pack, unpack)


class _Recipe:
    __slots__ = ("recompute",)

    def __init__(self, recompute):
        self.recompute = recompute


def _per_row(table: torch.Tensor, index: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Rows ``table[index]`` shaped to broadcast over ``x`` (rows, ..., d): (rows, 1, ..., 1, d); with no index, the
    table's single row, or a table with one row per row of x as it is."""
    if index is None:
        if table.shape[0] == 1:
            return table[0]
        return table.view(table.shape[0], *([1] * (x.dim() - 2)), table.shape[-1])
    rows = table.index_select(0, index)
    return rows.view(rows.shape[0], *([1] * (x.dim() - 2)), rows.shape[-1])


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
