"""Tiny models of each supported family, built from configs (no Hub access), and their inputs."""

from __future__ import annotations

import os

import pytest

# Before torch starts OpenMP: its threads sleep when idle instead of spinning. On a busy machine spinning threads fight
# the other processes for the cores (measured: the comparison's ViT pre-training took 1030 s under load ~8 with the
# default policy, 24 s with PASSIVE). Subprocesses the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

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


# --- bitsandbytes' two CPU layouts of 4-bit weights (tests/test_bnb.py and the other quantized tests) --------------
# bitsandbytes repacks a 4-bit weight for its bf16 CPU kernel when the Linear4bit was built with has_avx512bf16()
# true (read in bitsandbytes.nn.modules) and first runs in eval mode without autograd. Setting that flag tests both
# layouts on any machine; HADAPEFT_TEST_BNB_REPACK=on|off forces one layout for the whole session instead.
BNB_LAYOUTS = ("repacked", "standard")
# A Llama whose linear layers are as wide as real 4-bit models' (the repacking needs in_features >= the 64-element
# quantization block and out_features a multiple of 32).
BNB_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def emulated_gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """bitsandbytes' repacked CPU matmul (``bitsandbytes.functional.gemv_4bit`` on a repacked weight) for CPUs without
    AVX512-BF16, written from its layout: dequantize the (N, K/2) tiles with the transposed bf16 absmax table, then a
    bf16 matmul as the native kernel does. ``tests/test_bnb.py`` checks it against the native kernel where the CPU
    has one."""
    import copy

    import bitsandbytes.functional as F

    qs = copy.copy(state)
    qs.original_nested = False
    data, qs = F._convert_weight_packed_for_cpu_inverse(B.clone(), qs)
    qs.absmax = state.absmax.t().reshape(-1).float()
    qs.nested, qs.dtype = False, torch.float32
    w = F.dequantize_4bit(data, qs).to(torch.bfloat16)
    y = (A.to(torch.bfloat16) @ w.t()).to(A.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def force_bnb_layout(monkeypatch, layout: str) -> None:
    """Make Linear4bit layers built from now on use ``layout`` ("repacked" or "standard") on this CPU."""
    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as modules

    repack = layout == "repacked"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: repack)
    if repack and not F.has_avx512bf16():  # no native kernel here: bitsandbytes registered none
        monkeypatch.setattr(F, "gemv_4bit", emulated_gemv_4bit)


def use_bnb_layout(monkeypatch, layout: str) -> None:
    """``force_bnb_layout`` for a test parametrized over ``BNB_LAYOUTS`` (skipped where the session forces the other)."""
    pytest.importorskip("bitsandbytes")
    forced = os.environ.get("HADAPEFT_TEST_BNB_REPACK")
    if forced and layout != {"on": "repacked", "off": "standard"}[forced]:
        pytest.skip(f"HADAPEFT_TEST_BNB_REPACK={forced}")
    force_bnb_layout(monkeypatch, layout)


def pytest_configure(config):
    forced = os.environ.get("HADAPEFT_TEST_BNB_REPACK")
    if forced:
        if forced not in ("on", "off"):
            raise pytest.UsageError(f"HADAPEFT_TEST_BNB_REPACK must be on or off, got {forced!r}")
        force_bnb_layout(pytest.MonkeyPatch(), "repacked" if forced == "on" else "standard")
