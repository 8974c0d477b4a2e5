from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import HadaLayer, LowRank, Modulation, adapter_tensor
from ...ops import unit_gate


class GatedLoraLinear(HadaLayer):
    """``y = γ ∘ (W x + b) + (1 − γ) ∘ (s · B A dropout(x))``, γ = ``unit_gate(g)``: the gate parameter g folded into
    [0, 1] by reflection (γ = g on [0, 1]). γ is in [0, 1] whatever g holds, so no optimizer step, engine master copy
    (DeepSpeed) or sharded parameter (FSDP) has to be projected back; see ``hadapeft.ops.gated_lora.unit_gate``."""

    adapter_layer_names = ("gated_lora_A", "gated_lora_B", "gated_lora_gate")
    other_param_names = HadaLayer.other_param_names + ("scaling", "lora_dropout", "gate_recompute")

    def init_adapter_containers(self):
        self.gated_lora_A = nn.ParameterDict()
        self.gated_lora_B = nn.ParameterDict()
        self.gated_lora_gate = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.gate_recompute: dict[str, bool] = {}  # adapter -> gate_grad == "recompute"

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
        self.gate_recompute[name] = config.gate_grad == "recompute"
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def gate(self, name: str) -> torch.Tensor:
        """γ in [0, 1] (shape (d_out,) or (1,)), differentiable in the gate parameter."""
        return unit_gate(self.gated_lora_gate[name])

    def modulation(self, name):
        dropout = self._modules["lora_dropout"]._modules[name]
        return Modulation(lora=LowRank(adapter_tensor(self, "gated_lora_A", name),
                                       adapter_tensor(self, "gated_lora_B", name), self.scaling[name],
                                       adapter_tensor(self, "gated_lora_gate", name),
                                       dropout if isinstance(dropout, nn.Dropout) else None, self.gate_recompute[name]))
