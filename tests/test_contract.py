"""The peft adapter contract, run over one table: every option set of every registered adapter type
(``hadapeft.registry``) × the model families it applies to (``tests/conftest.py``), through every check in
:data:`CHECKS` — as peft's ``test_custom_models.py`` does. Conditioned adapters get a mixed batch of tasks in every
check. Every check uses ``init_weights=False`` unless it is about the identity at init, so an adapter that silently did
nothing would fail.

A check is a plain function ``check(option, family, tmp_path)``; ``tests/test_fifth_adapter.py`` runs the same list
on an adapter type defined only in that file.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import hadapeft
from hadapeft import registry
from hadapeft.core.layer import HadaLayer
from conftest import FAMILIES, build_model, logits, make_inputs

BATCH = 3  # tasks 0, 1, 2 in one batch: every conditioned check mixes tasks


def option_sets() -> dict:
    """option name -> (adapter type, OptionSet), read from the registry at call time."""
    return {o: (t, s) for t in registry.ADAPTER_TYPES.values() for o, s in t.option_sets.items()}


def cases(types=None) -> list[tuple[str, str]]:
    return [(o, f) for o, (t, s) in option_sets().items() if types is None or t.name in types
            for f in (s.families or FAMILIES)]


def adapter_type(option) -> registry.AdapterType:
    return option_sets()[option][0]


def make_config(option: str, family: str, **overrides):
    _, task_type, modules_to_save = FAMILIES[family]
    return adapter_type(option).make_config(option, **{"task_type": task_type, "modules_to_save": modules_to_save,
                                                       **overrides})


def peft_model(option, family, init_weights=False, seed=0, **overrides):
    base = build_model(family, seed=seed)
    torch.manual_seed(seed + 100)
    return get_peft_model(base, make_config(option, family, init_weights=init_weights, **overrides))


def hada_layers(model):
    return [m for m in model.modules() if isinstance(m, HadaLayer)]


def active_config(model):
    return model.peft_config[model.active_adapters[0]]


def embed_bank(dim: int) -> torch.Tensor:
    """A fixed conditioning vector per task id (3 tasks) for task_embeds adapters."""
    return torch.randn(3, dim, generator=torch.Generator().manual_seed(5))


def cond(model_or_config, ids) -> dict:
    """Conditioning kwargs giving sample i the task ``ids[i]`` (empty for an unconditioned adapter)."""
    config = active_config(model_or_config) if hasattr(model_or_config, "peft_config") else model_or_config
    spec = config.conditioning_spec()
    if spec is None:
        return {}
    ids = torch.as_tensor(ids)
    return {"task_ids": ids} if spec.num_tasks else {"task_embeds": embed_bank(spec.task_embed_dim)[ids]}


def merge_task(model, k: int) -> dict:
    """Keyword arguments that make a merge fold task ``k`` in (empty for an unconditioned adapter)."""
    spec = active_config(model).conditioning_spec()
    if spec is None:
        return {}
    return {"task_id": k} if spec.num_tasks else {"task_embeds": embed_bank(spec.task_embed_dim)[k]}


def run(model, inputs, ids=None) -> torch.Tensor:
    """Logits of ``inputs`` with the mixed tasks 0..B-1 (or ``ids``)."""
    batch = next(iter(inputs.values())).shape[0]
    return logits(model, {**inputs, **cond(model, list(range(batch)) if ids is None else ids)})


def adapter_params(model, adapter="default") -> dict:
    prefix = model.peft_config[adapter].peft_type.value.lower() + "_"
    return {n: p for n, p in model.named_parameters() if prefix in n and f".{adapter}" in n}


# --- the checks -------------------------------------------------------------------------------------------------
def check_identity_at_init(option, family, tmp_path):
    inputs = make_inputs(family, batch=BATCH)
    ref = logits(build_model(family), inputs)
    model = peft_model(option, family, init_weights=True)
    assert hada_layers(model), "no layer was adapted"
    assert torch.equal(run(model, inputs), ref)


def check_changes_output_and_trains(option, family, tmp_path):
    inputs = make_inputs(family, batch=BATCH)
    ref = logits(build_model(family), inputs)
    model = peft_model(option, family)
    assert (run(model, inputs) - ref).abs().max() > 1e-3 * ref.abs().max()
    model.train()
    out = model(**inputs, **cond(model, range(BATCH))).logits
    out.float().pow(2).mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ours = adapter_params(model)
    assert ours and set(trainable) - set(ours) <= {n for n in trainable if "modules_to_save" in n}, sorted(trainable)
    no_grad = [n for n, p in ours.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def check_loss_goes_down(option, family, tmp_path):
    """Gradient steps sized to cut the loss by ~10% to first order (η = 0.1 · loss / ‖g‖², so the check does not
    depend on the model's scale); a no-op adapter would keep the loss where it is."""
    inputs = make_inputs(family, batch=BATCH)
    model = peft_model(option, family)  # eval mode: no dropout noise in the losses compared
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(4):
        loss = model(**inputs, **cond(model, range(BATCH))).logits.float().pow(2).mean()  # shrink the logits
        grads = torch.autograd.grad(loss, params)
        step = 0.1 * loss.item() / sum(g.pow(2).sum() for g in grads).item()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(step * g)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def check_save_load_roundtrip(option, family, tmp_path):
    inputs = make_inputs(family, batch=BATCH)
    model = peft_model(option, family)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_model.bin").exists()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == model.peft_config["default"].peft_type.value == adapter_type(option).name
    assert cfg["hadapeft_version"] == hadapeft.__version__
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) >= len(adapter_params(model))  # every adapter tensor (and modules_to_save's)
    assert saved and all(not k.endswith(".default") and ".default." not in k for k in saved)
    loaded = PeftModel.from_pretrained(build_model(family), tmp_path)
    assert torch.allclose(run(loaded, inputs), expected, atol=1e-6, rtol=0)


