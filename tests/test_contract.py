"""The peft adapter contract, run over a table of (adapter option set × model family), as peft's
test_custom_models.py does. Every check uses ``init_weights=False`` unless it is about the identity at init, so an
adapter that silently did nothing would fail."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import hadapeft
from hadapeft.core.layer import HadaLayer
from conftest import FAMILIES, build_model, logits, make_inputs

OPTION_SETS = {
    "gated_vector": (hadapeft.GatedLoraConfig, dict(r=4, lora_alpha=8)),
    "gated_scalar_all_linear": (hadapeft.GatedLoraConfig,
                                dict(r=2, lora_alpha=4, gate="scalar", target_modules="all-linear", lora_dropout=0.1)),
    "ia3": (hadapeft.HadaIA3Config, dict()),
    "ia3_all_linear": (hadapeft.HadaIA3Config, dict(target_modules="all-linear")),
}
CASES = [(o, f) for o in OPTION_SETS for f in FAMILIES]
CASES.append(("ia3_fused_qkv", "gpt2"))
OPTION_SETS["ia3_fused_qkv"] = (hadapeft.HadaIA3Config, dict(target_modules=["c_attn", "mlp.c_proj"],
                                                              feedforward_modules=["mlp.c_proj"],
                                                              fused_qkv_modules=["c_attn"]))
IDS = [f"{o}-{f}" for o, f in CASES]


def make_config(option: str, family: str, **overrides):
    cls, kwargs = OPTION_SETS[option]
    _, task_type, modules_to_save = FAMILIES[family]
    kw = dict(kwargs, task_type=task_type, modules_to_save=modules_to_save)
    kw.update(overrides)
    return cls(**kw)


def peft_model(option, family, init_weights=False, seed=0, **overrides):
    base = build_model(family, seed=seed)
    torch.manual_seed(seed + 100)
    return get_peft_model(base, make_config(option, family, init_weights=init_weights, **overrides))


def hada_layers(model):
    return [m for m in model.modules() if isinstance(m, HadaLayer)]


case = pytest.mark.parametrize("option,family", CASES, ids=IDS)


@case
def test_identity_at_init(option, family):
    inputs = make_inputs(family)
    ref = logits(build_model(family), inputs)
    model = peft_model(option, family, init_weights=True)
    assert hada_layers(model), "no layer was adapted"
    assert torch.equal(logits(model, inputs), ref)


@case
def test_adapter_changes_output_and_trains(option, family):
    inputs = make_inputs(family)
    ref = logits(build_model(family), inputs)
    model = peft_model(option, family)
    assert (logits(model, inputs) - ref).abs().max() > 1e-3 * ref.abs().max()
    model.train()
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("hada_ia3_" in n or "gated_lora_" in n or "modules_to_save" in n or "classifier" in n
                              or "score" in n) for n in trainable), sorted(trainable)
    adapter_params = [p for n, p in trainable.items() if "hada_ia3_" in n or "gated_lora_" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


@case
def test_save_load_roundtrip(option, family, tmp_path):
    inputs = make_inputs(family)
    model = peft_model(option, family)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_model.bin").exists()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == model.peft_config["default"].peft_type.value
    assert cfg["hadapeft_version"] == hadapeft.__version__
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(not k.endswith(".default") for k in saved)
    loaded = PeftModel.from_pretrained(build_model(family), tmp_path)
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-6, rtol=0)


@case
def test_merge_unmerge(option, family):
    inputs = make_inputs(family)
    model = peft_model(option, family)
    base_state = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "base_layer" in k}
    expected = logits(model, inputs)
    model.merge_adapter()
    assert all(layer.merged for layer in hada_layers(model))
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    after = model.base_model.model.state_dict()
    for k, v in base_state.items():
        assert torch.allclose(after[k], v, atol=1e-5, rtol=0), k
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5, rtol=0)


@case
def test_unload_and_disable_give_base(option, family):
    inputs = make_inputs(family)
    ref = logits(build_model(family), inputs)
    model = peft_model(option, family)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), ref)
    assert not torch.allclose(logits(model, inputs), ref)
    base = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    if FAMILIES[family][2] is None:  # with modules_to_save the head is the saved copy's original, same as base
        assert torch.equal(logits(base, inputs), ref)


@case
def test_safe_merge_refuses_nan(option, family):
    model = peft_model(option, family)
    layer = hada_layers(model)[0]
    name = layer.adapter_layer_names[-1]
    with torch.no_grad():
        getattr(layer, name)["default"].fill_(float("nan"))
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "base_layer" in k}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)
    after = model.base_model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@case
def test_multiple_adapters(option, family, tmp_path):
    inputs = make_inputs(family)
    model = peft_model(option, family)
    out_default = logits(model, inputs)
    torch.manual_seed(7)
    model.add_adapter("other", make_config(option, family, init_weights=False))
    assert torch.equal(logits(model, inputs), out_default)  # adding does not activate
    model.set_adapter("other")
    out_other = logits(model, inputs)
    assert not torch.allclose(out_other, out_default)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ("gated_lora_" in n or "hada_ia3" in n)]
    assert trainable and all(n.endswith(".other") for n in trainable)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    fresh = PeftModel.from_pretrained(build_model(family), tmp_path / "other", adapter_name="other")
    assert torch.allclose(logits(fresh, inputs), out_other, atol=1e-6, rtol=0)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any("other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, inputs), out_default)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option", list(OPTION_SETS)[:3])
def test_half_precision_bases_keep_dtype(option, dtype):
    family = "llama"
    inputs = make_inputs(family)
    base = build_model(family, dtype=dtype)
    ref = logits(base, inputs)
    model = get_peft_model(build_model(family, dtype=dtype), make_config(option, family, init_weights=True))
    for layer in hada_layers(model):
        assert layer.get_base_layer().weight.dtype == dtype
        for pname in layer.adapter_layer_names:
            assert getattr(layer, pname)["default"].dtype == torch.float32  # peft's autocast_adapter_dtype
    out = logits(model, inputs)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    model.train()
    model(**inputs).logits.float().mean().backward()
    merged = get_peft_model(build_model(family, dtype=dtype), make_config(option, family, init_weights=False))
    expected = logits(merged, inputs).float()
    merged = merged.merge_and_unload()
    assert merged.model.layers[0].self_attn.v_proj.weight.dtype == dtype
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (logits(merged, inputs).float() - expected).abs().max() < tol * expected.abs().max()


def grads_with_and_without_checkpointing(option, family, reentrant, inputs) -> list[dict]:
    """Trainable parameters' gradients of one training step, without and with gradient checkpointing."""
    grads = []
    for ckpt in (False, True):
        model = peft_model(option, family)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(**inputs).logits.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


