from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ...core.layer import HadaLayer, MergeTerms
from ...ops import gated_lora_linear


class _ClampSTE(torch.autograd.Function):
    """γ = clamp(g, 0, 1) in the forward, identity in the backward (straight-through).

    The gradient stays a plain sum over samples, so it is the same whether a batch is split over N processes or
    micro-batches (a sign-dependent rule applied per backward would not be). γ = 1 at init sits on the boundary,
    where a plain clamp's gradient would die for good once a step overshoots; instead the parameter is projected back
    into [0, 1] after every optimizer step (:func:`_project_gates_after_step`), i.e. projected gradient descent.
    """

    @staticmethod
    def forward(ctx, g):
        return g.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad


# Every live Gated LoRA layer. Parameters themselves cannot be marked: peft's dtype casts replace them.
_LAYERS: "weakref.WeakSet[GatedLoraLinear]" = weakref.WeakSet()


def _project_gates_after_step(optimizer, args, kwargs) -> None:
    """Global ``torch.optim`` post-step hook: clamp every Gated LoRA gate parameter into [0, 1] (γ = clamp(g) anyway,
    so this changes no output; it keeps g where its gradient acts)."""
    with torch.no_grad():
        for layer in list(_LAYERS):
            for p in layer.gated_lora_gate.values():
                p.clamp_(0.0, 1.0)


_HOOK = None


def _install_gate_projection() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_project_gates_after_step)


class GatedLoraLinear(HadaLayer):
    adapter_layer_names = ("gated_lora_A", "gated_lora_B", "gated_lora_gate")
    other_param_names = ("scaling", "lora_dropout")

    def init_adapter_containers(self):
        self.gated_lora_A = nn.ParameterDict()
        self.gated_lora_B = nn.ParameterDict()
        self.gated_lora_gate = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def create_adapter(self, name, config, **kwargs):
        r = config.r
        A = torch.empty(r, self.in_features)
        B = torch.zeros(self.out_features, r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if not config.init_weights:  # a non-trivial adapter (tests, research): random B, gate inside (0, 1)
            nn.init.normal_(B, std=1.0 / math.sqrt(r))
        n_gate = self.out_features if config.gate == "vector" else 1
        if config.init_weights:
            g = torch.full((n_gate,), config.gate_init)
        else:
            g = torch.rand(n_gate) * 0.6 + 0.2 if config.gate_init == 1.0 else torch.full((n_gate,), config.gate_init)
        self.gated_lora_A[name] = nn.Parameter(A)
        self.gated_lora_B[name] = nn.Parameter(B)
        self.gated_lora_gate[name] = nn.Parameter(g)
        _LAYERS.add(self)  # its gates are projected into [0, 1] after each optimizer step
        _install_gate_projection()
        self.scaling[name] = config.lora_alpha / r
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def gate(self, name: str) -> torch.Tensor:
        """γ in [0, 1] (shape (d_out,) or (1,))."""
        return _ClampSTE.apply(self.gated_lora_gate[name])

    def adapter_forward(self, name, x, inner, dtype):
        A = self.gated_lora_A[name].to(dtype)
        B = self.gated_lora_B[name].to(dtype)
        s = self.scaling[name]
        drop = self.lora_dropout[name]
        lora_x = drop(x) if isinstance(drop, nn.Dropout) and self.training else None
        if inner is None:  # the fused op clamps the gate itself (same straight-through gradient as `gate()`)
            w, b = self.frozen_weight(dtype)
            gate = self.gated_lora_gate[name].to(dtype)
            return gated_lora_linear(x, w, b, A, B, gate, s, lora_x, backend=self.backend[name])
        low = (x if lora_x is None else lora_x) @ A.t() @ (B * s).t()
        return torch.lerp(low, inner(x), self.gate(name).to(dtype))

    def merge_terms(self, name):
        gate = self.gate(name).detach().float()
        delta = (self.gated_lora_B[name].detach().float() * self.scaling[name]) @ self.gated_lora_A[name].detach().float()
        return MergeTerms(M=gate.unsqueeze(-1), W_add=(1 - gate).unsqueeze(-1) * delta, m=gate)