def check_merge_unmerge(option, family, tmp_path):
    inputs = make_inputs(family, batch=BATCH)
    model = peft_model(option, family)
    base_state = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "base_layer" in k}
    k = BATCH - 1  # the task merged; every sample runs it
    expected = run(model, inputs, ids=[k] * BATCH)
    model.merge_adapter(**merge_task(model, k))
    assert all(layer.merged for layer in hada_layers(model))
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    after = model.base_model.model.state_dict()
    for key, v in base_state.items():
        assert torch.allclose(after[key], v, atol=1e-5, rtol=0), key
    assert torch.allclose(run(model, inputs, ids=[k] * BATCH), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload(**merge_task(model, k))
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5, rtol=0)


def check_unload_and_disable_give_base(option, family, tmp_path):
    inputs = make_inputs(family, batch=BATCH)
    ref = logits(build_model(family), inputs)
    model = peft_model(option, family)
    with model.disable_adapter():
        assert torch.equal(run(model, inputs), ref)
    assert not torch.allclose(run(model, inputs), ref)
    base = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    if FAMILIES[family][2] is None:  # with modules_to_save the head is the saved copy's original, same as base
        assert torch.equal(logits(base, inputs), ref)


def check_safe_merge_refuses_nan(option, family, tmp_path):
    model = peft_model(option, family)
    with torch.no_grad():
        for p in adapter_params(model).values():  # every adapter tensor: whichever the merge reads turns NaN
            p.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "base_layer" in k}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True, **merge_task(model, 0))
    after = model.base_model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def check_multiple_adapters(option, family, tmp_path):
    inputs = make_inputs(family, batch=BATCH)
    model = peft_model(option, family)
    out_default = run(model, inputs)
    torch.manual_seed(7)
    model.add_adapter("other", make_config(option, family, init_weights=False))
    assert torch.equal(run(model, inputs), out_default)  # adding does not activate
    model.set_adapter("other")
    out_other = run(model, inputs)
    assert not torch.allclose(out_other, out_default)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    assert trainable and all(".other" in n and ".default" not in n for n in trainable), trainable
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    fresh = PeftModel.from_pretrained(build_model(family), tmp_path / "other", adapter_name="other")
    assert torch.allclose(run(fresh, inputs), out_other, atol=1e-6, rtol=0)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(run(model, inputs), out_default)


