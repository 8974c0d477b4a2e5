"""One matrix of bad inputs (issue "Reliability and safety", acceptance 1): config fields of every adapter type,
targets, checkpoints and per-sample conditioning. Each case asserts the hadapeft exception type, a regex on the
message naming the field / file / shape, and that the model is exactly as it was (state_dict keys and values,
module types, no peft_config left behind; and, where a model already held adapters, what each of them computes).

Then the second round (issue 22, "Reliability, second round"), by class: failed injections that must undo only
their own work (2), adapter names (3), checkpoints holding other tensors or non-finite values (4), conditioning
outside forward (7), merged tasks (8), configs changed after construction (10), clear errors (11) and task ids while
no conditioned adapter is active (12). Classes 1, 3 (save verification), 5, 6 and 9 are in tests/test_safety.py."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hadapeft
from hadapeft.core.layer import HadaLayer
from conftest import build_model, logits, make_inputs
from test_contract import make_config, peft_model

EMB = 6
# Conditioned option sets (as in test_conditioned.COND_OPTIONS; repeated here so this file stands on its own).
COND = {
    "film_tasks": (hadapeft.FiLMConfig, dict(num_tasks=3)),
    "film_embeds": (hadapeft.FiLMConfig, dict(task_embed_dim=EMB)),
    "hypermod_tasks": (hadapeft.HyperModConfig, dict(num_tasks=3, r=2)),
    "hypermod_embeds": (hadapeft.HyperModConfig, dict(task_embed_dim=EMB)),
    "ia3_tasks": (hadapeft.HadaIA3Config, dict(num_tasks=3)),
    "gated": (hadapeft.GatedLoraConfig, dict(r=2)),
    "ia3": (hadapeft.HadaIA3Config, dict()),
}

G, I, F, H = hadapeft.GatedLoraConfig, hadapeft.HadaIA3Config, hadapeft.FiLMConfig, hadapeft.HyperModConfig
CfgErr, TgtErr = hadapeft.HadapeftConfigError, hadapeft.TargetModuleError
CkptErr, CondErr = hadapeft.AdapterCheckpointError, hadapeft.ConditioningError


@dataclass
class Bad:
    id: str
    kind: str  # "config" | "target" | "checkpoint" | "cond"
    arg: Any
    error: type
    message: str
    extra: dict = field(default_factory=dict)
    marks: tuple = ()


def xfail(reason):
    return (pytest.mark.xfail(strict=True, reason=reason),)


# --- checkpoint mutations: each takes the saved adapter folder and breaks it ------------------------------------------
def _weights(d):
    return d / "adapter_model.safetensors"


def _edit_tensors(fn):
    def mutate(d):
        t = load_file(_weights(d))
        fn(t)
        save_file(t, _weights(d))
    return mutate


def _edit_config(fn):
    def mutate(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        fn(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return mutate


def _drop_first(t):
    del t[sorted(t)[0]]


def _add_extra(t):
    k = sorted(t)[0]
    t[k.replace("layers.0.", "layers.7.")] = t[k].clone()


def _add_extra_same_layer(t):
    k = next(k for k in sorted(t) if "q_proj" in k)
    t[k.replace("q_proj", "o_proj")] = t[k].clone()


def _to_int(t):
    for k in t:
        t[k] = t[k].round().to(torch.int64)


def _transpose_one(t):
    k = next(k for k in sorted(t) if t[k].dim() == 2 and t[k].shape[0] != t[k].shape[1])
    t[k] = t[k].t().contiguous()


def _lora_names(t):
    for k in list(t):
        t[k.replace("gated_lora_", "lora_")] = t.pop(k)


def _set(key, value):
    return _edit_config(lambda c: c.__setitem__(key, value))


def _truncate(d):
    _weights(d).write_bytes(_weights(d).read_bytes()[:100])


def _garbage(d):
    _weights(d).write_bytes(b"\x00" * 7)


def _empty_weights(d):
    save_file({}, _weights(d))


def _wider_base():
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _fewer_layers():
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))


CASES = [
    # (a) config fields --------------------------------------------------------------------------------------------
    Bad("gated-r0", "config", (G, dict(r=0)), CfgErr, r"^r must be a positive integer, got 0"),
    Bad("gated-r-neg", "config", (G, dict(r=-3)), CfgErr, r"^r must be a positive integer, got -3"),
    Bad("gated-r-float", "config", (G, dict(r=2.5)), CfgErr, r"^r must be a positive integer, got 2.5"),
    Bad("gated-r-str", "config", (G, dict(r="4")), CfgErr, r"^r must be a positive integer, got '4'"),
    Bad("gated-r-bool", "config", (G, dict(r=True)), CfgErr, r"^r must be a positive integer, got True"),
    Bad("gated-alpha0", "config", (G, dict(lora_alpha=0)), CfgErr, r"lora_alpha must be a positive number \(finite\), got 0"),
    Bad("gated-alpha-nan", "config", (G, dict(lora_alpha=float("nan"))), CfgErr, r"lora_alpha must be a positive number \(finite\), got nan"),
    Bad("gated-alpha-inf", "config", (G, dict(lora_alpha=float("inf"))), CfgErr, r"lora_alpha must be a positive number \(finite\), got inf"),
    Bad("gated-dropout1", "config", (G, dict(lora_dropout=1.0)), CfgErr, r"lora_dropout must be in \[0, 1\), got 1.0"),
    Bad("gated-dropout-neg", "config", (G, dict(lora_dropout=-0.1)), CfgErr, r"lora_dropout must be in \[0, 1\)"),
    Bad("gated-dropout-str", "config", (G, dict(lora_dropout="0.1")), CfgErr, r"lora_dropout must be .*'0.1'"),
    Bad("gated-gate", "config", (G, dict(gate="matrix")), CfgErr, r"gate must be 'vector' or 'scalar', got 'matrix'"),
    Bad("gated-gate-init-high", "config", (G, dict(gate_init=1.5, init_weights=False)), CfgErr,
        r"gate_init must be in \[0, 1\], got 1.5"),
    Bad("gated-gate-init-neg", "config", (G, dict(gate_init=-0.01, init_weights=False)), CfgErr,
        r"gate_init must be in \[0, 1\], got -0.01"),
    Bad("gated-gate-init-nan", "config", (G, dict(gate_init=float("nan"), init_weights=False)), CfgErr,
        r"gate_init must be in \[0, 1\], got nan"),
    Bad("gated-gate-init-str", "config", (G, dict(gate_init="0.5", init_weights=False)), CfgErr,
        r"gate_init must be .*'0.5'"),
    Bad("gated-gate-init-vs-init-weights", "config", (G, dict(gate_init=0.5)), CfgErr,
        r"gate_init=0.5 with init_weights=True would not start at the base model"),
    Bad("gated-backend", "config", (G, dict(backend="cuda")), CfgErr, r"backend='cuda' is not one of"),
    Bad("gated-layers-neg", "config", (G, dict(layers_to_transform=[-1])), CfgErr,
        r"layers_to_transform must be non-negative"),
    Bad("gated-layers-pattern-alone", "config", (G, dict(layers_pattern="layers")), CfgErr,
        r"layers_pattern is only used together with layers_to_transform"),
    Bad("gated-target-parameters", "config", (G, dict(target_parameters=["w"])), CfgErr,
        r"target_parameters is not supported"),
    Bad("gated-newer-version", "config", (G, dict(hadapeft_version="99.0.0")), CfgErr,
        r"written by hadapeft 99.0.0, newer than the installed"),
    Bad("gated-newer-minor", "config", (G, dict(hadapeft_version="0.99.0")), CfgErr,
        r"written by hadapeft 0.99.0, newer than the installed"),
    Bad("gated-bad-version", "config", (G, dict(hadapeft_version="banana")), CfgErr,
        r"hadapeft_version='banana' is not a version"),
    Bad("ia3-num-tasks0", "config", (I, dict(num_tasks=0)), CfgErr, r"num_tasks must be a positive integer, got 0"),
    Bad("ia3-num-tasks-float", "config", (I, dict(num_tasks=2.0)), CfgErr, r"num_tasks must be a positive integer"),
    Bad("ia3-ff-not-target", "config", (I, dict(target_modules=["k_proj"], feedforward_modules=["down_proj"])), CfgErr,
        r"feedforward_modules \['down_proj'\] are not in target_modules"),
    Bad("ia3-fused-and-ff", "config", (I, dict(target_modules=["c_attn"], feedforward_modules=["c_attn"],
                                               fused_qkv_modules=["c_attn"])), CfgErr,
        r"\['c_attn'\] cannot be both fused_qkv_modules .* and feedforward_modules"),
    Bad("ia3-backend", "config", (I, dict(backend="numpy")), CfgErr, r"backend='numpy' is not one of"),
    Bad("film-neither", "config", (F, dict()), CfgErr, r"FiLMConfig needs exactly one of num_tasks .* and task_embed"),
    Bad("film-both", "config", (F, dict(num_tasks=2, task_embed_dim=4)), CfgErr,
        r"needs exactly one of .* got num_tasks=2, task_embed_dim=4"),
    Bad("film-num-tasks0", "config", (F, dict(num_tasks=0)), CfgErr, r"num_tasks must be a positive integer, got 0"),
    Bad("film-num-tasks-str", "config", (F, dict(num_tasks="3")), CfgErr, r"num_tasks must be a positive integer"),
    Bad("film-embed-dim0", "config", (F, dict(task_embed_dim=0)), CfgErr, r"task_embed_dim must be a positive integer"),
    Bad("film-embed-dim-neg", "config", (F, dict(task_embed_dim=-4)), CfgErr,
        r"task_embed_dim must be a positive integer, got -4"),
    Bad("film-generator-hidden0", "config", (F, dict(task_embed_dim=4, hidden_dim=0)), CfgErr,
        r"hidden_dim must be a positive integer, got 0"),
    Bad("film-generator-hidden-float", "config", (F, dict(task_embed_dim=4, hidden_dim=8.5)), CfgErr,
        r"hidden_dim must be a positive integer, got 8.5"),
    Bad("hypermod-neither", "config", (H, dict()), CfgErr, r"HyperModConfig needs exactly one of num_tasks"),
    Bad("hypermod-both", "config", (H, dict(num_tasks=3, task_embed_dim=4)), CfgErr, r"needs exactly one of"),
    Bad("hypermod-rank0", "config", (H, dict(num_tasks=2, r=0)), CfgErr, r"r must be a positive integer, got 0"),
    Bad("hypermod-rank-neg", "config", (H, dict(num_tasks=2, r=-1)), CfgErr, r"r must be a positive integer"),
    Bad("hypermod-rank-float", "config", (H, dict(num_tasks=2, r=1.5)), CfgErr, r"r must be a positive integer"),
    Bad("hypermod-embed-dim0", "config", (H, dict(num_tasks=2, embed_dim=0)), CfgErr,
        r"embed_dim must be a positive integer, got 0"),
    Bad("hypermod-hidden-dim0", "config", (H, dict(num_tasks=2, hidden_dim=0)), CfgErr,
        r"hidden_dim must be a positive integer, got 0"),
    Bad("hypermod-task-embed-dim0", "config", (H, dict(task_embed_dim=0)), CfgErr,
        r"task_embed_dim must be a positive integer"),
    Bad("hypermod-num-tasks-neg", "config", (H, dict(num_tasks=-2)), CfgErr, r"num_tasks must be a positive integer"),
    # (b) targets ----------------------------------------------------------------------------------------------------
    Bad("target-nothing", "target", (G, dict(target_modules=["nonexistent_proj"]), "llama"), TgtErr,
        r"Target modules \{'nonexistent_proj'\} not found"),
    Bad("target-regex-nothing", "target", (I, dict(target_modules=r".*\.nope_proj"), "llama"), TgtErr, r"nope_proj"),
    Bad("target-layer-out-of-range", "target", (G, dict(target_modules=["q_proj"], layers_to_transform=[9]), "llama"),
        TgtErr, r"q_proj"),
    Bad("target-embedding", "target", (G, dict(target_modules=["embed_tokens"]), "llama"), TgtErr,
        r"'model.embed_tokens' is a Embedding"),
    Bad("target-gpt2-embedding", "target", (F, dict(num_tasks=2, target_modules=["wte"]), "gpt2"), TgtErr,
        r"'transformer.wte' is a Embedding"),
    Bad("target-layernorm", "target", (G, dict(target_modules=["q_proj", "input_layernorm"]), "llama"), TgtErr,
        r"input_layernorm' is a LlamaRMSNorm"),
    Bad("target-hypermod-layernorm", "target", (H, dict(num_tasks=2, target_modules=["ln_f"]), "gpt2"), TgtErr,
        r"'transformer.ln_f' is a LayerNorm"),
    Bad("target-fused-qkv-not-div3", "target",
        (I, dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                 fused_qkv_modules=["q_proj"]), "llama"), TgtErr, r"q_proj.*not divisible into q, k, v thirds",
        ),
    # (c) checkpoints --------------------------------------------------------------------------------------------------
    Bad("ckpt-missing-weights", "checkpoint", (lambda d: _weights(d).unlink(), None), CkptErr,
        r"adapter/? has an adapter_config.json but no adapter_model.safetensors"),
    Bad("ckpt-truncated", "checkpoint", (_truncate, None), CkptErr,
        r"cannot load adapter '(default|second)' from .*adapter: Error while deserializing header"),
    Bad("ckpt-garbage", "checkpoint", (_garbage, None), CkptErr,
        r"cannot load adapter '(default|second)' from .*adapter: Error while deserializing header"),
    Bad("ckpt-empty-weights", "checkpoint", (_empty_weights, None), CkptErr, r"missing from the checkpoint"),
    Bad("ckpt-corrupt-json", "checkpoint", (lambda d: (d / "adapter_config.json").write_text("{\"peft_type\": "), None),
        CkptErr, r"adapter_config.json is not valid JSON"),
    Bad("ckpt-wider-base", "checkpoint", (lambda d: None, _wider_base), CkptErr,
        r"shapes that do not fit this base model.*\(4, 32\) vs model \(4, 48\)"),
    Bad("ckpt-fewer-layers", "checkpoint", (lambda d: None, _fewer_layers), CkptErr,
        r"match no adapted module, e.g. .*layers\.1\."),
    Bad("ckpt-transposed-tensor", "checkpoint", (_edit_tensors(_transpose_one), None), CkptErr,
        r"shapes that do not fit this base model"),
    Bad("ckpt-missing-tensor", "checkpoint", (_edit_tensors(_drop_first), None), CkptErr,
        r"1 adapter tensors are missing from the checkpoint, e.g. .*gated_lora_"),
    Bad("ckpt-extra-tensor-other-layer", "checkpoint", (_edit_tensors(_add_extra), None), CkptErr,
        r"checkpoint tensors match no adapted module, e.g. .*layers\.7\."),
    Bad("ckpt-extra-tensor-unadapted-module", "checkpoint", (_edit_tensors(_add_extra_same_layer), None), CkptErr,
        r"checkpoint tensors match no adapted module, e.g. .*o_proj"),
    Bad("ckpt-lora-tensor-names", "checkpoint", (_edit_tensors(_lora_names), None), CkptErr,
        r"adapter tensors are missing from the checkpoint, e.g. .*gated_lora_"),
    Bad("ckpt-int-tensors", "checkpoint", (_edit_tensors(_to_int), None), CkptErr, r"dtype.*int64",
        ),
    Bad("ckpt-newer-version", "checkpoint", (_set("hadapeft_version", "7.0.0"), None), CfgErr,
        r"written by hadapeft 7.0.0, newer than the installed"),
    Bad("ckpt-config-r0", "checkpoint", (_set("r", 0), None), CfgErr, r"^r must be a positive integer, got 0"),
    Bad("ckpt-config-r-mismatch", "checkpoint", (_set("r", 3), None), CkptErr,
        r"shapes that do not fit.*checkpoint \(4, 32\) vs model \(3, 32\)"),
    Bad("ckpt-config-other-hadapeft-type", "checkpoint", (_set("peft_type", "HADA_IA3"), None), CkptErr,
        r"missing from the checkpoint, e.g. .*hada_ia3_", extra={"holder": False}),
    Bad("ckpt-other-type-into-existing-adapter", "checkpoint", (_set("peft_type", "HADA_IA3"), None), CkptErr,
        r"HADA_IA3", extra={"only_holder": True}),
    Bad("ckpt-config-unknown-backend", "checkpoint", (_set("backend", "cuda"), None), CfgErr,
        r"backend='cuda' is not one of"),
    # (d) conditioning -------------------------------------------------------------------------------------------------
    Bad("cond-missing-ids", "cond", ("film_tasks", {}), CondErr, r"no task_ids were given: pass task_ids="),
    Bad("cond-missing-embeds", "cond", ("hypermod_embeds", {}), CondErr, r"no task_embeds were given"),
    Bad("cond-ids-out-of-range", "cond", ("film_tasks", {"task_ids": torch.tensor([0, 3])}), CondErr,
        r"task_ids out of range .* got values in \[0, 3\], expected \[0, 2\]"),
    Bad("cond-ids-out-of-range-hypermod", "cond", ("hypermod_tasks", {"task_ids": torch.tensor([5, 1])}), CondErr,
        r"task_ids out of range for adapter 'default' \(HYPERMOD, num_tasks=3\)"),
    Bad("cond-ids-out-of-range-ia3", "cond", ("ia3_tasks", {"task_ids": torch.tensor([1, 3])}), CondErr,
        r"task_ids out of range for adapter 'default' \(HADA_IA3"),
    Bad("cond-ids-negative", "cond", ("film_tasks", {"task_ids": torch.tensor([-1, 0])}), CondErr,
        r"task_ids out of range .* \[-1, 0\]"),
    Bad("cond-ids-float", "cond", ("film_tasks", {"task_ids": torch.tensor([0.0, 1.0])}), CondErr,
        r"task_ids must be an integer \(long\) tensor, got dtype torch.float32"),
    Bad("cond-ids-bool", "cond", ("ia3_tasks", {"task_ids": torch.tensor([True, False])}), CondErr,
        r"task_ids must be an integer \(long\) tensor, got dtype torch.bool"),
    Bad("cond-ids-list", "cond", ("film_tasks", {"task_ids": [0, 1]}), CondErr,
        r"task_ids must be a LongTensor of shape \(batch,\), got list"),
    Bad("cond-ids-2d", "cond", ("film_tasks", {"task_ids": torch.tensor([[0], [1]])}), CondErr,
        r"task_ids must be 1-D .* got shape \(2, 1\)"),
    Bad("cond-ids-0d", "cond", ("hypermod_tasks", {"task_ids": torch.tensor(1)}), CondErr,
        r"task_ids must be 1-D .* got shape \(\)"),
    Bad("cond-ids-batch", "cond", ("film_tasks", {"task_ids": torch.tensor([0, 1, 2])}), CondErr,
        r"task_ids has 3 entries but the batch has 2 samples"),
    Bad("cond-ids-empty", "cond", ("ia3_tasks", {"task_ids": torch.tensor([], dtype=torch.long)}), CondErr,
        r"task_ids has 0 entries but the batch has 2 samples"),
    Bad("cond-embeds-width", "cond", ("film_embeds", {"task_embeds": torch.zeros(2, EMB + 1)}), CondErr,
        rf"task_embeds must have shape \(batch, {EMB}\) .* got \(2, {EMB + 1}\)"),
    Bad("cond-embeds-1d", "cond", ("hypermod_embeds", {"task_embeds": torch.zeros(EMB)}), CondErr,
        rf"task_embeds must have shape \(batch, {EMB}\) .* got \({EMB},\)"),
    Bad("cond-embeds-3d", "cond", ("film_embeds", {"task_embeds": torch.zeros(2, 1, EMB)}), CondErr,
        rf"task_embeds must have shape \(batch, {EMB}\) .* got \(2, 1, {EMB}\)"),
    Bad("cond-embeds-int", "cond", ("film_embeds", {"task_embeds": torch.zeros(2, EMB, dtype=torch.long)}), CondErr,
        r"task_embeds must be a float tensor .* got torch.int64"),
    Bad("cond-embeds-list", "cond", ("hypermod_embeds", {"task_embeds": [[0.0] * EMB] * 2}), CondErr,
        r"task_embeds must be a float tensor .* got list"),
    Bad("cond-embeds-batch", "cond", ("hypermod_embeds", {"task_embeds": torch.zeros(3, EMB)}), CondErr,
        r"task_embeds has 3 entries but the batch has 2 samples"),
    Bad("cond-both-for-ids", "cond", ("film_tasks", {"task_ids": torch.tensor([0, 1]),
                                                     "task_embeds": torch.zeros(2, EMB)}), CondErr,
        r"both task_ids and task_embeds were given, but adapter 'default' \(FILM, num_tasks=3\) takes only task_ids"),
    Bad("cond-both-for-embeds", "cond", ("hypermod_embeds", {"task_ids": torch.tensor([0, 1]),
                                                             "task_embeds": torch.zeros(2, EMB)}), CondErr,
        r"both task_ids and task_embeds were given, but .*takes only task_embeds"),
    Bad("cond-ids-for-embeds", "cond", ("film_embeds", {"task_ids": torch.tensor([0, 1])}), CondErr,
        r"task_ids were given, but adapter 'default' \(FILM, task_embed_dim=6\) takes only task_embeds"),
    Bad("cond-embeds-for-ids", "cond", ("ia3_tasks", {"task_embeds": torch.zeros(2, EMB)}), CondErr,
        r"needs task_ids, which were not given"),
    Bad("cond-ids-unconditioned-gated", "cond", ("gated", {"task_ids": torch.tensor([0, 1])}), CondErr,
        r"no adapter among \['default'\] is task-conditioned"),
    Bad("cond-embeds-unconditioned-ia3", "cond", ("ia3", {"task_embeds": torch.zeros(2, EMB)}), CondErr,
        r"no adapter among \['default'\] is task-conditioned"),
]

def _add_base_weight(t):
    k = next(k for k in sorted(t) if k.endswith("q_proj.gated_lora_A"))
    t[k.replace("gated_lora_A", "base_layer.weight")] = torch.zeros(32, 32)


def _add_lm_head(t):
    t["base_model.model.lm_head.weight"] = torch.zeros(96, 32)


def _poison(value):
    def fn(t):
        k = next(k for k in sorted(t) if "gated_lora_gate" in k)
        t[k][0] = value
    return fn


# Issue 22, class 4: a checkpoint may only hold the adapter's own tensors, finite; class 11: peft_type errors.
CASES += [
    Bad("ckpt-overwrites-base-layer", "checkpoint", (_edit_tensors(_add_base_weight), None), CkptErr,
        r"1 checkpoint tensors are not this adapter's but weights of the model, which loading would overwrite: "
        r".*q_proj\.base_layer\.weight"),
    Bad("ckpt-overwrites-lm-head", "checkpoint", (_edit_tensors(_add_lm_head), None), CkptErr,
        r"weights of the model, which loading would overwrite: .*lm_head\.weight"),
    Bad("ckpt-nan", "checkpoint", (_edit_tensors(_poison(float("nan"))), None), CkptErr,
        r"1 tensors hold NaN or infinite values, e.g. .*gated_lora_gate.*allow_nonfinite_checkpoints"),
    Bad("ckpt-inf", "checkpoint", (_edit_tensors(_poison(float("-inf"))), None), CkptErr,
        r"NaN or infinite values"),
    Bad("ckpt-peft-type-lower-case", "checkpoint", (_set("peft_type", "gated_lora"), None), CkptErr,
        r"peft_type 'gated_lora', which is not an adapter type \(did you mean 'GATED_LORA'\?.*Known types: "
        r"hadapeft's \['FILM', 'GATED_LORA', 'HADA_IA3', 'HYPERMOD'\]"),
    Bad("ckpt-peft-type-unknown", "checkpoint", (_set("peft_type", "GATED_LORRA"), None), CkptErr,
        r"peft_type 'GATED_LORRA', which is not an adapter type\. Known types: .*peft's \[.*'LORA'"),
]

assert len({c.id for c in CASES}) == len(CASES)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            hasattr(model, "peft_config"))


def _assert_unchanged(model, snap):
    state, types, had_config = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert [type(m) for m in model.modules()] == types
    assert hasattr(model, "peft_config") == had_config


@pytest.fixture(scope="module")
def saved_gated(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), make_config("gated_vector", "llama", init_weights=False))
    model.save_pretrained(path)
    return path


def _cond_model(option):
    cls, kw = COND[option]
    torch.manual_seed(3)
    return get_peft_model(build_model("llama"), cls(**kw, init_weights=False))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, saved_gated, tmp_path):
    if case.kind == "config":
        cls, kw = case.arg
        model = build_model("llama")
        snap = _snapshot(model)
        with pytest.raises(case.error, match=case.message) as info:
            cls(**kw)
        _assert_unchanged(model, snap)  # the base model is passed nowhere and stays as it was
        assert not any(isinstance(m, HadaLayer) for m in model.modules())
    elif case.kind == "target":
        cls, kw, family = case.arg
        model = build_model(family)
        snap = _snapshot(model)
        cfg = cls(**kw)
        with pytest.raises(case.error, match=case.message) as info:
            get_peft_model(model, cfg)
        _assert_unchanged(model, snap)
        assert not any(isinstance(m, HadaLayer) for m in model.modules())
    elif case.kind == "checkpoint":
        mutate, base_factory = case.arg
        folder = tmp_path / "adapter"
        shutil.copytree(saved_gated, folder)
        mutate(folder)
        torch.manual_seed(0)
        model = (base_factory or (lambda: build_model("llama")))()
        snap = _snapshot(model)
        if not case.extra.get("only_holder"):
            with pytest.raises(case.error, match=case.message) as info:
                PeftModel.from_pretrained(model, folder)
            _assert_unchanged(model, snap)
            assert not any(isinstance(m, HadaLayer) for m in model.modules())
        if base_factory is None and case.extra.get("holder", True):
            # and a peft model that already holds an adapter keeps exactly that one
            holder = _cond_model("gated")
            inputs = make_inputs("llama")
            snap = _full_snapshot(holder, inputs)
            with pytest.raises(case.error, match=case.message) as info:
                holder.load_adapter(folder, adapter_name="second")
            _assert_nothing_lost(holder, snap, inputs)
            assert set(holder.peft_config) == {"default"}
    elif case.kind == "cond":
        option, kw = case.arg
        model = _cond_model(option)
        inputs = make_inputs("llama")
        snap = _snapshot(model)
        full = _full_snapshot(model, inputs)
        with pytest.raises(case.error, match=case.message) as info:
            model(**inputs, **kw)
        _assert_nothing_lost(model, full, inputs)
        if kw:
            with pytest.raises(case.error, match=case.message):
                model.generate(**inputs, **kw, max_new_tokens=2)
            with pytest.raises(case.error, match=case.message):
                with hadapeft.conditioning(model, batch=2, **kw):
                    model(**inputs)
            _assert_unchanged(model, snap)
    else:  # pragma: no cover
        raise AssertionError(case.kind)
    assert type(info.value) is case.error or issubclass(type(info.value), case.error)
    assert type(info.value).__module__.startswith("hadapeft"), type(info.value)


def test_matrix_size():
    assert len(CASES) >= 40
    assert {c.kind for c in CASES} == {"config", "target", "checkpoint", "cond"}
    assert {c.arg[0] for c in CASES if c.kind == "config"} == {G, I, F, H}


# ==== second round (issue 22): after a refused operation every adapter still computes what it computed =============
IDS = torch.tensor([2, 0])


def _adapter_inputs(model, name, inputs):
    """``inputs`` plus what adapter ``name`` conditions on (task ids 2, 0 / fixed task embeddings)."""
    spec = model.peft_config[name]
    if getattr(spec, "task_embed_dim", None):
        return dict(inputs, task_embeds=torch.linspace(-1, 1, 2 * spec.task_embed_dim).view(2, -1))
    if getattr(spec, "num_tasks", None):
        return dict(inputs, task_ids=IDS)
    return inputs


def _outputs(model, inputs) -> dict:
    """What each adapter computes (made active in turn), and the base model; the active adapter is kept."""
    active = list(model.base_model.active_adapters)
    out = {}
    for name in model.peft_config:
        model.base_model.set_adapter(name)
        out[name] = logits(model, _adapter_inputs(model, name, inputs))
    model.base_model.set_adapter(active if len(active) > 1 else active[0])
    with model.disable_adapter():
        out[None] = logits(model, inputs)
    return out


def _full_snapshot(model, inputs):
    configs = {n: (type(c), c.to_dict()) for n, c in model.peft_config.items()}
    return _snapshot(model), configs, _outputs(model, inputs), list(model.base_model.active_adapters)


def _assert_nothing_lost(model, snap, inputs):
    plain, configs, outputs, active = snap
    _assert_unchanged(model, plain)
    assert {n: (type(c), c.to_dict()) for n, c in model.peft_config.items()} == configs
    assert list(model.base_model.active_adapters) == active
    now = _outputs(model, inputs)
    assert now.keys() == outputs.keys()
    for name, y in outputs.items():
        assert torch.equal(now[name], y), f"adapter {name!r} computes something else now"


def _holder(option="gated"):
    """A llama holding adapter 'default' of ``option`` (non-trivial weights)."""
    return _cond_model(option)


# --- class 2: a failed injection undoes only what it did ----------------------------------------------------------
@pytest.mark.parametrize("how", ["base-model", "peft-model"])
def test_failed_injection_of_another_type_keeps_the_adapter_there(how):
    inputs = make_inputs("llama")
    model = _holder("gated")
    snap = _full_snapshot(model, inputs)
    target = model.base_model.model if how == "base-model" else model
    with pytest.raises(TgtErr, match=r"q_proj' already holds an adapter of another type \(GatedLoraLinear\)"):
        get_peft_model(target, F(num_tasks=3, target_modules=["o_proj", "q_proj"]), adapter_name="film")
    _assert_nothing_lost(model, snap, inputs)
    with pytest.raises(CfgErr, match=r"already holds an adapter named 'default' \(GatedLoraConfig\)"):
        get_peft_model(target, F(num_tasks=3, target_modules=["o_proj"]))  # would replace its config
    _assert_nothing_lost(model, snap, inputs)


@pytest.mark.parametrize("option", ["hypermod_tasks", "film_embeds", "ia3_tasks", "gated"])
def test_failed_add_adapter_keeps_the_adapters_there(option):
    """The new adapter fails half-way (its last target is an embedding): its layers, shared hypernetwork,
    conditioning and config go; the adapter already there keeps everything."""
    inputs = make_inputs("llama")
    model = _holder(option)
    snap = _full_snapshot(model, inputs)
    cls, kw = COND[option]
    with pytest.raises(TgtErr, match=r"'model.embed_tokens' is a Embedding"):
        model.add_adapter("b", cls(**kw, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    _assert_nothing_lost(model, snap, inputs)


@pytest.mark.parametrize("option", ["hypermod_tasks", "film_tasks"])
def test_failed_load_adapter_keeps_the_adapters_there(option, tmp_path):
    """The weights do not fit (after injection): the new adapter's layers, hypernetwork and spec go again."""
    inputs = make_inputs("llama")
    cls, kw = COND[option]
    donor = get_peft_model(build_model("llama"), cls(**kw, init_weights=False))
    donor.save_pretrained(tmp_path)
    t = load_file(tmp_path / "adapter_model.safetensors")
    t.pop(sorted(t)[0])
    save_file(t, tmp_path / "adapter_model.safetensors")
    model = _holder(option)
    snap = _full_snapshot(model, inputs)
    with pytest.raises(CkptErr, match="missing from the checkpoint"):
        model.load_adapter(tmp_path, "b")
    _assert_nothing_lost(model, snap, inputs)


