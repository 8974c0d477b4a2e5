from __future__ import annotations

import functools
import re

import torch

from ...core.model import HadaModel
from ...core.targets import HYPERMOD
from ...errors import ConditioningError, TargetModuleError
from .layer import HyperModLinear, HyperNet, modulations

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(key: str):
    """The first integer component of a module key (``model.layers.7.self_attn.q_proj`` → 7), or None."""
    m = _LAYER_INDEX.search(key)
    return None if m is None else int(m.group(1))


class HyperModModel(HadaModel):
    prefix = "hypermod_"
    tuner_layer_cls = HyperModLinear
    target_module_mapping = HYPERMOD
    # One hypernetwork per adapter, on this tuner (``hypermod_hypernet[adapter]``), shared by the layers; peft then
    # refuses transformers' native adapter loading (which keeps only the model), while PeftModel works.
    shared_name = "hypermod_hypernet"
    uses_shared_state = True

    def _hypernet(self, config, adapter_name: str) -> HyperNet:
        if not getattr(self, "_prepare_hooks", None):
            # Before the wrapped model's forward, whichever way it is entered (peft's task models through this tuner,
            # which calls ``self.model(...)``; plain PeftModel and generate directly).
            self._prepare_hooks = [self.model.register_forward_pre_hook(functools.partial(_prepare, tuner=self))]
        if adapter_name not in self.shared_modules:
            # Size of the layer table: one past the largest layer index among the modules this adapter targets.
            indices = [layer_index(k) for k, _ in self.model.named_modules() if k and self.targets(config, k)]
            num_layers = 1 + max((i for i in indices if i is not None), default=-1)
            device = next((p.device for p in self.model.parameters()), None)
            net = HyperNet(config, num_layers)
            # Under peft's low_cpu_mem_usage the net is created on the meta device and its tensors arrive with the
            # checkpoint (load_state_dict(assign=True)): there is nothing to move yet.
            if not next(net.parameters()).is_meta:
                net = net.to(device)
            self.shared_modules[adapter_name] = net
        return self.shared_modules[adapter_name]

    def layer_kwargs(self, config, adapter_name, key):
        net = self._hypernet(config, adapter_name)
        index = layer_index(key)
        last = net.layer.num_embeddings - 1
        if index is not None and index >= last:
            raise TargetModuleError(f"module {key!r} has layer index {index}, outside the hypernetwork's layer table "
                                    f"({last} layers)")
        return {"layer_index": last if index is None else index, "kind": key.rpartition(".")[2]}

    @property
    def hypernets(self):
        return self.shared_modules

    def after_unload(self, model):
        super().after_unload(model)
        for handle in getattr(self, "_prepare_hooks", None) or ():
            handle.remove()
        self._prepare_hooks = None

    def prepare(self) -> None:
        """Run each active hypernetwork once for all its layers, before the model's forward: outside any
        gradient-checkpointing region, so the layers of every region can share the result (computing it in the first
        layer would tie later regions to the first one's recompute). Without it (a layer called on its own) each layer
        runs the hypernetwork itself, with the same result."""
        state = self.conditioning_state
        for name in self.active_adapters:
            net = self.shared_modules[name] if name in self.shared_modules else None
            if net is None or not net.pairs:
                continue
            try:
                cond = state.current(name)
            except ConditioningError:  # no conditioning: the layers say so, if they need it
                continue
            # Inside generate: once per call, not once per new token (Conditioning.once_per_generate).
            mods = cond.once_per_generate(("hypermod", self, name), lambda: modulations(net, cond, net.pairs))
            cond.shared[("hypermod", name)] = (torch.is_grad_enabled(), mods)
            cond.shared.pop(("hypermod-use", name), None)


def _prepare(model, args, tuner):
    tuner.prepare()
