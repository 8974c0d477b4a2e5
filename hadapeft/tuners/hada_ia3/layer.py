from __future__ import annotations

import torch
from torch import nn

from ...core.layer import HadaLayer, MergeTerms
from ...ops import modulated_linear


class HadaIA3Linear(HadaLayer):
    """Scales the frozen layer's output (or, for feed-forward modules, its input) by a learned vector."""

    adapter_layer_names = ("hada_ia3_l",)

    def __init__(self, base_layer, adapter_name, config, is_feedforward=False, fused_qkv=False, **kwargs):
        self.is_feedforward = is_feedforward
        self.fused_qkv = fused_qkv
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def init_adapter_containers(self):
        self.hada_ia3_l = nn.ParameterDict()

    def create_adapter(self, name, config, is_feedforward=None, fused_qkv=None, **kwargs):
        if self.fused_qkv and self.out_features % 3:
            raise ValueError(f"fused qkv layer has {self.out_features} outputs, not divisible into q, k, v thirds")
        n = self.in_features if self.is_feedforward else self.out_features
        if self.fused_qkv:
            n = n // 3 * 2  # only the k and v thirds are scaled
        l = torch.ones(1, n) if config.init_weights else 1 + 0.5 * torch.randn(1, n)
        self.hada_ia3_l[name] = nn.Parameter(l)

    def scale(self, name: str) -> torch.Tensor:
        """The full scaling vector(s), (T, d): ones for the query third of a fused qkv layer."""
        l = self.hada_ia3_l[name]
        if self.fused_qkv:
            l = torch.cat([torch.ones_like(l[:, : l.shape[1] // 2]), l], dim=1)
        return l

    def adapter_forward(self, name, x, inner, dtype):
        l = self.scale(name).to(dtype)
        if inner is None:
            w, b = self.frozen_weight(dtype)
            kw = {"in_scale": l} if self.is_feedforward else {"out_scale": l}
            return modulated_linear(x, w, b, **kw, backend=self.backend[name])
        if self.is_feedforward:
            return inner(x * l[0])
        return inner(x) * l[0]

    def merge_terms(self, name):
        l = self.scale(name).detach().float()[0]
        if self.is_feedforward:
            return MergeTerms(M=l.unsqueeze(0))
        return MergeTerms(M=l.unsqueeze(-1), m=l)
