from __future__ import annotations

import math

import torch
from torch import nn

from ...core.conditioning import per_row_table
from ...core.layer import HadaLayer, MergeTerms
from ...ops import modulated_linear


class FiLMLinear(HadaLayer):
    """``y = γ ∘ h + β`` on the frozen layer's output h, with γ, β chosen per sample (tables or a generator)."""

    adapter_layer_names = ("film_gamma", "film_beta", "film_generator")

    def init_adapter_containers(self):
        self.film_gamma = nn.ParameterDict()  # (num_tasks, d_out), task_ids mode
        self.film_beta = nn.ParameterDict()  # (num_tasks, d_out), task_ids mode
        self.film_generator = nn.ModuleDict()  # task_embeds (B, e) -> [Δγ; β] (B, 2·d_out), task_embeds mode

    def owns(self, name):
        return name in self.film_gamma or name in self.film_generator

    def create_adapter(self, name, config, **kwargs):
        d = self.out_features
        if config.num_tasks:
            T = config.num_tasks
            if config.init_weights:
                gamma, beta = torch.ones(T, d), torch.zeros(T, d)
            else:  # a non-trivial adapter, different per task (tests, research)
                gamma, beta = 1 + 0.5 * torch.randn(T, d), 0.5 * torch.randn(T, d)
            self.film_gamma[name] = nn.Parameter(gamma)
            self.film_beta[name] = nn.Parameter(beta)
            return
        H = config.generator_hidden
        gen = nn.Sequential(nn.Linear(config.task_embed_dim, H), nn.SiLU(), nn.Linear(H, 2 * d))
        last = gen[-1]
        if config.init_weights:  # Δγ = β = 0 exactly for any input: the base model at init
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        else:
            nn.init.normal_(last.weight, std=1.0 / math.sqrt(H))
        self.film_generator[name] = gen

    def tables(self, name, dtype):
        """(γ, β, index): tables of shape (T, d_out) and the (rows,)-index function for the current conditioning."""
        cond = self.conditioning(name)
        if name in self.film_gamma:
            return self.film_gamma[name].to(dtype), self.film_beta[name].to(dtype), cond.task_rows
        gen = self.film_generator[name]
        out = gen(cond.task_embeds.to(gen[0].weight.device, gen[0].weight.dtype)).to(dtype)  # (B, 2·d_out)
        d_gamma, beta = out.chunk(2, dim=-1)
        return 1 + d_gamma, beta, cond.sample_rows

    def adapter_forward(self, name, x, inner, dtype):
        gamma, beta, rows = self.tables(name, dtype)
        index = rows(x.shape[0], x.device)
        if inner is None:
            w, b = self.frozen_weight(dtype)
            return modulated_linear(x, w, b, out_scale=gamma, shift=beta, index=index, backend=self.backend[name])
        return inner(x) * per_row_table(gamma, index, x) + per_row_table(beta, index, x)

    def merge_terms(self, name):
        gamma, beta, rows = self.tables(name, torch.float32)
        k = rows(1, gamma.device)  # the one task being merged
        gamma, beta = gamma.detach()[k[0]], beta.detach()[k[0]]
        return MergeTerms(M=gamma.unsqueeze(-1), m=gamma, b_add=beta)
