"""bitsandbytes 8-bit and 4-bit bases (on CPU): identity, QLoRA-style training, merge and exact unmerge."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import transformers as tf  # noqa: E402
from peft import get_peft_model  # noqa: E402

import hadapeft  # noqa: E402
from hadapeft.core.layer import HadaLayer  # noqa: E402
from conftest import build_model, logits, make_inputs  # noqa: E402

QUANT = {
    "8bit": lambda: tf.BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_quant_type="nf4"),
}
ADAPTERS = {
    "gated": lambda init: hadapeft.GatedLoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_weights=init),
    "ia3": lambda init: hadapeft.HadaIA3Config(init_weights=init),
}
CASES = [(q, a) for q in QUANT for a in ADAPTERS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_model("llama").save_pretrained(path)
    return path


def quantized(base_dir, quant):
    return tf.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANT[quant](),
                                                   device_map="cpu").eval()


@pytest.mark.parametrize("quant,adapter", CASES)
def test_identity_and_training(base_dir, quant, adapter):
    inputs = make_inputs("llama")
    ref = logits(quantized(base_dir, quant), inputs)
    model = get_peft_model(quantized(base_dir, quant), ADAPTERS[adapter](True))
    layers = [m for m in model.modules() if isinstance(m, HadaLayer)]
    assert layers and all(m.base_kind == quant for m in layers)
    assert torch.equal(logits(model, inputs), ref)
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


@pytest.mark.parametrize("quant,adapter", CASES)
def test_merge_unmerge(base_dir, quant, adapter):
    """Merging re-quantizes (lossy), so the merged output is compared with how far the adapter moves the output;
    unmerge puts the original quantized weights back bit for bit."""
    inputs = make_inputs("llama")
    base_out = logits(quantized(base_dir, quant), inputs)
    torch.manual_seed(0)
    model = get_peft_model(quantized(base_dir, quant), ADAPTERS[adapter](False))
    adapted = logits(model, inputs)
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
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
