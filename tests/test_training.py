"""Training behaviour: the loss goes down on a learnable rule, the base stays bit-identical, no dead start."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import get_peft_model

import hadapeft

V = 32


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg)


def batch(g, n=16, seq=16):
    """Synthetic next-token rule: each token is the previous one plus 3 (mod V)."""
    start = torch.randint(0, V, (n, 1), generator=g)
    ids = (start + 3 * torch.arange(seq)) % V
    return {"input_ids": ids, "labels": ids}


def train(model, steps, lr, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch(g)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# (config, learning rate, required ratio of final to initial loss). Measured on this setup: Gated LoRA and peft LoRA
# (r=8, all-linear) both go from 3.5 to 2.25 in 100 steps; HadaIA3, which can only rescale features, from 3.5 to 3.0.
CONFIGS = {
    "gated_lora": (lambda: hadapeft.GatedLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), 1e-2, 0.7),
    "gated_lora_scalar": (lambda: hadapeft.GatedLoraConfig(r=8, lora_alpha=16, gate="scalar",
                                                           target_modules="all-linear"), 1e-2, 0.7),
    "hada_ia3": (lambda: hadapeft.HadaIA3Config(target_modules="all-linear",
                                                feedforward_modules=["down_proj"]), 5e-2, 0.9),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_drops_and_base_is_untouched(name):
    make_cfg, lr, ratio = CONFIGS[name]
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, make_cfg())
    losses = train(model, 100, lr)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < ratio * first, (first, last)
    unloaded = model.unload().state_dict()
    assert unloaded.keys() == base_state.keys()
    assert all(torch.equal(unloaded[k], v) for k, v in base_state.items())


def test_gated_lora_has_no_dead_start():
    """γ = 1 and B = 0 at init: γ gets gradient at step 1, B once γ < 1, A once B ≠ 0 — all within 3 steps."""
    model = get_peft_model(tiny_llama(), hadapeft.GatedLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    nonzero = {}
    for step in range(3):
        model(**batch(g)).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad and p.grad.abs().sum() > 0:
                nonzero.setdefault(n, step)
        opt.step()
        opt.zero_grad()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(nonzero) == set(trainable), sorted(set(trainable) - set(nonzero))
    assert all(nonzero[n] == 0 for n in trainable if "gated_lora_gate" in n)
    assert all(nonzero[n] <= 1 for n in trainable if "gated_lora_B" in n)


def gates(model):
    """γ of every Gated LoRA layer (what forward and merge use), by parameter name."""
    return {f"{n}.gated_lora_gate.{a}": m.gate(a) for n, m in model.named_modules() if hasattr(m, "gated_lora_gate")
            for a in m.gated_lora_gate}


def test_gate_stays_in_unit_interval_and_gradient_is_linear():
    """γ = unit_gate(g) (g reflected into [0, 1]) whatever the parameter holds — nothing mutates it after an optimizer
    step, so engines with their own master weights cannot undo a projection — and its gradient is a plain sum over
    samples (N processes or micro-batches give the same gradient as one batch)."""
    model = get_peft_model(tiny_llama(), hadapeft.GatedLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    full, halves = batch(g, n=8), None
    model(**full).loss.backward()
    grads_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for rows in (slice(0, 4), slice(4, 8)):
        (model(**{k: v[rows] for k, v in full.items()}).loss / 2).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads_full[n], atol=1e-6, rtol=1e-4), n
    layer = next(m for m in model.modules() if hasattr(m, "gated_lora_gate"))
    gate = layer.gated_lora_gate["default"]
    opt = torch.optim.SGD([gate], lr=0.25)
    gate.grad = -torch.ones_like(gate)  # descent pushes the parameter above 1: γ reflects to 0.75, not stuck at 1
    opt.step()
    assert torch.equal(gate.detach(), torch.full_like(gate, 1.25))
    assert torch.equal(layer.gate("default").detach(), torch.full_like(gate, 0.75))
    gate.grad = torch.full_like(gate, 6.0)  # and far below 0: γ = 0.25
    opt.step()
    assert torch.equal(layer.gate("default").detach(), torch.full_like(gate, 0.25))
    model = get_peft_model(tiny_llama(), hadapeft.GatedLoraConfig(r=4, target_modules="all-linear"))
    train(model, 30, lr=5e-2)
    for n, y in gates(model).items():
        assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all(), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_keeps_gates_in_unit_interval_and_finite(dtype):
    """bf16 / fp16 base, fp32 adapter weights (peft's default; the parameters are re-created by peft's dtype cast),
    a large learning rate: every gate stays inside [0, 1], and weights and loss stay finite."""
    model = get_peft_model(tiny_llama().to(dtype), hadapeft.GatedLoraConfig(r=4, target_modules="all-linear"))
    losses = train(model, 15, lr=5e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all(), n
    for n, y in gates(model).items():
        assert y.min() >= 0 and y.max() <= 1, n
