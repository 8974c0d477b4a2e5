from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...core.config import NUM_TASKS_HELP, HadaConfig, document_fields, help_field
from ...errors import HadapeftConfigError


@document_fields
@dataclass
class HadaIA3Config(HadaConfig):
    """HadaIA3, learned (IA)³ scaling vectors: ``y = l ∘ (W0 x + b)`` for target modules and ``y = W0 (l ∘ x) + b``
    for ``feedforward_modules``; l = 1 at init. Beyond peft's IA3: merge/unmerge on bitsandbytes 8-bit and 4-bit
    layers, defaults for ViT families, scaling only the key/value thirds of fused qkv layers, and per-task vectors
    (``num_tasks``: one row per task, routed per sample by ``task_ids``; ``merge_and_unload(task_id=k)``).
    Liu et al. 2022, https://arxiv.org/abs/2205.05638.
    """

    feedforward_modules: Optional[Union[list[str], str]] = help_field(
        None, "Subset of target_modules scaled on their input (the MLP down projection); None: the family default.")
    fused_qkv_modules: Optional[Union[list[str], str]] = help_field(
        None, "Fused [q; k; v] projections (GPT-2 'c_attn', timm 'qkv') of which only the k and v thirds are scaled.")

    num_tasks: Optional[int] = help_field(None, NUM_TASKS_HELP + " None: one vector shared by all samples.")
    size_fields = ("num_tasks",)

    def validate(self):
        super().validate()
        self._positive("num_tasks", self.num_tasks, allow_none=True)
        if isinstance(self.feedforward_modules, list):
            self.feedforward_modules = set(self.feedforward_modules)
        if isinstance(self.fused_qkv_modules, list):
            self.fused_qkv_modules = set(self.fused_qkv_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            def covered(f):  # entries are module-name suffixes; after 'all-linear' targets are full names
                return any(t == f or t.endswith("." + f) or f.endswith("." + t) for t in self.target_modules)

            missing = sorted(f for f in self.feedforward_modules if not covered(f))
            if missing:
                raise HadapeftConfigError(f"feedforward_modules {missing} are not in target_modules "
                                          f"{sorted(self.target_modules)}")
        if isinstance(self.fused_qkv_modules, set) and isinstance(self.feedforward_modules, set):
            both = self.fused_qkv_modules & self.feedforward_modules
            if both:
                raise HadapeftConfigError(f"{sorted(both)} cannot be both fused_qkv_modules (output scaled) and "
                                          "feedforward_modules (input scaled)")

    def conditioning_spec(self):
        if self.num_tasks is None:
            return None
        from ...core.conditioning import ConditioningSpec

        return ConditioningSpec(str(self.peft_type.value), num_tasks=self.num_tasks)
