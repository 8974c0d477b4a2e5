"""Serving many tasks from one adapter: during one ``generate`` call the conditioning of the batch is computed once
(FiLM's ``task_embeds`` generator per layer, HyperMod's hypernetwork), not once per new token, with the same outputs
as computing it every time; and ``scripts/bench_serving.py`` produces its table (not its timings)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from peft import get_peft_model

import hadapeft
from conftest import build_model, make_inputs
from hadapeft.core import conditioning as conditioning_mod
from hadapeft.tuners.hypermod import HyperNet

EMB = 6
IDS = torch.tensor([2, 0, 1])
CONFIGS = {  # option -> (config, conditioning of a batch of 3 mixed tasks)
    "film_embeds": lambda: hadapeft.FiLMConfig(task_embed_dim=EMB, init_weights=False),
    "hypermod_ids": lambda: hadapeft.HyperModConfig(num_tasks=3, init_weights=False),
    "hypermod_embeds": lambda: hadapeft.HyperModConfig(task_embed_dim=EMB, init_weights=False),
}
options = pytest.mark.parametrize("option", list(CONFIGS))
NEW = 5  # new tokens per generate call


def model_and_cond(option):
    config = CONFIGS[option]()
    model = get_peft_model(build_model("llama"), config).eval()
    embeds = torch.randn(3, EMB, generator=torch.Generator().manual_seed(5))
    cond = {"task_ids": IDS} if config.num_tasks else {"task_embeds": embeds}
    return model, cond


def count_conditioning_calls(model) -> Counter:
    """A live count of forward calls per conditioning module: each FiLM layer's generator, HyperMod's hypernetwork."""
    calls = Counter()
    for name, module in model.named_modules():
        if name.endswith("film_generator.default") or isinstance(module, HyperNet):
            module.register_forward_hook(lambda *_, name=name: calls.update([name]))
    assert calls == Counter() and any(n.endswith("film_generator.default") or isinstance(m, HyperNet)
                                      for n, m in model.named_modules())
    return calls


@pytest.fixture
def no_cache(monkeypatch):
    """Inside the block, compute the conditioning every time (the path before the cache, for reference outputs)."""
    import contextlib

    @contextlib.contextmanager
    def off():
        with monkeypatch.context() as m:
            m.setattr(conditioning_mod.Conditioning, "once_per_generate", lambda self, key, compute: compute())
            yield
    return off


GENERATE = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sample": dict(do_sample=True, top_k=5, num_return_sequences=2),
}


@options
@pytest.mark.parametrize("mode", list(GENERATE))
def test_generate_computes_the_conditioning_once_with_the_same_outputs(option, mode, no_cache):
    model, cond = model_and_cond(option)
    inputs = make_inputs("llama", batch=3, seq=5)
    calls = count_conditioning_calls(model)
    kw = dict(GENERATE[mode], max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    torch.manual_seed(0)
    out = model.generate(**inputs, **cond, **kw)
    assert out.sequences.shape[1] == 5 + NEW
    assert set(calls.values()) == {1}, calls  # once per call, every module
    calls.clear()
    with no_cache():
        torch.manual_seed(0)
        ref = model.generate(**inputs, **cond, **kw)
    assert set(calls.values()) == {NEW}, calls  # the uncached path: once per new token (prefill included)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)


@options
def test_greedy_generate_matches_per_token_forward(option):
    """Each new token's logits equal a plain forward of the whole sequence so far (no KV cache, no generate)."""
    model, cond = model_and_cond(option)
    inputs = make_inputs("llama", batch=3, seq=5)
    out = model.generate(**inputs, **cond, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        full = model(input_ids=out.sequences, **cond).logits  # (B, 5 + NEW, V)
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, 4 + t], atol=1e-5, rtol=1e-5)


@options
def test_the_cache_lives_for_one_generate_call(option, no_cache):
    """A second call recomputes (a weight change between calls is seen), and outside generate every forward
    computes the conditioning, with or without gradients."""
    model, cond = model_and_cond(option)
    inputs = make_inputs("llama", batch=3, seq=5)
    calls = count_conditioning_calls(model)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    first = model.generate(**inputs, **cond, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    second = model.generate(**inputs, **cond, **kw)
    assert set(calls.values()) == {2}, calls
    with no_cache():
        assert torch.equal(model.generate(**inputs, **cond, **kw), second)
    assert not torch.equal(first, second)

    calls.clear()
    with hadapeft.conditioning(model, **cond):
        with torch.no_grad():
            model(**inputs)
            model(**inputs)
        model(**inputs).logits.sum().backward()
        with conditioning_mod.generating():  # inside a generate scope but with gradients on (training code)
            model(**inputs)
    assert set(calls.values()) == {4}, calls


def test_bench_serving_ci_writes_every_method_and_task_count(tmp_path):
    """The serving benchmark's small mode (tiny random Llama, T = 4): JSON, table and plot with a row per method and
    number of tasks, ratios against the base model of the same run, merged rows, and peft IA3 either measured or
    with the reason it is not (its timings are not checked)."""
    from scripts import bench_serving

    bench_serving.main(["--ci", "--tasks", "2", "4", "--out-dir", str(tmp_path), "--tag", "test"])
    result = json.loads(next(tmp_path.glob("*-test.json")).read_text())
    rows = {(r["method"], r["tasks"]): r for r in result["rows"]}
    methods = [*bench_serving.PEFT, *bench_serving.HADAPEFT]
    assert set(rows) == {("base", None)} | {(m, T) for m in methods for T in (2, 4)}
    for (method, T), r in rows.items():
        if r.get("skipped"):
            assert method == "peft_ia3" and "adapter_names" in r["skipped"], r
            continue
        assert r["generate_ms"] > 0 and r["prefill_ms"] > 0 and r["generate_tokens_per_s"] > 0, r
        assert r["generate_x_base"] == pytest.approx(r["generate_ms"] / rows[("base", None)]["generate_ms"])
    for method in methods:  # no adapter is the identity
        if not rows[(method, 2)].get("skipped"):
            assert rows[(method, 2)]["max_logit_diff_vs_base"] > 1e-3, method
    merged = {r["method"]: r for r in result["merged_rows"]}
    assert set(merged) == {"base"} | {f"merged_{m}" for m in bench_serving.MERGED}
    for m in bench_serving.MERGED:  # the merged model computes the adapter's task 0
        assert merged[f"merged_{m}"]["max_logit_diff_vs_unmerged"] < 1e-4
    md = next(tmp_path.glob("*-test.md")).read_text()
    for method in methods:
        assert f"| {method} |" in md
    assert "| T = 2 | T = 4 |" in md and "merged_film_ids" in md and "generate ≤ 1.15× base" not in md
    assert next(tmp_path.glob("*-test.png")).stat().st_size > 10_000
