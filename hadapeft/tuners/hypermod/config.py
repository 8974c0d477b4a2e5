from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...core.config import TaskConditionedConfig, document_fields, help_field
from ...descriptions import TASK_ENCODER_HELP, validate_task_encoder


@document_fields
@dataclass
class HyperModConfig(TaskConditionedConfig):
    """HyperMod, a hypernetwork that modulates the frozen weights per sample: ``W' = W0 ∘ (Σ_i u_i v_iᵀ)``.

    One hypernetwork φ, shared by every target layer, maps [task embedding ; layer embedding ; module-kind embedding]
    through an MLP to a hidden vector, and a head per module kind (shared across layers) maps that to
    ``u_1..u_r`` (d_out), ``v_1..v_r`` (d_in) and a shift β (d_out). Since ``W0 ∘ (u vᵀ) = diag(u) W0 diag(v)``,
    the layer computes ``y = Σ_i u_i ∘ (W0 (v_i ∘ x)) + b + β`` without forming W'. Heads start at zero with
    ``u_1 = v_i = 1``, ``u_{i>1} = 0``, β = 0: the base model at init. Trainable parameters grow with the hypernetwork
    (additively with tasks and layers), not with layers × tasks. With ``task_embed_dim`` the task embedding is a
    learned projection of ``task_embeds`` (e.g. sentence embeddings of task descriptions), so unseen tasks can be
    served. ``merge_and_unload(task_id=k)`` folds one task in: ``W' = W0 ∘ (Σ_i u_i v_iᵀ)``, ``b' = b + β``.
    Hypernetworks: Ha et al. 2016, https://arxiv.org/abs/1609.09106; for adapters: Mahabadi et al. 2021,
    https://arxiv.org/abs/2106.04489.
    """

    r: int = help_field(1, "Rank r of the multiplicative modulation Σ_i u_i v_iᵀ (r GEMMs per layer).")
    embed_dim: int = help_field(32, "Width of the task, layer and module-kind embeddings fed to the hypernetwork.")
    hidden_dim: int = help_field(64, "Width of the hypernetwork's MLP (the input of the per-kind heads).")
    task_encoder: Optional[dict] = help_field(None, TASK_ENCODER_HELP)

    size_fields = ("r", "num_tasks", "task_embed_dim", "embed_dim", "hidden_dim")
    renamed_fields = {"rank": "r"}  # hadapeft <= 0.1.0

    def validate(self):
        super().validate()
        for name in ("r", "embed_dim", "hidden_dim"):
            self._positive(name, getattr(self, name))
        validate_task_encoder(self)
