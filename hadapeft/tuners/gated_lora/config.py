from __future__ import annotations

import math
from dataclasses import dataclass

from ...core.config import HadaConfig, document_fields, help_field
from ...errors import HadapeftConfigError


def _is_number(value) -> bool:
    """A real number (int or float, not bool); strings such as "0.1" from a hand-edited config are refused."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@document_fields
@dataclass
class GatedLoraConfig(HadaConfig):
    """Gated LoRA: ``y = γ ∘ (W0 x + b) + (1 − γ) ∘ (s · B A dropout(x))`` with ``s = lora_alpha / r`` and a learned
    gate γ ∈ [0, 1] per output feature (``gate="vector"``) or per layer (``gate="scalar"``).

    With ``init_weights=True`` γ = 1 and B = 0, so the model is exactly the base model; γ receives gradient at once
    (∂y/∂γ = h − l ≠ 0), which opens the low-rank path to B and then A within the first steps (no dead start).
    A static γ merges exactly: ``W' = diag(γ) W0 + diag(1 − γ) s B A``, ``b' = γ ∘ b``.
    LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685.
    """

    r: int = help_field(8, "Rank of the low-rank branch B A.")
    lora_alpha: float = help_field(8.0, "Scale numerator: the branch is multiplied by s = lora_alpha / r.")
    lora_dropout: float = help_field(0.0, "Dropout on the low-rank branch's input, in [0, 1).")
    gate: str = help_field("vector", "'vector': one gate per output feature; 'scalar': one gate per layer.")
    gate_init: float = help_field(1.0, "Initial γ in [0, 1] (1.0: the frozen path only, exact identity at init).")
    gate_grad: str = help_field(
        "save", "How backward gets h − l for the gate's gradient: 'save' (kept from the forward: N × d_out more "
                "memory per layer) or 'recompute' (W x formed again in backward: one more GEMM per layer; keeps what "
                "peft's LoRA keeps). SmolLM2-135M-Instruct, q/v, r=16, 8 × 64 tokens, AdamW, against peft LoRA: "
                "'save' 1.013× step time (1.002× with gradient checkpointing), peak memory 1.036× (1.000×); "
                "'recompute' 1.049× (1.032×), peak 1.000×; host time per layer 1.17× peft LoRA's for 'save', 1.34× "
                "for 'recompute' (2 idle CPU cores, 2026-12-07, benchmarks/results/2026-12-07-cpu-smollm2-idle.md, "
                "2026-12-07-cpu-host-idle.md). Choose 'recompute' where activation memory is the limit.")
    size_fields = ("r",)

    def validate(self):
        super().validate()
        self._positive("r", self.r)
        if not _is_number(self.lora_alpha) or not (0 < self.lora_alpha < math.inf):
            raise HadapeftConfigError(f"lora_alpha must be a positive number (finite), got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not (0.0 <= self.lora_dropout < 1.0):
            raise HadapeftConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.gate not in ("vector", "scalar"):
            raise HadapeftConfigError(f"gate must be 'vector' or 'scalar', got {self.gate!r}")
        if self.gate_grad not in ("recompute", "save"):
            raise HadapeftConfigError(f"gate_grad must be 'recompute' or 'save', got {self.gate_grad!r}")
        if not _is_number(self.gate_init) or not (0.0 <= self.gate_init <= 1.0):
            raise HadapeftConfigError(f"gate_init must be in [0, 1], got {self.gate_init!r}")
        if self.init_weights and self.gate_init != 1.0:
            raise HadapeftConfigError(
                f"gate_init={self.gate_init} with init_weights=True would not start at the base model; "
                "use gate_init=1.0 or init_weights=False")
