from __future__ import annotations

from ...core.model import HadaModel
from ...core.targets import ATTENTION
from .layer import GatedLoraLinear


class GatedLoraModel(HadaModel):
    prefix = "gated_lora_"
    tuner_layer_cls = GatedLoraLinear
    target_module_mapping = ATTENTION
