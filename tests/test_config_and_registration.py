"""Registration with peft, config validation, and bad targets leaving the model untouched."""

from __future__ import annotations

import enum

import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hadapeft
from hadapeft.seam import UnsupportedPeftVersionError, check_peft_version
from hadapeft.seam.registration import add_enum_member as _add_enum_member
from hadapeft.core.layer import HadaLayer
from conftest import build_model


@pytest.mark.parametrize("name,cfg_cls,prefix", [("GATED_LORA", hadapeft.GatedLoraConfig, "gated_lora_"),
                                                 ("HADA_IA3", hadapeft.HadaIA3Config, "hada_ia3_")])
def test_types_are_registered(name, cfg_cls, prefix):
    member = PeftType[name]
    assert PeftType(name) is member and member in list(PeftType) and member == name
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is cfg_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix == name.lower() + "_"
    assert PEFT_TYPE_TO_TUNER_MAPPING[member].prefix == prefix
    assert cfg_cls().peft_type is member


def test_config_roundtrip_through_peft(tmp_path):
    cfg = hadapeft.GatedLoraConfig(r=3, lora_alpha=6, gate="scalar", target_modules=["q_proj"])
    cfg.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is hadapeft.GatedLoraConfig and loaded.r == 3 and loaded.gate == "scalar"


@pytest.mark.parametrize("python", [(3, 10), (3, 11), (3, 12), (3, 13)])
def test_enum_extension_on_each_python_branch(python):
    """The 3.13 branch uses EnumType._add_member_; older ones write the member maps. Both are exercised here on a
    stand-in enum (the 3.13 helper is emulated where the running interpreter lacks it)."""

    class Kind(str, enum.Enum):
        A = "A"

    calls = []
    if python >= (3, 13) and not hasattr(Kind, "_add_member_"):
        def _add_member_(name, member):
            calls.append(name)
            Kind._member_map_[name] = member
            type.__setattr__(Kind, name, member)
        type.__setattr__(Kind, "_add_member_", staticmethod(_add_member_))
    m = _add_enum_member(Kind, "NEW", python=python)
    assert Kind.NEW is m and Kind("NEW") is m and Kind["NEW"] is m and list(Kind) == [Kind.A, m]
    assert m == "NEW" and m.value == "NEW" and m.name == "NEW"
    assert _add_enum_member(Kind, "NEW", python=python) is m  # idempotent
    assert calls == (["NEW"] if python >= (3, 13) else [])
    import copy
    import pickle

    assert copy.deepcopy(m) is m


def test_unsupported_peft_version_is_refused():
    with pytest.raises(UnsupportedPeftVersionError, match=r"peft 0\.30\.0 is installed.*pip install 'peft>="):
        check_peft_version("0.30.0")
    check_peft_version("0.21.2")


BAD_CONFIGS = [
    (hadapeft.GatedLoraConfig, dict(r=0), "r must be a positive integer"),
    (hadapeft.GatedLoraConfig, dict(r=-2), "r must be a positive integer"),
    (hadapeft.GatedLoraConfig, dict(r=2.5), "r must be a positive integer"),
    (hadapeft.GatedLoraConfig, dict(lora_alpha=0), "lora_alpha must be a positive number"),
    (hadapeft.GatedLoraConfig, dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (hadapeft.GatedLoraConfig, dict(gate="matrix"), "gate must be 'vector' or 'scalar'"),
    (hadapeft.GatedLoraConfig, dict(gate_init=1.5, init_weights=False), r"gate_init must be in \[0, 1\]"),
    (hadapeft.GatedLoraConfig, dict(gate_init=0.5), "would not start at the base model"),
    (hadapeft.GatedLoraConfig, dict(backend="cuda"), "backend='cuda' is not one of"),
    (hadapeft.GatedLoraConfig, dict(layers_to_transform=[-1]), "layers_to_transform must be non-negative"),
    (hadapeft.GatedLoraConfig, dict(layers_pattern="layers"), "layers_pattern is only used together"),
    (hadapeft.GatedLoraConfig, dict(hadapeft_version="99.0.0"), "written by hadapeft 99.0.0, newer than"),
    (hadapeft.GatedLoraConfig, dict(hadapeft_version="banana"), "is not a version"),
    (hadapeft.HadaIA3Config, dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]),
     r"feedforward_modules \['down_proj'\] are not in target_modules"),
    (hadapeft.HadaIA3Config, dict(target_modules=["c_attn"], feedforward_modules=["c_attn"],
                                  fused_qkv_modules=["c_attn"]), "cannot be both fused_qkv_modules"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_CONFIGS, ids=[f"{c.__name__}-{m[:25]}" for c, _, m in BAD_CONFIGS])
