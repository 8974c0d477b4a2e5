"""Activation memory of a training step: what each adapted layer keeps between forward and backward, against peft's
LoRA on the same layers (profiler allocation records on CPU: deterministic byte counts, no timing)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hadapeft

TOKENS, D, LAYERS = 4 * 256, 64, 4


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(D, D)}) for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer["proj"](x)
        return x


def kept_after_forward(config) -> tuple[int, torch.Tensor]:
    """Bytes still allocated after a forward with grad (its output and everything saved for backward)."""
    torch.manual_seed(0)
    model = get_peft_model(Stack(), config)
    x = torch.randn(4, TOKENS // 4, D, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = model(x)
    cpu = torch.autograd.DeviceType.CPU
    kept = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == cpu)
    y.pow(2).sum().backward()  # and backward still works from what was kept
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return kept, grads


def test_gated_lora_keeps_what_peft_lora_keeps():
    """gate_grad='recompute' keeps no N × d_out tensor per layer; 'save' keeps one (h − l), with the
    same gradients."""
    lora, _ = kept_after_forward(LoraConfig(r=4, target_modules=["proj"]))
    gated, g_recompute = kept_after_forward(hadapeft.GatedLoraConfig(r=4, target_modules=["proj"], init_weights=False,
                                                                     gate_grad="recompute"))
    saved, g_save = kept_after_forward(hadapeft.GatedLoraConfig(r=4, target_modules=["proj"], init_weights=False,
                                                                gate_grad="save"))
    per_layer = TOKENS * D * 4  # one fp32 N × d_out activation
    assert gated <= lora + 4096, (gated, lora)  # the gate vectors' few bytes at most
    assert saved >= gated + LAYERS * per_layer
    assert torch.allclose(g_recompute, g_save, atol=1e-6, rtol=1e-5)
