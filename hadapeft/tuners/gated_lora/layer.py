from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import HadaLayer, MergeTerms
from ...ops import gated_lora_linear


class _ProjectedGate(torch.autograd.Function):
    """γ = clamp(g, 0, 1), with the gradient passed through wherever following it moves g back towards [0, 1].

    A plain clamp would stop the gradient once an optimizer step overshoots the boundary (γ = 1 at init is on it),
    and the gate would be stuck for good; passing the inward gradient keeps γ inside [0, 1] and trainable.
    """

    @staticmethod
    def forward(ctx, g):
        ctx.save_for_backward(g)
        return g.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        # Gradient descent moves g by −grad: above 1 only a positive grad (moving down) passes, below 0 a negative.
        blocked = ((g > 1) & (grad < 0)) | ((g < 0) & (grad > 0))
        return grad.masked_fill(blocked, 0.0)


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
        self.scaling[name] = config.lora_alpha / r
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def gate(self, name: str) -> torch.Tensor:
        """γ in [0, 1] (shape (d_out,) or (1,))."""
        return _ProjectedGate.apply(self.gated_lora_gate[name])

    def adapter_forward(self, name, x, inner, dtype):
        A = self.gated_lora_A[name].to(dtype)
        B = self.gated_lora_B[name].to(dtype)
        gate = self.gate(name).to(dtype)
        s = self.scaling[name]
        drop = self.lora_dropout[name]
        lora_x = drop(x) if isinstance(drop, nn.Dropout) and self.training else None
        if inner is None:
            w, b = self.frozen_weight(dtype)
            return gated_lora_linear(x, w, b, A, B, gate, s, lora_x, backend=self.backend[name])
        low = (x if lora_x is None else lora_x) @ A.t() @ (B * s).t()
        return torch.lerp(low, inner(x), gate)

    def merge_terms(self, name):
        gate = self.gate(name).detach().float()
        delta = (self.gated_lora_B[name].detach().float() * self.scaling[name]) @ self.gated_lora_A[name].detach().float()
        return MergeTerms(M=gate.unsqueeze(-1), W_add=(1 - gate).unsqueeze(-1) * delta, m=gate)
