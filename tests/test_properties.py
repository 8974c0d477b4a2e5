"""Property tests (issue "Reliability and safety", acceptance 4) over random shapes and options on a single nn.Linear
wrapped in a tiny module: merge / unmerge round trips, mixed-batch equivalence of the conditioned adapters, and
save / load round trips. Bounded and derandomized, so CI runs the same examples every time."""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

import hadapeft
from hadapeft.core.layer import HadaLayer

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

dims = st.integers(1, 40)
rows = st.integers(1, 9)
ranks = st.integers(1, 8)
seeds = st.integers(0, 2**16)


class Tiny(nn.Module):
    def __init__(self, d_in, d_out, bias=True):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.lin(x)


def tiny(d_in, d_out, bias, seed):
    torch.manual_seed(seed)
    return Tiny(d_in, d_out, bias).eval()


def layer_of(model) -> HadaLayer:
    (layer,) = [m for m in model.modules() if isinstance(m, HadaLayer)]
    return layer


def close(a, b, rel):
    """|a - b| ≤ rel · max(1, |b|)."""
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


def run(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw)


def unit_values(n):
    """n values in [0, 1]: all exact 0, all exact 1, or a mix of random values with exact 0s and 1s among them."""
    mixed = st.lists(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)), min_size=n, max_size=n)
    return st.one_of(st.just([0.0] * n), st.just([1.0] * n), mixed)


def scale_values(n):
    """n IA3 scales: all exact 0, or random values (negative too) with exact 0s among them."""
    mixed = st.lists(st.one_of(st.just(0.0), st.floats(-2.0, 2.0, allow_subnormal=False)), min_size=n, max_size=n)
    return st.one_of(st.just([0.0] * n), mixed)


def check_merge_roundtrip(model, x):
    base = layer_of(model).get_base_layer()
    w0 = base.weight.detach().clone()
    b0 = None if base.bias is None else base.bias.detach().clone()
    expected = run(model, x)
    model.merge_adapter()
    assert layer_of(model).merged
    assert close(run(model, x), expected, 1e-5)
    model.unmerge_adapter()
    assert not layer_of(model).merged
    assert close(base.weight, w0, 1e-5)
    if b0 is not None:
        assert close(base.bias, b0, 1e-5)
    assert close(run(model, x), expected, 1e-5)


# --- (i) merge / unmerge ---------------------------------------------------------------------------------------------
@SETTINGS
@given(d_in=dims, d_out=dims, n=rows, r=ranks, gate=st.sampled_from(["vector", "scalar"]), bias=st.booleans(),
       alpha=st.floats(0.5, 16.0), seed=seeds, data=st.data())
def test_gated_lora_merge_unmerge_roundtrip(d_in, d_out, n, r, gate, bias, alpha, seed, data):
    model = get_peft_model(tiny(d_in, d_out, bias, seed),
                           hadapeft.GatedLoraConfig(r=r, lora_alpha=alpha, gate=gate, target_modules=["lin"],
                                                    init_weights=False))
    layer = layer_of(model)
    g = layer.gated_lora_gate["default"]
    with torch.no_grad():
        g.copy_(torch.tensor(data.draw(unit_values(g.numel()), label="gate")))
        g.add_(data.draw(st.sampled_from([0.0, 2.0, -3.0]), label="gate shift"))  # γ = unit_gate(g): reflected values
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    check_merge_roundtrip(model, x)


@SETTINGS
@given(d_in=dims, d_out=dims, n=rows, feedforward=st.booleans(), bias=st.booleans(), seed=seeds, data=st.data())
def test_hada_ia3_merge_unmerge_roundtrip(d_in, d_out, n, feedforward, bias, seed, data):
    cfg = hadapeft.HadaIA3Config(target_modules=["lin"], feedforward_modules=["lin"] if feedforward else [],
                                 init_weights=False)
    model = get_peft_model(tiny(d_in, d_out, bias, seed), cfg)
    layer = layer_of(model)
    assert layer.is_feedforward == feedforward
    l = layer.hada_ia3_l["default"]
    with torch.no_grad():
        l.copy_(torch.tensor(data.draw(scale_values(l.numel()), label="scales")).view_as(l))
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    check_merge_roundtrip(model, x)


# --- (ii) a mixed batch equals each sample run alone ----------------------------------------------------------------
EMB = 5
COND_KINDS = ["film_tasks", "film_embeds", "hypermod_tasks", "hypermod_embeds", "ia3_tasks"]


