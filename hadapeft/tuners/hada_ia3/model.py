from __future__ import annotations

import re

from ...core.model import HadaModel
from ...core.targets import FUSED_QKV, IA3, IA3_FEEDFORWARD
from ...errors import HadapeftConfigError
from .layer import HadaIA3Linear


def _matches(spec, key: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == s or key.endswith("." + s) for s in spec)


class HadaIA3Model(HadaModel):
    prefix = "hada_ia3_"
    tuner_layer_cls = HadaIA3Linear
    target_module_mapping = IA3

    def layer_kwargs(self, config, adapter_name, key):
        return {"is_feedforward": _matches(config.feedforward_modules, key),
                "fused_qkv": _matches(config.fused_qkv_modules, key)}

    def wrap_target(self, config, adapter_name, target, target_name, parent, current_key):
        if isinstance(target, HadaIA3Linear):
            kwargs = self.layer_kwargs(config, adapter_name, current_key)
            if (kwargs["is_feedforward"], kwargs["fused_qkv"]) != (target.is_feedforward, target.fused_qkv):
                raise HadapeftConfigError(
                    f"adapter {adapter_name!r} treats {current_key!r} as feedforward={kwargs['is_feedforward']}, "
                    f"fused_qkv={kwargs['fused_qkv']}, but the adapters already there use "
                    f"feedforward={target.is_feedforward}, fused_qkv={target.fused_qkv}")
        super().wrap_target(config, adapter_name, target, target_name, parent, current_key)

    def prepare_config(self, config, model_config):
        model_type = model_config.get("model_type")
        defaulted = config.target_modules is None
        config = super().prepare_config(config, model_config)
        if config.feedforward_modules is None:
            if defaulted or model_type in IA3_FEEDFORWARD:
                ff = IA3_FEEDFORWARD.get(model_type)
                config.feedforward_modules = ff if isinstance(ff, str) else set(ff or ())
        if config.fused_qkv_modules is None and defaulted and model_type in FUSED_QKV:
            config.fused_qkv_modules = None  # opt-in only: scaling q too is peft IA3's behaviour
        return config
