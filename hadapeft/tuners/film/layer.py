from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import HadaLayer, Modulation


class FiLMLinear(HadaLayer):
    """``y = γ ∘ h + β`` on the frozen layer's output h, with γ, β chosen per sample (tables or a generator)."""

    adapter_layer_names = ("film_gamma", "film_beta", "film_generator")

    def init_adapter_containers(self):
        self.film_gamma = nn.ParameterDict()  # (num_tasks, d_out), task_ids mode
        self.film_beta = nn.ParameterDict()  # (num_tasks, d_out), task_ids mode
        self.film_generator = nn.ModuleDict()  # task_embeds (B, e) -> [Δγ; β] (B, 2·d_out), task_embeds mode

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
        H = config.hidden_dim
        gen = nn.Sequential(nn.Linear(config.task_embed_dim, H), nn.SiLU(), nn.Linear(H, 2 * d))
        last = gen[-1]
        if config.init_weights:  # Δγ = β = 0 exactly for any input: the base model at init
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        else:
            nn.init.normal_(last.weight, std=1.0 / math.sqrt(H))
        self.film_generator[name] = gen

    def modulation(self, name):
        cond = self.conditioning(name)
        if name in self.film_gamma:  # tables, one row per task
            return Modulation(scales=((None, self.film_gamma[name]),), shift=self.film_beta[name],
                              rows=cond.task_rows)
        gen = self.film_generator[name]  # one row per sample, from its conditioning vector

        def generate():  # (γ, β), (B, d_out) each
            d_gamma, beta = gen(cond.task_embeds.to(gen[0].weight.device, gen[0].weight.dtype)).chunk(2, dim=-1)
            return 1 + d_gamma, beta
        gamma, beta = cond.once_per_generate(("film", self, name), generate)  # not once per new token
        return Modulation(scales=((None, gamma),), shift=beta, rows=cond.sample_rows, per_sample=True)