def check_composed_equals_fused(option, family, tmp_path):
    """Each formula is written once (``Modulation``) and run three ways: fused (the first active adapter), composed
    on an inner map (the ones after it) and merged. An identity adapter first puts the random adapter on the composed
    path, which must equal its fused output; merging two random adapters must equal their composed forward."""
    inputs = make_inputs(family, batch=BATCH)
    plain = dict(modules_to_save=None, task_type=None)  # peft activates one classification head at a time
    model = peft_model(option, family, **plain)
    fused = run(model, inputs)
    model.add_adapter("identity", make_config(option, family, init_weights=True, **plain))
    model.base_model.set_adapter(["identity", "default"])
    assert torch.allclose(run(model, inputs), fused, atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    model.add_adapter("b", make_config(option, family, init_weights=False, **plain))
    k = 1
    model.base_model.set_adapter("default")
    alone = run(model, inputs, ids=[k] * BATCH)
    model.base_model.set_adapter(["default", "b"])
    both = run(model, inputs, ids=[k] * BATCH)
    assert not torch.allclose(both, alone)
    model.merge_adapter(["default", "b"], **merge_task(model, k))
    assert torch.allclose(logits(model, inputs), both, atol=1e-5, rtol=0)


def check_print_trainable_parameters(option, family, tmp_path):
    model = peft_model(option, family)
    expected = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    ours = sum(p.numel() for p in adapter_params(model).values())
    assert 0 < ours <= expected
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected


CHECKS = [check_identity_at_init, check_changes_output_and_trains, check_loss_goes_down, check_save_load_roundtrip,
          check_merge_unmerge, check_unload_and_disable_give_base, check_safe_merge_refuses_nan,
          check_multiple_adapters, check_composed_equals_fused, check_print_trainable_parameters]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("option,family", cases(), ids=[f"{o}-{f}" for o, f in cases()])
def test_contract(check, option, family, tmp_path):
    check(option, family, tmp_path)


def test_every_adapter_type_is_in_the_table():
    assert {adapter_type(o).name for o, _ in cases()} == set(registry.ADAPTER_TYPES) >= \
        {"GATED_LORA", "HADA_IA3", "FILM", "HYPERMOD"}


# --- per type, on one family: dtypes and gradient checkpointing ---------------------------------------------------
FIRST_OPTIONS = [next(iter(t.option_sets)) for t in registry.ADAPTER_TYPES.values()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option", FIRST_OPTIONS)
def test_half_precision_bases_keep_dtype(option, dtype):
    family = "llama"
    inputs = make_inputs(family, batch=BATCH)
    ref = logits(build_model(family, dtype=dtype), inputs)
    model = get_peft_model(build_model(family, dtype=dtype), make_config(option, family, init_weights=True))
    for layer in hada_layers(model):
        assert layer.get_base_layer().weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in adapter_params(model).values())  # peft's autocast_adapter_dtype
    out = run(model, inputs)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    model.train()
    model(**inputs, **cond(model, range(BATCH))).logits.float().mean().backward()
    merged = get_peft_model(build_model(family, dtype=dtype), make_config(option, family, init_weights=False))
    expected = run(merged, inputs, ids=[0] * BATCH).float()
    merged = merged.merge_and_unload(**merge_task(merged, 0))
    assert all(m.weight.dtype == dtype for m in merged.modules() if isinstance(m, torch.nn.Linear))
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (logits(merged, inputs).float() - expected).abs().max() < tol * expected.abs().max()


def grads_with_and_without_checkpointing(option, family, reentrant, inputs, ids=None) -> list[dict]:
    """Trainable parameters' gradients of one training step, without and with gradient checkpointing."""
    grads = []
    for ckpt in (False, True):
        model = peft_model(option, family)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        batch = next(iter(inputs.values())).shape[0]
        model(**inputs, **cond(model, list(range(batch)) if ids is None else ids)).logits.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


@pytest.mark.parametrize("option", FIRST_OPTIONS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(option, family, reentrant):
    grads = grads_with_and_without_checkpointing(option, family, reentrant, make_inputs(family, batch=BATCH))
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


# --- adapter-specific details ---------------------------------------------------------------------------------------
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


def test_configs_of_earlier_releases_load(tmp_path):
    """Fields renamed for one name per idea (HyperMod ``rank`` -> ``r``, FiLM ``generator_hidden`` -> ``hidden_dim``)
    still load from an adapter_config.json written with the old names."""
    for option, old, new, value in (("hypermod_r2", "rank", "r", 2), ("film_embeds", "generator_hidden", "hidden_dim",
                                                                        16)):
        model = peft_model(option, "llama", **{new: value})
        inputs = make_inputs("llama", batch=BATCH)
        expected = run(model, inputs)
        folder = tmp_path / option
        model.save_pretrained(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg[old] = cfg.pop(new)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        loaded = PeftModel.from_pretrained(build_model("llama"), folder)
        assert getattr(loaded.peft_config["default"], new) == value
        assert torch.allclose(run(loaded, inputs), expected, atol=1e-6, rtol=0)
