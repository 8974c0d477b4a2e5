from __future__ import annotations

import torch
from torch import nn

from ...core.conditioning import per_row_table
from ...core.layer import HadaLayer, MergeTerms
from ...errors import TargetModuleError
from ...ops import modulated_linear


class HadaIA3Linear(HadaLayer):
    """Scales the frozen layer's output (or, for feed-forward modules, its input) by a learned vector."""

    adapter_layer_names = ("hada_ia3_l",)
    other_param_names = ("hada_ia3_tasks",)

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

    def adapter_forward(self, name, x, inner, dtype):
        l = self.scale(name).to(dtype)
        index = self.conditioning(name).task_rows(x.shape[0], x.device) if self.hada_ia3_tasks[name] else None
        if inner is None:
            w, b = self.frozen_weight(dtype)
            kw = {"in_scale": l} if self.is_feedforward else {"out_scale": l}
            return modulated_linear(x, w, b, **kw, index=index, backend=self.backend[name])
        l = l[0] if index is None else per_row_table(l, index, x)
        if self.is_feedforward:
            return inner(x * l)
        return inner(x) * l

    def merge_terms(self, name):
        row = self.conditioning(name).task_ids[0] if self.hada_ia3_tasks[name] else 0
        l = self.scale(name).detach().float()[row]
        if self.is_feedforward:
            return MergeTerms(M=l.unsqueeze(0))
        return MergeTerms(M=l.unsqueeze(-1), m=l)
