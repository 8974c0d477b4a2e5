"""torch.compile and host syncs: every registered adapter option set compiles to one graph (0 graph breaks inside the
model) with conditioning passed as kwargs or through ``hadapeft.conditioning``, a compiled training step computes
what the eager one computes, and no conditioned forward reads a tensor back to the host (``.item()``: a CUDA sync that
also blocks CUDA-graph capture)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch.profiler import ProfilerActivity, profile

import hadapeft
from conftest import build_model, make_inputs
from test_contract import BATCH, adapter_type, cases, cond, peft_model

OPTIONS = sorted({o for o, _ in cases()})
CONDITIONED = [o for o in OPTIONS if adapter_type(o).make_config(o).conditioning_spec() is not None]


def _explain(fn, *args, **kwargs):
    dynamo.reset()
    return dynamo.explain(fn)(*args, **kwargs)


@pytest.mark.parametrize("option", OPTIONS)
def test_one_graph_with_conditioning_kwargs(option):
    family = "gpt2" if option == "ia3_fused_qkv" else "llama"
    model = peft_model(option, family)
    ex = _explain(model, **make_inputs(family, batch=BATCH), **cond(model, range(BATCH)))
    reasons = [str(b.reason).splitlines()[0] for b in ex.break_reasons]
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), reasons


@pytest.mark.parametrize("option", CONDITIONED)
def test_one_graph_with_the_conditioning_block(option):
    model = peft_model(option, "llama")
    inputs = make_inputs("llama", batch=BATCH)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    dynamo.reset()
    with hadapeft.conditioning(model, **cond(model, [0, 1, 2])):
        out = compiled(**inputs).logits
    with hadapeft.conditioning(model, **cond(model, [2, 2, 0])):  # new ids: the same graph, new values
        out2 = compiled(**inputs).logits
    with torch.no_grad():
        assert torch.allclose(out, model(**inputs, **cond(model, [0, 1, 2])).logits, atol=1e-6)
        assert torch.allclose(out2, model(**inputs, **cond(model, [2, 2, 0])).logits, atol=1e-6)


def _train_step(model, inputs, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                          if p.requires_grad}


@pytest.mark.parametrize("option", OPTIONS)
def test_compiled_training_step_equals_eager(option):
    """fullgraph compile through AOTAutograd (forward and backward graphs; the eager backend, so no C++ build)."""
    family = "gpt2" if option == "ia3_fused_qkv" else "llama"
    model = peft_model(option, family)
    model.train()
    for m in model.modules():  # dropout would differ between the two runs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inputs = make_inputs(family, batch=BATCH)
    kwargs = cond(model, [2, 0, 1])
    out, grads = _train_step(model, inputs, kwargs)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    c_out, c_grads = _train_step(compiled, inputs, kwargs)
    assert torch.allclose(c_out, out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == c_grads.keys() and grads
    for n in grads:
        assert torch.allclose(c_grads[n], grads[n], atol=1e-5, rtol=1e-4), n


def test_inductor_compiled_training_step_equals_eager():
    """One adapter through the default (inductor) backend, as users compile."""
    model = peft_model("gated_vector", "llama")
    model.train()
    inputs = make_inputs("llama", batch=BATCH)
    out, grads = _train_step(model, inputs, {})
    dynamo.reset()
    c_out, c_grads = _train_step(torch.compile(model, fullgraph=True), inputs, {})
    assert torch.allclose(c_out, out, atol=1e-5, rtol=1e-5)
    for n in grads:
        assert torch.allclose(c_grads[n], grads[n], atol=1e-5, rtol=1e-4), n


def _host_reads(model, inputs, kwargs) -> int:
    """aten::_local_scalar_dense / aten::item calls in one training step (forward + backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs, **kwargs).logits.sum().backward()
    return sum(e.name in ("aten::_local_scalar_dense", "aten::item") for e in prof.events())


@pytest.mark.parametrize("option", CONDITIONED)
def test_conditioned_forward_does_not_read_tensors_back_to_the_host(option):
    """transformers' Llama itself reads a few scalars (mask creation); the adapters must add none."""
    inputs = make_inputs("llama", batch=BATCH)
    base = build_model("llama").train()
    model = peft_model(option, "llama").train()
    assert _host_reads(model, inputs, cond(model, [0, 2, 1])) == _host_reads(base, inputs, {})


def test_out_of_range_task_ids_are_still_refused():
    model = peft_model("film_tasks", "llama")
    with pytest.raises(hadapeft.ConditioningError, match=r"task_ids out of range .* got values in \[0, 3\]"):
        model(**make_inputs("llama", batch=2), task_ids=torch.tensor([0, 3]))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    dynamo.reset()
    with pytest.raises(RuntimeError, match="task_ids out of range"):  # a device-side assertion under compile
        compiled(**make_inputs("llama", batch=2), task_ids=torch.tensor([0, 3]))
