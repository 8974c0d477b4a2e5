from __future__ import annotations

import math

import torch
from torch import nn

from ...core.conditioning import Conditioning
from ...core.layer import HadaLayer, Modulation


class HyperNet(nn.Module):
    """φ: [task ; layer ; module kind] → (u_1..u_r, v_1..v_r, β) for one layer; one per adapter, shared by all layers.

    Parameters: task table T·e (or a projection task_embed_dim·e), layer table (L+1)·e, kind vectors K·e, MLP
    3e·H + H² and a head per kind H·(r·(d_in + d_out) + d_out): additive in T and L, never T × L.
    """

    def __init__(self, config, num_layers: int):
        super().__init__()
        e, H = config.embed_dim, config.hidden_dim
        self.rank, self.init_weights, self.embed_dim = config.r, config.init_weights, e
        self.task = nn.Embedding(config.num_tasks, e) if config.num_tasks else nn.Linear(config.task_embed_dim, e)
        self.layer = nn.Embedding(num_layers + 1, e)  # row num_layers: modules outside any numbered layer
        self.kind = nn.ParameterDict()  # kind -> (e,)
        self.mlp = nn.Sequential(nn.Linear(3 * e, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU())
        self.heads = nn.ModuleDict()  # kind -> Linear(H, r·d_out + r·d_in + d_out)
        self.shapes: dict[str, tuple[int, int]] = {}

    def add_kind(self, kind: str, d_in: int, d_out: int) -> str:
        """Register a module kind (the last component of the module name) and return its head's key; modules that
        share a name but not a shape (rare) get a head of their own."""
        key = kind if self.shapes.get(kind, (d_in, d_out)) == (d_in, d_out) else f"{kind}_{d_in}x{d_out}"
        if key not in self.heads:
            device = self.mlp[0].weight.device
            head = nn.Linear(self.mlp[-2].out_features, self.rank * (d_in + d_out) + d_out, device=device)
            if self.init_weights:  # u_1 = v_i = 1, u_{i>1} = β = 0: the identity
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            else:
                nn.init.normal_(head.weight, std=0.5 / math.sqrt(head.in_features))
            self.heads[key] = head
            self.kind[key] = nn.Parameter(torch.randn(self.embed_dim, device=device))
            self.shapes[key] = (d_in, d_out)
        return key

    def forward(self, cond: Conditioning, layer: int, kind: str):
        """Per-sample modulation: u (B, r, d_out), v (B, r, d_in), β (B, d_out), in fp32."""
        if isinstance(self.task, nn.Embedding):
            z = self.task(cond.task_ids.to(self.task.weight.device))
        else:
            z = self.task(cond.task_embeds.to(self.task.weight.device, self.task.weight.dtype))
        B = z.shape[0]
        h = self.mlp(torch.cat([z, self.layer.weight[layer].expand(B, -1), self.kind[kind].expand(B, -1)], dim=-1))
        d_in, d_out = self.shapes[kind]
        r = self.rank
        u, v, beta = self.heads[kind](h).split([r * d_out, r * d_in, d_out], dim=-1)
        u = u.view(B, r, d_out)
        u = torch.cat([u[:, :1] + 1, u[:, 1:]], dim=1) if r > 1 else u + 1
        return u, v.view(B, r, d_in) + 1, beta


class HyperModLinear(HadaLayer):
    """``y = Σ_i u_i ∘ (W0 (v_i ∘ x)) + b + β`` with (u, v, β) from the model's shared hypernetwork, per sample."""

    # No parameters of its own: the hypernetworks live on the tuner (model-level, shared by all layers) and are
    # reached through ``self.shared``.
    adapter_layer_names = ()
    other_param_names = HadaLayer.other_param_names + ("hypermod_layer", "hypermod_kind")

    def init_adapter_containers(self):
        self.hypermod_layer: dict[str, int] = {}  # adapter -> row of the layer table
        self.hypermod_kind: dict[str, str] = {}  # adapter -> head key

    def create_adapter(self, name, config, layer_index=None, kind=None, **kwargs):
        self.hypermod_layer[name] = layer_index
        self.hypermod_kind[name] = self.shared.modules[name].add_kind(kind, self.in_features, self.out_features)

    def modulation(self, name):
        cond = self.conditioning(name)
        u, v, beta = self.shared.modules[name](cond, self.hypermod_layer[name], self.hypermod_kind[name])
        return Modulation(scales=tuple((v[:, i], u[:, i]) for i in range(u.shape[1])), shift=beta,
                          rows=cond.sample_rows, scale_bias=False)