def test_invalid_config_values(cls, kwargs, message):
    with pytest.raises(hadapeft.HadapeftConfigError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("cfg,error,message", [
    (hadapeft.GatedLoraConfig(target_modules=["nonexistent_proj"]), hadapeft.TargetModuleError,
     r"Target modules \{'nonexistent_proj'\} not found"),
    (hadapeft.GatedLoraConfig(target_modules=["embed_tokens"]), hadapeft.TargetModuleError,
     r"'model.embed_tokens' is a Embedding"),
    (hadapeft.GatedLoraConfig(target_modules=["q_proj", "input_layernorm"]), hadapeft.TargetModuleError,
     r"is a LlamaRMSNorm"),
    (hadapeft.HadaIA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                            fused_qkv_modules=["q_proj"]), hadapeft.TargetModuleError, "not divisible into q, k, v thirds"),
])
def test_bad_targets_leave_model_unchanged(cfg, error, message):
    model = build_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(error, match=message):
        get_peft_model(model, cfg)
    assert [type(m) for m in model.modules()] == types
    assert not any(isinstance(m, HadaLayer) for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_add_adapter_with_bad_target_keeps_first_adapter():
    model = get_peft_model(build_model("llama"), hadapeft.GatedLoraConfig(r=2))
    keys = set(model.state_dict())
    with pytest.raises(hadapeft.TargetModuleError):
        model.add_adapter("bad", hadapeft.GatedLoraConfig(r=2, target_modules=["q_proj", "input_layernorm"]))
    assert set(model.peft_config) == {"default"} and set(model.state_dict()) == keys


def test_field_help_is_single_source():
    doc = hadapeft.GatedLoraConfig.__doc__
    for name in ("r:", "lora_alpha:", "gate:", "init_weights:", "backend:", "target_modules:"):
        assert name in doc
    assert "feedforward_modules:" in hadapeft.HadaIA3Config.__doc__


_QV = {"llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "mistral": {"q_proj", "v_proj"},
       "gpt2": {"c_attn"}, "bert": {"query", "value"}, "vit": {"query", "value", "q_proj", "v_proj"}}


# HyperMod's defaults on Llama-like causal LMs: key / value / MLP down (targets.HYPERMOD, from the ablation in
# scripts/_compare_ablation.py); query / value elsewhere
_KVD = {"llama", "qwen2", "mistral"}


@pytest.mark.parametrize("family", sorted(_QV))
@pytest.mark.parametrize("make", [lambda: hadapeft.GatedLoraConfig(r=2), lambda: hadapeft.FiLMConfig(num_tasks=2),
                                  lambda: hadapeft.HyperModConfig(num_tasks=2)], ids=["gated", "film", "hypermod"])
def test_default_targets_are_the_attention_query_and_value(family, make):
    """Without target_modules, gated LoRA and FiLM adapt the attention query/value projections of every layer (FiLM's
    default moved there from the sub-block outputs; see hadapeft/core/targets.py), and so does HyperMod except on
    Llama-like causal LMs, where it adapts key / value / MLP down of every layer."""
    config = make()
    model = get_peft_model(build_model(family), config)
    adapted = [name for name, m in model.named_modules() if isinstance(m, HadaLayer)]
    kinds = {name.rsplit(".", 1)[-1] for name in adapted}
    if isinstance(config, hadapeft.HyperModConfig) and family in _KVD:
        assert kinds == {"k_proj", "v_proj", "down_proj"} and len(adapted) == 2 * 3, adapted
        return
    assert adapted and kinds <= _QV[family], adapted
    assert len(adapted) == 2 * len(kinds)  # every one of the 2 layers
    assert not any("output" in name or "o_proj" in name or "down_proj" in name for name in adapted), adapted
