"""bitsandbytes 8-bit and 4-bit bases (on CPU): identity, QLoRA-style training, merge and exact unmerge, in both of
bitsandbytes' CPU layouts of 4-bit weights (``bnb_layout`` in conftest.py: the standard one, and the one repacked for
the AVX512-BF16 kernel, which bitsandbytes picks on such CPUs)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import transformers as tf  # noqa: E402
from peft import get_peft_model  # noqa: E402

import hadapeft  # noqa: E402
from hadapeft.core.layer import HadaLayer  # noqa: E402
from conftest import (BNB_LAYOUTS, BNB_LLAMA, emulated_gemv_4bit, force_bnb_layout, logits,  # noqa: E402
                      make_inputs, use_bnb_layout)

QUANT = {
    "8bit": lambda: tf.BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_quant_type="nf4"),
}
ADAPTERS = {
    "gated": lambda init: hadapeft.GatedLoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_weights=init),
    "ia3": lambda init: hadapeft.HadaIA3Config(init_weights=init),  # down_proj input-scaled: gradient through W
}
# 8-bit weights have one layout; 4-bit ones are tested in both.
CASES = [pytest.param(q, a, lay, id=f"{q}-{a}" + (f"-{lay}" if lay else ""))
         for q in QUANT for a in ADAPTERS for lay in ((None,) if q == "8bit" else BNB_LAYOUTS)]


def save_base(path):
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**BNB_LLAMA)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("llama"))


def quantized(base_dir, quant):
    return tf.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANT[quant](),
                                                   device_map="cpu").eval()


def is_cpu_packed(weight) -> bool:
    """Whether bitsandbytes repacked this 4-bit weight for its AVX512-BF16 CPU kernel (its own flag)."""
    return bool(getattr(weight.quant_state, "packing_format_for_cpu", False))


def packed_layers(model) -> int:
    return sum(isinstance(m, bnb.nn.Linear4bit) and is_cpu_packed(m.weight) for m in model.modules())


@pytest.mark.parametrize("quant,adapter,layout", CASES)
def test_identity_and_training(base_dir, quant, adapter, layout, monkeypatch):
    if layout:
        use_bnb_layout(monkeypatch, layout)
    inputs = make_inputs("llama")
    ref = logits(quantized(base_dir, quant), inputs)
    model = get_peft_model(quantized(base_dir, quant), ADAPTERS[adapter](True))
    layers = [m for m in model.modules() if isinstance(m, HadaLayer)]
    assert layers and all(m.base_kind == quant for m in layers)
    assert torch.equal(logits(model, inputs), ref)
    if quant == "4bit":  # the eval forward above ran in the layout under test
        assert (packed_layers(model) > 0) == (layout == "repacked")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    labels = inputs["input_ids"]
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("quant,adapter,layout", CASES)
def test_merge_unmerge(base_dir, quant, adapter, layout, monkeypatch):
    """Merging re-quantizes (lossy), so the merged output is compared with how far the adapter moves the output;
    unmerge puts the original quantized weights back bit for bit."""
    if layout:
        use_bnb_layout(monkeypatch, layout)
    inputs = make_inputs("llama")
    base_out = logits(quantized(base_dir, quant), inputs)
    torch.manual_seed(0)
    model = get_peft_model(quantized(base_dir, quant), ADAPTERS[adapter](False))
    adapted = logits(model, inputs)
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    adapted = logits(model, inputs)  # again: the state dict above must not change what the model computes
    model.merge_adapter()
    merged = logits(model, inputs)
    assert (merged - adapted).abs().max() < 0.5 * (base_out - adapted).abs().max()
    model.unmerge_adapter()
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in original.items())
    assert torch.allclose(logits(model, inputs), adapted, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, HadaLayer) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.v_proj).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quant]
    assert (logits(plain, inputs) - adapted).abs().max() < 0.5 * (base_out - adapted).abs().max()


# --- the repacked layout ------------------------------------------------------------------------------------------
def _grads(model, inputs):
    model.train()
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_training_after_inference_in_the_repacked_layout(base_dir, monkeypatch, adapter):
    """Evaluating first repacks the 4-bit weights; bitsandbytes' repacked matmul has no backward, so without care
    every adapter before (or inside) a repacked layer gets no gradient. The gradients must be those of a model that
    never evaluated (to bf16 rounding: repacking rounds the quantization scales to bf16 once)."""
    use_bnb_layout(monkeypatch, "repacked")
    inputs = make_inputs("llama")
    torch.manual_seed(0)
    fresh = get_peft_model(quantized(base_dir, "4bit"), ADAPTERS[adapter](False))
    torch.manual_seed(0)
    evaluated = get_peft_model(quantized(base_dir, "4bit"), ADAPTERS[adapter](False))
    logits(evaluated, inputs)
    assert packed_layers(evaluated) > 0
    expected, got = _grads(fresh, inputs), _grads(evaluated, inputs)
    assert expected.keys() == got.keys()
    for k, g in expected.items():
        assert got[k] is not None, f"{k}: no gradient"
        assert (got[k] - g).norm() <= 0.05 * g.norm(), k


def test_state_dict_of_a_repacked_model_changes_nothing(base_dir, monkeypatch):
    """bitsandbytes' own inverse of the repacking (run by Linear4bit's state dict) leaves the scales of non-nested
    weights transposed; in an adapted model, taking a state dict must not change what any layer computes."""
    use_bnb_layout(monkeypatch, "repacked")
    inputs = make_inputs("llama")
    torch.manual_seed(0)
    model = get_peft_model(quantized(base_dir, "4bit"), ADAPTERS["gated"](False))
    before = logits(model, inputs)
    assert packed_layers(model) > 0
    state = model.state_dict()
    assert packed_layers(model) == 0
    assert torch.equal(logits(model, inputs), before)
    again = model.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("nested", [False, True])
def test_dense_weight_of_either_layout(base_dir, monkeypatch, nested):
    """What hadapeft merges with (the dense weight) is what the layer computes with, in either layout."""
    from hadapeft.core import frozen

    force_bnb_layout(monkeypatch, "repacked")  # the layouts' maths, whatever HADAPEFT_TEST_BNB_REPACK says
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested)
    torch.manual_seed(0)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested, module=layer)
    layer = layer.to("cpu").eval()
    x = torch.randn(5, 128)
    standard = frozen.dense_weight(layer, "4bit", torch.float32)
    with torch.no_grad():
        y = layer(x)  # repacks
    assert is_cpu_packed(layer.weight)
    repacked = frozen.dense_weight(layer, "4bit", torch.float32)
    assert is_cpu_packed(layer.weight)  # reading it changed nothing
    scale = standard.abs().max()
    assert (repacked - standard).abs().max() <= 2 ** -7 * scale  # the scales rounded to bf16, nothing else
    assert (x @ repacked.t() - y).abs().max() <= 0.02 * y.abs().max()  # the bf16 kernel computes with it


def test_the_emulated_kernel_matches_the_native_one(monkeypatch):
    """conftest.emulated_gemv_4bit stands in for bitsandbytes' AVX512-BF16 kernel on other CPUs: check it here."""
    import bitsandbytes.functional as F

    if not F.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: no native kernel to compare with")
    force_bnb_layout(monkeypatch, "repacked")  # whatever HADAPEFT_TEST_BNB_REPACK says: this compares the kernels
    layer = bnb.nn.Linear4bit(192, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=False)
    torch.manual_seed(0)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 192), requires_grad=False, quant_type="nf4",
                                     compress_statistics=False, module=layer)
    layer = layer.to("cpu").eval()
    x = torch.randn(7, 192)
    with torch.no_grad():
        native = layer(x)
    assert is_cpu_packed(layer.weight)
    emulated = emulated_gemv_4bit(x, layer.weight.data, state=layer.weight.quant_state)
    assert (emulated - native).abs().max() <= 0.01 * native.abs().max()
