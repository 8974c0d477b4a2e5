from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ...core.layer import HadaLayer, LowRank, Modulation
from ...ops import clamp_gate


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


def _track(layer) -> None:
    """Have ``layer``'s gates projected into [0, 1] after each optimizer step."""
    _LAYERS.add(layer)
    _install_gate_projection()


class GatedLoraLinear(HadaLayer):
    """``y = γ ∘ (W x + b) + (1 − γ) ∘ (s · B A dropout(x))``, γ = clamp(g, 0, 1) (straight-through gradient,
    projected back into [0, 1] after each optimizer step)."""

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
        _track(self)
        self.scaling[name] = config.lora_alpha / r
        self.gate_recompute[name] = config.gate_grad == "recompute"
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def __setstate__(self, state):
        # copy.deepcopy, copy.copy and unpickling build a layer without __init__: track the copy too.
        super().__setstate__(state)
        _track(self)

    def gate(self, name: str) -> torch.Tensor:
        """γ in [0, 1] (shape (d_out,) or (1,))."""
        return clamp_gate(self.gated_lora_gate[name])

    def modulation(self, name):
        return Modulation(lora=LowRank(self.gated_lora_A[name], self.gated_lora_B[name], self.scaling[name],
                                       self.gated_lora_gate[name], self.lora_dropout[name],
                                       self.gate_recompute[name]))