def cond_config(kind, T, rank):
    common = dict(target_modules=["lin"], init_weights=False)
    if kind == "film_tasks":
        return hadapeft.FiLMConfig(num_tasks=T, **common)
    if kind == "film_embeds":
        return hadapeft.FiLMConfig(task_embed_dim=EMB, hidden_dim=8, **common)
    if kind == "hypermod_tasks":
        return hadapeft.HyperModConfig(num_tasks=T, r=rank, embed_dim=8, hidden_dim=16, **common)
    if kind == "hypermod_embeds":
        return hadapeft.HyperModConfig(task_embed_dim=EMB, r=rank, embed_dim=8, hidden_dim=16, **common)
    return hadapeft.HadaIA3Config(num_tasks=T, feedforward_modules=[], **common)


def cond_kwargs(kind, ids, seed):
    if kind.endswith("_tasks"):
        return {"task_ids": ids}
    bank = torch.randn(int(ids.max()) + 1, EMB, generator=torch.Generator().manual_seed(seed + 1))
    return {"task_embeds": bank[ids]}


def _perturb(model, seed):
    """Move every adapter parameter off its init (FiLM tables start at γ = 1, β = 0; heads at zero), so the
    conditioning visibly matters."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@SETTINGS
@given(kind=st.sampled_from(COND_KINDS), d_in=dims, d_out=dims, n=rows, T=st.integers(1, 4), rank=st.integers(1, 3),
       seq=st.integers(1, 3), bias=st.booleans(), seed=seeds, data=st.data())
def test_mixed_batch_equals_per_sample(kind, d_in, d_out, n, T, rank, seq, bias, seed, data):
    model = get_peft_model(tiny(d_in, d_out, bias, seed), cond_config(kind, T, rank))
    _perturb(model, seed)
    ids = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=n, max_size=n), label="task_ids"))
    kw = cond_kwargs(kind, ids, seed)
    x = torch.randn(n, seq, d_in, generator=torch.Generator().manual_seed(seed))
    mixed = run(model, x, **kw)
    alone = torch.cat([run(model, x[i:i + 1], **{k: v[i:i + 1] for k, v in kw.items()}) for i in range(n)])
    assert mixed.shape == (n, seq, d_out)
    assert close(mixed, alone, 1e-6)


# --- (iii) save / load reproduces outputs exactly ----------------------------------------------------------------------
SAVE_KINDS = ["gated_vector", "gated_scalar", "ia3_out", "ia3_feedforward", *COND_KINDS]


def save_config(kind, r, T, rank):
    if kind.startswith("gated"):
        return hadapeft.GatedLoraConfig(r=r, lora_alpha=2 * r, gate=kind.split("_")[1], target_modules=["lin"],
                                        init_weights=False)
    if kind.startswith("ia3_") and kind != "ia3_tasks":
        return hadapeft.HadaIA3Config(target_modules=["lin"], init_weights=False,
                                      feedforward_modules=["lin"] if kind == "ia3_feedforward" else [])
    return cond_config(kind, T, rank)


def _drop_auto_mapping(folder):
    """peft records ``auto_mapping`` (the base model's class and module, here this test module) for task_type=None
    adapters; it only matters to AutoPeftModel, and hadapeft's loader refuses a parent_library other than
    transformers. PeftModel.from_pretrained with a base model in hand does not need it."""
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    assert cfg.pop("auto_mapping")["parent_library"] == __name__
    with open(path, "w") as f:
        json.dump(cfg, f)


@SETTINGS
@given(kind=st.sampled_from(SAVE_KINDS), d_in=dims, d_out=dims, n=rows, r=ranks, T=st.integers(1, 4),
       rank=st.integers(1, 3), bias=st.booleans(), seed=seeds)
def test_save_load_reproduces_outputs(kind, d_in, d_out, n, r, T, rank, bias, seed):
    base = tiny(d_in, d_out, bias, seed)
    fresh_base = copy.deepcopy(base)
    model = get_peft_model(base, save_config(kind, r, T, rank))
    _perturb(model, seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    ids = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(seed + 3))
    kw = cond_kwargs(kind, ids, seed) if kind in COND_KINDS else {}
    expected = run(model, x, **kw)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        _drop_auto_mapping(d)
        loaded = PeftModel.from_pretrained(fresh_base, d)
        got = run(loaded, x, **kw)
    assert torch.equal(got, expected)
