from __future__ import annotations

import math

import torch
from torch import nn

from ...core.conditioning import Conditioning
from ...core.layer import HadaLayer, Modulation
from ...seam.hooks import in_backward


class HyperNet(nn.Module):
    """φ: [task ; layer ; module kind] → (u_1..u_r, v_1..v_r, β) for one layer; one per adapter, shared by all layers.

    Parameters: task table T·e (or a projection task_embed_dim·e), layer table (L+1)·e, kind vectors K·e, MLP
    3e·H + H² and a head per kind H·(r·(d_in + d_out) + d_out): additive in T and L, never T × L.
    """

    def __init__(self, config, num_layers: int):
        super().__init__()
        e, H = config.embed_dim, config.hidden_dim
        self.rank, self.init_weights, self.embed_dim = config.r, config.init_weights, e
        # By task id or by conditioning vector: a flag, not isinstance(self.task, ...), which an FSDP1 wrapper fails.
        self.by_id = bool(config.num_tasks)
        self.task = nn.Embedding(config.num_tasks, e) if config.num_tasks else nn.Linear(config.task_embed_dim, e)
        self.layer = nn.Embedding(num_layers + 1, e)  # row num_layers: modules outside any numbered layer
        self.kind = nn.ParameterDict()  # kind -> (e,)
        self.mlp = nn.Sequential(nn.Linear(3 * e, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU())
        self.heads = nn.ModuleDict()  # kind -> Linear(H, r·d_out + r·d_in + d_out)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.pairs: list[tuple[int, str]] = []  # (layer row, head key) of every layer this adapter modulates

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

    def forward(self, task: torch.Tensor, pairs: list) -> list:
        """The batched computation (call it through :func:`modulations`): ``task`` is the task ids (B,) or the
        conditioning vectors (B, task_embed_dim); one MLP pass for all pairs, one head pass per kind. Returns
        ``(scales, β)`` per pair, in order (a list: engines walk the outputs, and DeepSpeed expects string keys in a
        dict). Every weight is used through a module call or inside this forward, never read from outside it (an
        FSDP / ZeRO-3 unit's weights are gathered only while its forward runs)."""
        kinds = self.kind_table(pairs)  # (P, e)
        z = self.task(task.to(kinds.device, kinds.dtype if task.is_floating_point() else task.dtype))  # (B, e)
        B, P = z.shape[0], len(pairs)
        layers = torch.tensor([layer for layer, _ in pairs], device=z.device)
        inp = torch.cat([z.unsqueeze(0).expand(P, B, -1), self.layer(layers).unsqueeze(1).expand(P, B, -1),
                         kinds.unsqueeze(1).expand(P, B, -1)], dim=-1)  # (P, B, 3e)
        h = self.mlp(inp)  # (P, B, H)
        out = [None] * P
        r = self.rank
        for kind in dict.fromkeys(k for _, k in pairs):
            at = [i for i, (_, k) in enumerate(pairs) if k == kind]
            d_in, d_out = self.shapes[kind]
            rows = h[at[0]:at[-1] + 1] if at == list(range(at[0], at[-1] + 1)) else h[at]
            # (P_k, B, ·) each: u_1 + 1, u_2..u_r, v_1 + 1 .. v_r + 1, β
            parts = self.heads[kind](rows).split([d_out] * r + [d_in] * r + [d_out], dim=-1)
            us = (parts[0] + 1, *parts[1:r])
            vs = tuple(v + 1 for v in parts[r:2 * r])
            for j, i in enumerate(at):
                out[i] = (tuple((v[j], u[j]) for v, u in zip(vs, us)), parts[-1][j])
        return out

    def kind_table(self, pairs) -> torch.Tensor:
        """(P, e): the kind vector of each pair (parameters of this module itself: read inside its forward)."""
        return torch.stack([self.kind[kind] for _, kind in pairs])


def modulations(net: nn.Module, cond: Conditioning, pairs) -> dict:
    """(layer, kind) -> (scales, β) for every pair: ``((v_1, u_1), ..., (v_r, u_r))`` with v_i (B, d_in),
    u_i (B, d_out), and β (B, d_out), in fp32. ``net`` is the :class:`HyperNet` as the tuner holds it, possibly
    wrapped by an engine (an FSDP1 unit replaces it in the tuner's ModuleDict): it is called, so that the wrapper's
    forward gathers the weights — a method of the inner module would bypass the wrapper."""
    pairs = list(pairs)
    return dict(zip(pairs, net(cond.task_ids if net.by_id else cond.task_embeds, pairs)))


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
        net = self.shared.modules[name]
        self.hypermod_kind[name] = net.add_kind(kind, self.in_features, self.out_features)
        if (layer_index, self.hypermod_kind[name]) not in net.pairs:
            net.pairs.append((layer_index, self.hypermod_kind[name]))

    def modulation(self, name):
        cond = self.conditioning(name)
        key = (self.hypermod_layer[name], self.hypermod_kind[name])
        # The tuner ran the hypernetwork once for all layers before this forward (HyperModModel.prepare). A layer uses
        # that result when it runs in the same grad mode (not inside the original forward of a reentrant
        # checkpoint, which runs without grad), and a gradient-checkpointing recompute does what the original
        # forward did, so that both save the same tensors.
        shared = cond.shared.get(("hypermod", name))
        decided = cond.shared.setdefault(("hypermod-use", name), {})
        if not torch.compiler.is_compiling() and in_backward():
            use = decided.get(id(self), False)
        else:
            use = shared is not None and shared[0] == torch.is_grad_enabled() and key in shared[1]
            decided[id(self)] = use
        scales, beta = shared[1][key] if use else modulations(self.shared.modules[name], cond, [key])[key]
        return Modulation(scales=scales, shift=beta,
                          rows=cond.sample_rows, scale_bias=False, per_sample=True)
