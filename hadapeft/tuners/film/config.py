from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...core.config import TaskConditionedConfig, document_fields, help_field
from ...descriptions import TASK_ENCODER_HELP, validate_task_encoder


@document_fields
@dataclass
class FiLMConfig(TaskConditionedConfig):
    """FiLM, feature-wise linear modulation of each target module's output h: ``y = γ(z) ∘ h + β(z)``, per sample.

    z is the sample's task (``num_tasks``: learned tables γ, β with one row per task, γ = 1 and β = 0 at init) or its
    conditioning vector (``task_embed_dim``: a small generator per layer, ``task_embed → hidden_dim → 2·d_out``,
    whose last layer starts at zero, so γ = 1 + Δγ = 1 and β = 0 at init). ``merge_and_unload(task_id=k)`` folds one
    task into the layer: ``W' = diag(γ_k) W``, ``b' = γ_k ∘ b + β_k`` (a bias is added where the layer had none).
    Without ``target_modules``, FiLM goes on the attention query/value projections of known model families
    (``hadapeft.core.targets.ATTENTION``; why not the sub-block outputs: see ``BLOCK_OUTPUT`` there).
    Perez et al. 2018, https://arxiv.org/abs/1709.07871.
    """

    hidden_dim: int = help_field(64, "Hidden width of the per-layer generator used with task_embed_dim.")
    task_encoder: Optional[dict] = help_field(None, TASK_ENCODER_HELP)
    size_fields = ("num_tasks", "task_embed_dim", "hidden_dim")
    renamed_fields = {"generator_hidden": "hidden_dim"}  # hadapeft <= 0.1.0

    def validate(self):
        super().validate()
        self._positive("hidden_dim", self.hidden_dim)
        validate_task_encoder(self)
