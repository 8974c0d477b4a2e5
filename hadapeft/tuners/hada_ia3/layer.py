from __future__ import annotations

import torch
from torch import nn

from ...core.layer import HadaLayer, Modulation
from ...errors import TargetModuleError


class HadaIA3Linear(HadaLayer):
    """Scales the frozen layer's output (or, for feed-forward modules, its input) by a learned vector."""

    adapter_layer_names = ("hada_ia3_l",)
    other_param_names = HadaLayer.other_param_names + ("hada_ia3_tasks",)

    def __init__(self, base_layer, adapter_name, config, is_feedforward=False, fused_qkv=False, **kwargs):
        self.is_feedforward = is_feedforward
        self.fused_qkv = fused_qkv
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def init_adapter_containers(self):
        self.hada_ia3_l = nn.ParameterDict()  # (T, d): T = num_tasks, or 1 for an unconditioned adapter
        self.hada_ia3_tasks: dict[str, bool] = {}  # adapter -> rows routed per sample by task_ids

    def create_adapter(self, name, config, is_feedforward=None, fused_qkv=None, **kwargs):
        if self.fused_qkv and self.out_features % 3:
            raise TargetModuleError(f"fused qkv layer {type(self.get_base_layer()).__name__} has {self.out_features} "
                                    "outputs, not divisible into q, k, v thirds")
        n = self.in_features if self.is_feedforward else self.out_features
        if self.fused_qkv:
            n = n // 3 * 2  # only the k and v thirds are scaled
        T = config.num_tasks or 1
        l = torch.ones(T, n) if config.init_weights else 1 + 0.5 * torch.randn(T, n)
        self.hada_ia3_l[name] = nn.Parameter(l)
        self.hada_ia3_tasks[name] = config.num_tasks is not None

    def scale(self, name: str) -> torch.Tensor:
        """The full scaling vector(s), (T, d): ones for the query third of a fused qkv layer."""
        l = self.hada_ia3_l[name]
        if self.fused_qkv:
            l = torch.cat([torch.ones_like(l[:, : l.shape[1] // 2]), l], dim=1)
        return l

    def modulation(self, name):
        l = self.scale(name)
        rows = self.conditioning(name).task_rows if self.hada_ia3_tasks[name] else None
        return Modulation(scales=((l, None) if self.is_feedforward else (None, l),), rows=rows)
