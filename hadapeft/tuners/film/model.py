from __future__ import annotations

from ...core.model import HadaModel
from ...core.targets import ATTENTION
from .layer import FiLMLinear


class FiLMModel(HadaModel):
    prefix = "film_"
    tuner_layer_cls = FiLMLinear
    target_module_mapping = ATTENTION
