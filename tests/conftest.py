"""Tiny models of each supported family, built from configs (no Hub access), and their inputs."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

VOCAB = 96


def _lm(config_cls, model_cls, **kw):
    def build():
        cfg = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, **kw)
        return model_cls(cfg)
    return build


FAMILIES = {
    "llama": (_lm(tf.LlamaConfig, tf.LlamaForCausalLM), "CAUSAL_LM", None),
    "qwen2": (_lm(tf.Qwen2Config, tf.Qwen2ForCausalLM), "CAUSAL_LM", None),
    "mistral": (_lm(tf.MistralConfig, tf.MistralForCausalLM), "CAUSAL_LM", None),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                      n_positions=64)), "CAUSAL_LM", None),
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=3)), "SEQ_CLS", None),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=3)), None, ["classifier"]),
}


def build_model(family: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = FAMILIES[family][0]().to(dtype).eval()
    return model


def make_inputs(family: str, batch: int = 2, seq: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


# --- ops and kernels against the fp64 formula (tests/test_ops.py, tests/test_kernels.py) ------------------------
def check_against_fp64(name, out, eager, ref, dtype, ulps):
    """``|out − ref64| ≤ 2 · |eager − ref64| + floor`` (flash-attn's rule): eager is the same formula in the input
    dtype through plain autograd, floor a few ulps of the output's magnitude."""
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != eager {eager.dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    floor = ulps * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * eager_err + floor, f"{name}: error {err:.3e} > 2 × eager {eager_err:.3e} + {floor:.1e}"


def outputs_and_grads(fn, inputs, dy):
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, dy.to(y.dtype)))


def op_eager_fp64(fn, ref_fn, inputs, dy):
    """Outputs and gradients of ``fn``, the eager same-dtype formula and the fp64 formula. ``fn(*inputs)`` and
    ``ref_fn(*inputs, upcast=...)`` take the differentiable inputs; the fp64 run gets fp64 leaves, so that its
    gradients are not rounded back to the input dtype."""
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    return (outputs_and_grads(fn, inputs, dy),
            outputs_and_grads(lambda *a: ref_fn(*a, upcast=False), inputs, dy),
            outputs_and_grads(lambda *a: ref_fn(*a, upcast=True), inputs64, dy))