def test_failed_from_pretrained_on_a_model_with_adapter_layers_keeps_them(tmp_path, saved_gated):
    """The base model handed to from_pretrained already holds hadapeft layers (on other modules); the checkpoint
    fails after its layers were injected."""
    inputs = make_inputs("llama")
    torch.manual_seed(3)
    model = get_peft_model(build_model("llama"), I(num_tasks=3, target_modules=["o_proj"], init_weights=False))
    snap = _full_snapshot(model, inputs)
    folder = tmp_path / "adapter"
    shutil.copytree(saved_gated, folder)
    _edit_tensors(_drop_first)(folder)
    with pytest.raises(CkptErr, match="1 adapter tensors are missing from the checkpoint"):
        PeftModel.from_pretrained(model.base_model.model, folder, adapter_name="g")
    _assert_nothing_lost(model, snap, inputs)


# --- class 3: adapter names ----------------------------------------------------------------------------------------
BAD_NAMES = ["", "../x", "/tmp/abs", "a/b", "a.b", " default", "training", "forward", "base_layer", "layers",
             "q_proj", "weight", "0", "gated_lora_x", "film_x"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_bad_adapter_names_are_refused(name):
    inputs = make_inputs("llama")
    model = build_model("llama")
    plain = _snapshot(model)
    with pytest.raises(CfgErr, match=r"adapter name .* is not allowed: .*start with a letter"):
        get_peft_model(model, G(r=2, init_weights=False), adapter_name=name)
    _assert_unchanged(model, plain)
    holder = _holder("gated")
    snap = _full_snapshot(holder, inputs)
    with pytest.raises(CfgErr, match=r"adapter name .* is not allowed"):
        holder.add_adapter(name, G(r=2, init_weights=False))
    _assert_nothing_lost(holder, snap, inputs)


@pytest.mark.parametrize("name", ["task-a", "B_2", "x" * 64])
def test_good_adapter_names_save_and_load(name, tmp_path):
    inputs = make_inputs("llama")
    model = _holder("gated")
    model.add_adapter(name, G(r=2, init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / name, name)
    for n in ("default", name):
        model.set_adapter(n)
        loaded.set_adapter(n)
        assert torch.equal(logits(loaded, inputs), logits(model, inputs)), n


# --- class 4: the matrix's checkpoint cases above, and the opt-in ---------------------------------------------------
def test_non_finite_checkpoint_loads_with_the_opt_in(saved_gated, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    shutil.copytree(saved_gated, folder)
    _edit_tensors(_poison(float("nan")))(folder)
    monkeypatch.delenv("HADAPEFT_ALLOW_NONFINITE", raising=False)
    with hadapeft.allow_nonfinite_checkpoints():
        model = PeftModel.from_pretrained(build_model("llama"), folder)
    assert any(bool(torch.isnan(p).any()) for n, p in model.named_parameters() if "gate" in n)
    with pytest.raises(CkptErr, match="NaN"):  # the opt-in ends with the block
        PeftModel.from_pretrained(build_model("llama"), folder)
    monkeypatch.setenv("HADAPEFT_ALLOW_NONFINITE", "1")
    PeftModel.from_pretrained(build_model("llama"), folder)


# --- class 7: conditioning around a call must fit its batch ---------------------------------------------------------
@pytest.mark.parametrize("option", ["film_tasks", "hypermod_embeds", "ia3_tasks"])
def test_conditioning_block_with_fewer_samples_than_the_batch_is_refused(option):
    model = _cond_model(option)
    inputs = make_inputs("llama", batch=4)
    snap = _snapshot(model)
    two = _adapter_inputs(model, "default", {})
    with pytest.raises(CondErr, match=r"the conditioning has 2 samples but an adapted layer received 4 rows"):
        with hadapeft.conditioning(model, **two):
            model(**inputs)
    _assert_unchanged(model, snap)
    # generate's own beam expansion of a fitting batch is fine
    inputs2 = make_inputs("llama", batch=2, seq=4)
    with hadapeft.conditioning(model, **two):
        out = model.generate(**inputs2, num_beams=2, num_return_sequences=2, max_new_tokens=2, do_sample=False)
    assert torch.equal(out, model.generate(**inputs2, **two, num_beams=2, num_return_sequences=2, max_new_tokens=2,
                                           do_sample=False))


# --- class 8: a merged task is the only task -------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["film_tasks", "hypermod_tasks", "ia3_tasks"])
def test_task_ids_after_a_task_merge(option):
    model = _cond_model(option)
    inputs = make_inputs("llama")
    task1 = logits(model, dict(inputs, task_ids=torch.tensor([1, 1])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "added a bias" for FiLM / HyperMod on llama
        model.merge_adapter(task_id=1)
    snap = _snapshot(model)
    assert torch.allclose(logits(model, inputs), task1, atol=1e-5)
    assert torch.allclose(logits(model, dict(inputs, task_ids=torch.tensor([1, 1]))), task1, atol=1e-5)
    with pytest.raises(CondErr, match=r"adapter 'default' is merged into the weights with task_id=1, so it cannot "
                                      r"condition per sample \(got \[0, 2\]\): call unmerge_adapter\(\) first"):
        model(**inputs, task_ids=torch.tensor([0, 2]))
    with pytest.raises(CondErr, match=r"merged into the weights with task_id=1"):
        model.generate(**inputs, task_ids=torch.tensor([0, 2]), max_new_tokens=2)
    with pytest.raises(CondErr, match=r"already merged with task_id=1: call unmerge_adapter\(\) before merging"):
        model.merge_adapter(task_id=0)
    with pytest.raises(CondErr, match=r"already merged with task_id=1"):
        model.merge_and_unload(task_id=0)
    _assert_unchanged(model, snap)
    assert torch.allclose(logits(model, inputs), task1, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, dict(inputs, task_ids=IDS)),
                          _cond_model(option)(**inputs, task_ids=IDS).logits.detach(), atol=1e-5)


@pytest.mark.parametrize("task_id", [torch.tensor([0, 1]), torch.tensor([[1]]).float(), torch.tensor([True])],
                         ids=["two", "float", "bool"])
def test_merge_takes_one_task(task_id):
    model = _cond_model("film_tasks")
    inputs = make_inputs("llama")
    snap = _full_snapshot(model, inputs)
    with pytest.raises(CondErr, match=r"task_id must be one task, an int \(or a one-element integer tensor\)"):
        model.merge_and_unload(task_id=task_id)
    _assert_nothing_lost(model, snap, inputs)


def test_merge_takes_one_task_embedding():
    model = _cond_model("film_embeds")
    inputs = make_inputs("llama")
    snap = _full_snapshot(model, inputs)
    with pytest.raises(CondErr, match=r"task_embeds for a merge must be one vector.*got shape \(2, 6\)"):
        model.merge_adapter(task_embeds=torch.zeros(2, EMB))
    _assert_nothing_lost(model, snap, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_and_unload(task_id=None, task_embeds=torch.zeros(1, EMB))  # (1, d) is one vector


# --- class 10: configs changed after they were built ---------------------------------------------------------------
MUTATIONS = [
    (G, dict(r=2), "r", 0, r"^r must be a positive integer, got 0"),
    (G, dict(r=2), "lora_alpha", "x", r"lora_alpha must be a positive number"),
    (G, dict(r=2), "gate", "matrix", r"gate must be 'vector' or 'scalar'"),
    (G, dict(r=2), "backend", "cuda", r"backend='cuda' is not one of"),
    (F, dict(num_tasks=3), "num_tasks", 0, r"num_tasks must be a positive integer, got 0"),
    (F, dict(num_tasks=3), "task_embed_dim", 4, r"needs exactly one of num_tasks"),
    (H, dict(num_tasks=3), "r", -1, r"r must be a positive integer, got -1"),
    (H, dict(num_tasks=3), "hidden_dim", 2.5, r"hidden_dim must be a positive integer"),
    (I, dict(num_tasks=3), "num_tasks", 0, r"num_tasks must be a positive integer, got 0"),
]


@pytest.mark.parametrize("cls,kw,field_name,value,message", MUTATIONS,
                         ids=[f"{c.__name__}-{f}" for c, _, f, _, _ in MUTATIONS])
def test_config_changed_after_construction_is_validated_at_injection(cls, kw, field_name, value, message):
    inputs = make_inputs("llama")
    cfg = cls(**kw, init_weights=False)
    setattr(cfg, field_name, value)
    model = build_model("llama")
    plain = _snapshot(model)
    with pytest.raises(CfgErr, match=message):
        get_peft_model(model, cfg)
    _assert_unchanged(model, plain)
    holder = _holder("ia3_tasks" if cls is I else "film_tasks" if cls is F else "hypermod_tasks" if cls is H
                     else "gated")
    snap = _full_snapshot(holder, inputs)
    with pytest.raises(CfgErr, match=message):
        holder.add_adapter("b", cfg)
    _assert_nothing_lost(holder, snap, inputs)


# --- class 11: clear errors, and low_cpu_mem_usage -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [F, H, I])
def test_a_num_tasks_too_large_to_allocate_names_num_tasks(cls):
    inputs = make_inputs("llama")
    model = build_model("llama")
    plain = _snapshot(model)
    with pytest.raises(CfgErr, match=r"cannot allocate adapter 'default' \(.*num_tasks=1099511627776.*\) for module"):
        get_peft_model(model, cls(num_tasks=2 ** 40))
    _assert_unchanged(model, plain)
    holder = _holder("gated" if cls is not I else "ia3")
    if cls is I:
        snap = _full_snapshot(holder, inputs)
        with pytest.raises(CfgErr, match=r"num_tasks=1099511627776"):
            holder.add_adapter("b", cls(num_tasks=2 ** 40))
        _assert_nothing_lost(holder, snap, inputs)


@pytest.mark.parametrize("option", list(COND))
def test_low_cpu_mem_usage_loads_every_type(option, tmp_path):
    inputs = make_inputs("llama")
    model = _cond_model(option)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path, low_cpu_mem_usage=True)
    kw = _adapter_inputs(model, "default", inputs)
    assert torch.equal(logits(loaded, kw), logits(model, kw))
    assert not any(p.is_meta for p in loaded.parameters())


def test_start_up_hint_names_a_wrongly_written_hadapeft_type(monkeypatch):
    """Without `import hadapeft`, a type written in the wrong case still gets the hint (and the spelling to fix)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_hint_case", Path(__file__).parents[1] / "_hadapeft_peft_hint.py")
    hint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hint)
    hint._remove()
    monkeypatch.delitem(sys.modules, "hadapeft")
    with pytest.raises(ValueError, match=r"hadapeft GATED_LORA adapter: run `import hadapeft`.*write its peft_type as "
                                         r"'GATED_LORA' \(not 'gated_lora'\)"):
        hint._check("gated_lora")
    hint._check("LORA")  # peft's own: untouched


# --- class 12: task_ids while no conditioned adapter is active -----------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


@pytest.mark.parametrize("cls", [F, H])
def test_task_ids_are_ignored_while_the_conditioned_adapter_is_disabled(cls):
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), cls(num_tasks=3, init_weights=False, task_type="CAUSAL_LM"))
    inputs = make_inputs("llama")
    with model.disable_adapter():
        base = logits(model, inputs)
        assert torch.equal(logits(model, dict(inputs, task_ids=IDS)), base)
        greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(**inputs, task_ids=IDS, max_new_tokens=3, do_sample=False), greedy)
    assert not torch.equal(logits(model, dict(inputs, task_ids=IDS)), base)  # enabled again: ids used


def test_task_ids_are_ignored_on_a_custom_module_when_the_conditioned_adapter_is_not_active():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    model = get_peft_model(MLP(), I(num_tasks=3, target_modules=["lin"], init_weights=False))
    model.add_adapter("plain", I(target_modules=["lin"], init_weights=False))
    with model.disable_adapter():
        assert torch.equal(model(x, task_ids=IDS), model(x))
    model.set_adapter("plain")
    plain = model(x)
    assert torch.equal(model(x, task_ids=IDS), plain)
    model.delete_adapter("default")  # the conditioned one: code passing the same batch keeps working
    assert torch.equal(model(x, task_ids=IDS), plain)
    assert torch.equal(model(x, task_embeds=torch.zeros(2, 4)), plain)


def test_task_ids_are_ignored_by_generate_when_an_unconditioned_adapter_is_active():
    """The same batch (task_ids column included) with the conditioned adapter and with another one, as a DPO-style
    reference pass does: forward and generate run the active adapter and ignore the ids."""
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), I(num_tasks=3, init_weights=False, task_type="CAUSAL_LM"))
    model.add_adapter("plain", I(init_weights=False, task_type="CAUSAL_LM"))
    inputs = make_inputs("llama")
    model.set_adapter("plain")
    plain = logits(model, inputs)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(logits(model, dict(inputs, task_ids=IDS)), plain)
    assert torch.equal(model.generate(**inputs, task_ids=IDS, max_new_tokens=3, do_sample=False), greedy)
    model.set_adapter("default")
    assert not torch.equal(logits(model, dict(inputs, task_ids=IDS)), plain)


def test_half_precision_generate_uses_the_task_ids():
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama").half(), F(num_tasks=3, init_weights=False, task_type="CAUSAL_LM"))
    model.eval()
    inputs = make_inputs("llama", seq=4)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2)
    by_task = {t: model.generate(**inputs, task_ids=torch.tensor([t, t]), **kw) for t in range(3)}
    assert len({tuple(v.flatten().tolist()) for v in by_task.values()}) > 1  # the ids reach the layers
    with hadapeft.conditioning(model, task_ids=torch.tensor([1, 1])):
        assert torch.equal(model.generate(**inputs, **kw), by_task[1])