@pytest.mark.parametrize("option", ["gated_vector", "ia3"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(option, family, reentrant):
    grads = grads_with_and_without_checkpointing(option, family, reentrant, make_inputs(family))
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("option", ["gated_vector", "ia3"])
def test_print_trainable_parameters_counts(option, capsys):
    model = peft_model(option, "llama")
    expected = 0
    for layer in hada_layers(model):
        if option == "gated_vector":
            expected += 4 * (layer.in_features + layer.out_features) + layer.out_features
        else:
            expected += layer.in_features if layer.is_feedforward else layer.out_features
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_target_selection_options():
    model = peft_model("gated_vector", "llama", target_modules=["q_proj", "o_proj", "down_proj"],
                       exclude_modules=["o_proj"], layers_to_transform=[1], layers_pattern="layers")
    names = {n.removeprefix("base_model.model.model.") for n, m in model.named_modules() if isinstance(m, HadaLayer)}
    assert names == {"layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"}
    model = peft_model("gated_vector", "llama", target_modules="all-linear", exclude_modules=["o_proj"])
    names = {n for n, m in model.named_modules() if isinstance(m, HadaLayer)}
    assert len(names) == 2 * 6 and not any(n.endswith("o_proj") or "lm_head" in n for n in names)


def test_modules_to_save_trains_and_saves(tmp_path):
    inputs = make_inputs("vit")
    model = peft_model("gated_vector", "vit")
    model.train()
    model(**inputs).logits.sum().backward()
    head = model.base_model.model.classifier
    assert head.modules_to_save["default"].weight.grad is not None
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("classifier" in k for k in keys)


@pytest.mark.parametrize("option", ["gated_vector", "ia3"])
def test_fused_and_composite_paths_agree(option):
    """Two active adapters go through the composite path (each modulating the previous map); the first alone through
    the fused op. Merging both must equal the composite forward."""
    inputs = make_inputs("llama")
    model = peft_model(option, "llama")
    torch.manual_seed(3)
    model.add_adapter("b", make_config(option, "llama", init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    both = logits(model, inputs)
    assert not torch.allclose(both, logits(peft_model(option, "llama"), inputs))
    model.merge_adapter(["default", "b"])
    assert torch.allclose(logits(model, inputs), both, atol=1e-5, rtol=0)


def test_unmerge_is_exact_when_gate_closes():
    """γ = 0 makes W' independent of W0; unmerge must still restore the base weights (kept aside at merge)."""
    model = peft_model("gated_vector", "llama")
    layer = hada_layers(model)[0]
    with torch.no_grad():
        layer.gated_lora_gate["default"][:5] = 0.0
    w0 = layer.get_base_layer().weight.clone()
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.allclose(layer.get_base_layer().weight, w0, atol=1e-6, rtol=0)
    assert torch.equal(layer.get_base_layer().weight[:5], w0[:5])
