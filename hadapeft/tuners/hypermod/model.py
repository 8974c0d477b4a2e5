from __future__ import annotations

import re

from torch import nn

from ...core.model import HadaModel
from ...core.targets import ATTENTION
from ...errors import TargetModuleError
from .layer import HyperModLinear, HyperNet

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(key: str):
    """The first integer component of a module key (``model.layers.7.self_attn.q_proj`` → 7), or None."""
    m = _LAYER_INDEX.search(key)
    return None if m is None else int(m.group(1))


class HyperModModel(HadaModel):
    prefix = "hypermod_"
    tuner_layer_cls = HyperModLinear
    target_module_mapping = ATTENTION
    # The hypernetworks live on this tuner (``hypermod_hypernet[adapter]``), shared by the layers; peft then refuses
    # transformers' native adapter loading (which keeps only the model), while PeftModel works.
    uses_shared_state = True

    def _hypernet(self, config, adapter_name: str) -> HyperNet:
        if "hypermod_hypernet" not in self._modules:
            self.hypermod_hypernet = nn.ModuleDict()
        if adapter_name not in self.hypermod_hypernet:
            # Size of the layer table: one past the largest layer index among the modules this adapter targets.
            indices = [layer_index(k) for k, _ in self.model.named_modules()
                       if k and self._check_target_module_exists(config, k)]
            num_layers = 1 + max((i for i in indices if i is not None), default=-1)
            device = next((p.device for p in self.model.parameters()), None)
            self.hypermod_hypernet[adapter_name] = HyperNet(config, num_layers).to(device)
        return self.hypermod_hypernet[adapter_name]

    def layer_kwargs(self, config, adapter_name, key):
        net = self._hypernet(config, adapter_name)
        index = layer_index(key)
        last = net.layer.num_embeddings - 1
        if index is not None and index >= last:
            raise TargetModuleError(f"module {key!r} has layer index {index}, outside the hypernetwork's layer table "
                                    f"({last} layers)")
        return {"hypernets": self.hypermod_hypernet, "layer_index": last if index is None else index,
                "kind": key.rpartition(".")[2]}

    @property
    def hypernets(self) -> nn.ModuleDict:
        return self._modules.get("hypermod_hypernet", nn.ModuleDict())

    def _drop_hypernet(self, adapter_name):
        if adapter_name in self.hypernets:
            del self.hypernets[adapter_name]

    def _rollback(self, model, adapter_name):
        super()._rollback(model, adapter_name)
        self._drop_hypernet(adapter_name)

    def delete_adapter(self, adapter_name):
        super().delete_adapter(adapter_name)
        self._drop_hypernet(adapter_name)

    def set_adapter(self, adapter_name, inference_mode=False):
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, net in self.hypernets.items():  # model-level: peft's set_adapter sees only the layers
            net.requires_grad_(name in names and not inference_mode)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self.hypernets.clear()
        return model
