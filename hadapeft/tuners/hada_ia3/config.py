from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from peft.utils import PeftType

from ...core.config import HadaConfig, document_fields, help_field
from ...errors import HadapeftConfigError


@document_fields
@dataclass
class HadaIA3Config(HadaConfig):
    """HadaIA3, learned (IA)³ scaling vectors: ``y = l ∘ (W0 x + b)`` for target modules and ``y = W0 (l ∘ x) + b``
    for ``feedforward_modules``; l = 1 at init. Beyond peft's IA3: merge/unmerge on bitsandbytes 8-bit and 4-bit
    layers, defaults for ViT families, and scaling only the key/value thirds of fused qkv layers.
    Liu et al. 2022, https://arxiv.org/abs/2205.05638.
    """

    feedforward_modules: Optional[Union[list[str], str]] = help_field(
        None, "Subset of target_modules scaled on their input (the MLP down projection); None: the family default.")
    fused_qkv_modules: Optional[Union[list[str], str]] = help_field(
        None, "Fused [q; k; v] projections (GPT-2 'c_attn', timm 'qkv') of which only the k and v thirds are scaled.")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.HADA_IA3
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
