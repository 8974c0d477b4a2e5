"""Conditioned adapters trained by the ecosystem's trainers from a dataset column: TRL's ``SFTTrainer`` (prompt /
completion data, so completion-only loss; packing) and ``DPOTrainer`` through ``hadapeft.SFTTrainer`` /
``hadapeft.DPOTrainer``, and transformers' ``Trainer`` for sequence classification. Every batch mixes tasks.

Tiny random models (tests/conftest.py) and a character tokenizer built here, so nothing is downloaded."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="needs trl (the test extra)")
datasets = pytest.importorskip("datasets", reason="needs datasets (the test extra)")

import transformers as tf  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402

import hadapeft  # noqa: E402
from conftest import VOCAB, build_model  # noqa: E402
from test_loading import _run_fresh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMB = 6  # task_embed_dim of the task_embeds cases
BANK = torch.randn(3, EMB, generator=torch.Generator().manual_seed(5))  # a fixed conditioning vector per task
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is 2-5x faster than two when other processes share the cores (measured, 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data: three tasks over the same prompts --------------------------------------------------------------------
def char_tokenizer() -> tf.PreTrainedTokenizerFast:
    """One token per character (the tiny Llama has a vocabulary of 96)."""
    chars = "abcdefghijklmnopqrstuvwxyz:"
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *chars])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# What each task does to the prompt's word: copy it, reverse it, shift each letter by one.
RULES = (lambda w: w, lambda w: w[::-1], lambda w: "".join(chr(ord(c) + 1) for c in w))
ALPHABETS = ("abcdefgh", "ijklmnop", "qrstuvwx")  # disjoint=True: a row's letters tell its task


def sft_rows(n: int, seed: int = 0, column: str = "task_ids", disjoint: bool = False) -> datasets.Dataset:
    """Prompt-completion rows ``"word:"`` -> ``RULES[task](word)``; example i has task i % 3 (every batch of a
    multiple of 3 taken in order mixes all three)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], column: []}
    for i in range(n):
        task = i % 3
        word = "".join(rng.choice(ALPHABETS[task if disjoint else 0]) for _ in range(rng.randint(3, 5)))
        rows["prompt"].append(word + ":")
        rows["completion"].append(RULES[task](word))
        rows[column].append(task if column == "task_ids" else BANK[task].tolist())
    return datasets.Dataset.from_dict(rows)


def sft_args(tmp_path, **kw) -> trl.SFTConfig:
    return trl.SFTConfig(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=10,
                                   learning_rate=5e-2, lr_scheduler_type="constant", max_length=32, use_cpu=True,
                                   train_sampling_strategy="sequential", save_strategy="no", logging_steps=1,
                                   disable_tqdm=True, bf16=False, seed=0), **kw})


def cond_kwargs(column: str, tasks) -> dict:
    tasks = torch.as_tensor(tasks)
    return {"task_ids": tasks} if column == "task_ids" else {"task_embeds": BANK[tasks]}


def sample_losses(model, batch) -> torch.Tensor:
    """(B,) mean next-token loss of each row over its labelled tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return tok.sum(1) / (labels != -100).sum(1)


def assert_mixed_batches(trainer, column):
    for batch in trainer.get_train_dataloader():
        tasks = batch[column] if column == "task_ids" else (batch[column][:, None] == BANK).all(-1).float().argmax(1)
        assert sorted(set(tasks.tolist())) == [0, 1, 2], tasks


def train_and_record(trainer, family: str, inputs: dict, eval_dataset=None) -> dict:
    """Eval loss before and after ``trainer.train()``, the saved adapter, and the trained model's logits on
    ``inputs`` (for the fresh-process reload)."""
    before = trainer.evaluate(eval_dataset)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_dataset)["eval_loss"]
    trainer.save_model()
    with torch.no_grad():
        logits = trainer.model.eval()(**inputs).logits
    return dict(before=before, after=after, adapter=trainer.args.output_dir, family=family, inputs=inputs,
                logits=logits)


# --- (1) SFTTrainer: each adapter type trains; loss falls; reloads in a fresh process ---------------------------
SFT_CASES = {  # name: (config class, its options, learning rate)
    "gated_lora": (hadapeft.GatedLoraConfig, dict(r=4, lora_alpha=8), 5e-2),
    "film": (hadapeft.FiLMConfig, dict(num_tasks=3), 5e-2),
    "hypermod": (hadapeft.HyperModConfig, dict(num_tasks=3), 5e-2),
    "ia3_tasks": (hadapeft.HadaIA3Config, dict(num_tasks=3, feedforward_modules=["down_proj"]), 0.5),
}


def sft_config(name, **overrides):
    cls, options, _ = SFT_CASES[name]
    return cls(**{"target_modules": TARGETS, **options, **overrides})


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """Train each case for 10 steps (batches of 6 mixing the three tasks); eval loss before and after on held-out
    rows (the eval batches carry the task column too); the saved adapter and its logits on a mixed batch. The data
    has a task column for Gated LoRA too: unconditioned, it must be dropped as TRL drops it."""
    runs = {}
    tok = char_tokenizer()
    probe = tok(["abc:abc</s>", "abc:cba</s>", "abc:bcd</s>"], return_tensors="pt")
    for name, (_, _, lr) in SFT_CASES.items():
        out = tmp_path_factory.mktemp(name)
        trainer = hadapeft.SFTTrainer(build_model("llama"), args=sft_args(out, learning_rate=lr),
                                      train_dataset=sft_rows(30), processing_class=tok, peft_config=sft_config(name))
        assert isinstance(trainer, trl.SFTTrainer)
        conditioned = name != "gated_lora"
        if conditioned:
            assert_mixed_batches(trainer, "task_ids")
        else:
            assert "task_ids" not in next(iter(trainer.get_train_dataloader()))
        inputs = {**probe, **(cond_kwargs("task_ids", [0, 1, 2]) if conditioned else {})}
        runs[name] = train_and_record(trainer, "llama", inputs, eval_dataset=sft_rows(24, seed=1))
    return runs


@pytest.mark.parametrize("name", list(SFT_CASES))
def test_sft_trainer_trains_each_adapter_type(sft_runs, name):
    run = sft_runs[name]
    # Measured: the held-out loss falls from 4.60 to 4.38 (gated_lora, film, hypermod) and 4.43 (ia3_tasks).
    assert run["after"] < run["before"] - 0.1, (run["before"], run["after"])


# --- (2) transformers' Trainer: sequence classification on a tiny BERT ------------------------------------------
CLS_CASES = {  # name: (config, conditioning column or None, learning rate)
    "gated_lora": (lambda: hadapeft.GatedLoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"), None, 1e-1),
    "film_tasks": (lambda: hadapeft.FiLMConfig(num_tasks=3, task_type="SEQ_CLS"), "task_ids", 1e-1),
    # (HyperMod's hypernetwork does not settle at 1e-1: 1.10 -> 1.10 in 20 steps; 3e-2: -> 0.86.)
    "hypermod_embeds": (lambda: hadapeft.HyperModConfig(task_embed_dim=EMB, task_type="SEQ_CLS"), "task_embeds",
                        3e-2),
}


def cls_rows(n: int, column) -> datasets.Dataset:
    """Token rows whose label is the token at position 1 + task, mod 3."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    tasks = torch.arange(n) % 3
    rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
            "labels": (ids[torch.arange(n), 1 + tasks] % 3).tolist()}
    if column is not None:
        rows[column] = list(cond_kwargs(column, tasks).values())[0].tolist()
    return datasets.Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory):
    runs = {}
    for name, (make_config, column, lr) in CLS_CASES.items():
        out = tmp_path_factory.mktemp(f"cls_{name}")
        model = get_peft_model(build_model("bert"), make_config())
        data = cls_rows(24, column)
        args = tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=6, max_steps=20,
                                    learning_rate=lr, lr_scheduler_type="constant", use_cpu=True,
                                    train_sampling_strategy="sequential", save_strategy="no", disable_tqdm=True)
        trainer = tf.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)  # plain Trainer
        if column is not None:
            assert_mixed_batches(trainer, column)
        inputs = dict(trainer.data_collator([data[i] for i in range(6)]))
        inputs.pop("labels")
        runs[name] = train_and_record(trainer, "bert", inputs)
    return runs


@pytest.mark.parametrize("name", list(CLS_CASES))
def test_trainer_sequence_classification_trains(cls_runs, name):
    run = cls_runs[name]
    # Measured: the loss falls from 1.10 to 0.58 (gated_lora), 0.79 (film_tasks), 0.86 (hypermod_embeds).
    assert run["after"] < run["before"] - 0.15, (run["before"], run["after"])


def test_trained_adapters_reload_in_a_fresh_process(sft_runs, cls_runs, tmp_path):
    table = []
    for name, run in [*(("sft_" + n, r) for n, r in sft_runs.items()), *(("cls_" + n, r) for n, r in cls_runs.items())]:
        expected = tmp_path / f"{name}.pt"
        torch.save({"inputs": run["inputs"], "logits": run["logits"]}, expected)
        table.append((name, run["family"], run["adapter"], str(expected)))
    out = _run_fresh(f"""
        import torch, hadapeft
        from peft import PeftModel
        from conftest import build_model
        torch.set_num_threads(1)
        for name, family, adapter, expected in {table!r}:
            exp = torch.load(expected)
            model = PeftModel.from_pretrained(build_model(family), adapter).eval()
            with torch.no_grad():
                diff = (model(**exp["inputs"]).logits - exp["logits"]).abs().max().item()
            print(name, diff)
            assert diff <= 1e-6, (name, diff)
        print("ALL OK")
    """)
    assert "ALL OK" in out


def test_generate_based_evaluation_gets_the_task_ids(tmp_path):
    """``Seq2SeqTrainer(predict_with_generate=True)`` generates each eval sample under its own task (the column is
    kept and goes into ``generate``)."""
    torch.manual_seed(0)
    base = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                     num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                     eos_token_id=1))
    model = get_peft_model(base, hadapeft.FiLMConfig(num_tasks=3, task_type="SEQ_2_SEQ_LM", init_weights=False))
    ids = torch.randint(2, VOCAB, (6, 7), generator=torch.Generator().manual_seed(4))
    tasks = [0, 1, 2, 0, 1, 2]
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids[:, :4].tolist(), "task_ids": tasks})
    args = tf.Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, generation_max_length=6,
                                       per_device_eval_batch_size=6, use_cpu=True, disable_tqdm=True)
    predictions = tf.Seq2SeqTrainer(model=model, args=args).predict(data).predictions
    model.eval()
    differs = 0
    for i, task in enumerate(tasks):
        def generate(t):
            with torch.no_grad():
                return model.generate(input_ids=ids[i:i + 1], task_ids=torch.tensor([t]), max_length=6)[0]
        expected = generate(task)
        assert predictions[i, :len(expected)].tolist() == expected.tolist(), i
        differs += not torch.equal(generate((task + 1) % 3), expected)
    assert differs, "the generations do not depend on the task"


# --- (3) the conditioning reaches the model in TRL -----------------------------------------------------------------
@pytest.mark.parametrize("option,column", [("film", "task_ids"), ("hypermod", "task_ids"), ("ia3_tasks", "task_ids"),
                                           ("film", "task_embeds")])
def test_conditioning_reaches_the_model_in_sft_trainer(option, column, tmp_path):
    """The batches TRL builds from the dataset give each sample its own task: a mixed batch has the per-sample
    losses of the tasks run separately, swapping two samples' tasks swaps in the other task's loss, and TRL's own
    loss of the mixed batch is the token-weighted mean of those."""
    embeds = dict(num_tasks=None, task_embed_dim=EMB) if column == "task_embeds" else {}
    config = sft_config(option, init_weights=False, **embeds)  # init_weights=False: the tasks differ untrained
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), config)  # a PeftModel in: its columns are read from the model
    trainer = hadapeft.SFTTrainer(model, args=sft_args(tmp_path), train_dataset=sft_rows(6, column=column),
                                  processing_class=char_tokenizer())
    mixed = next(iter(trainer.get_train_dataloader()))  # the first training batch: tasks 0, 1, 2, 0, 1, 2
    examples = [trainer.train_dataset[i] for i in range(6)]  # the same rows, tokenized by TRL
    collate = trainer.data_collator
    assert torch.equal(mixed["input_ids"], collate(examples)["input_ids"])
    model.eval()
    losses = sample_losses(model, mixed)
    separate = torch.empty(6)
    for task in range(3):
        rows = [i for i in range(6) if i % 3 == task]
        separate[rows] = sample_losses(model, collate([examples[i] for i in rows]))
    torch.testing.assert_close(losses, separate, rtol=0, atol=2e-6)

    # Samples 0 and 1 (tasks 0 and 1) trade tasks: each gets the loss of its tokens under the other task.
    swapped = [dict(ex) for ex in examples]
    swapped[0][column], swapped[1][column] = examples[1][column], examples[0][column]
    swapped_losses = sample_losses(model, collate(swapped))
    for i, other in ((0, 1), (1, 0)):
        alone = sample_losses(model, collate([{**examples[i], column: examples[other][column]}]))
        torch.testing.assert_close(swapped_losses[i], alone[0], rtol=0, atol=2e-6)
        assert (swapped_losses[i] - losses[i]).abs() > 1e-3, "the task of a sample did not change its loss"
    torch.testing.assert_close(swapped_losses[2:], losses[2:], rtol=0, atol=2e-6)

    # TRL's loss (its fused LM head, its token normalization) of the mixed batch.
    n = (mixed["labels"][:, 1:] != -100).sum(1)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(mixed))
    torch.testing.assert_close(trl_loss, (losses * n).sum() / n.sum(), rtol=0, atol=2e-6)


def test_a_missing_task_column_is_named(tmp_path):
    trainer = hadapeft.SFTTrainer(build_model("llama"), args=sft_args(tmp_path),
                                  train_dataset=sft_rows(6).remove_columns("task_ids"),
                                  processing_class=char_tokenizer(), peft_config=hadapeft.FiLMConfig(num_tasks=3))
    with pytest.raises(hadapeft.ConditioningError, match="example has no 'task_ids' column"):
        trainer.train()


# A task column with a bad row: named (column, row, what was expected) when the trainer is built, before the model is
# adapted; not torch's own error from the collator at the first step.
BAD_TASK_COLUMNS = {
    "none_id": ("task_ids", lambda col: [None if i == 4 else t for i, t in enumerate(col)],
                "task_ids column, train_dataset row 4: None; expected an int in [0, 2] (num_tasks=3)"),
    "string_id": ("task_ids", lambda col: ["copy", "reverse", "shift"] * 2,
                  "task_ids column, train_dataset row 0: 'copy'; expected an int in [0, 2] (num_tasks=3): task names "
                  "must be mapped to ids first"),
    "id_out_of_range": ("task_ids", lambda col: [0, 1, 2, 3, 1, 2],
                        "task_ids column, train_dataset row 3: 3; expected an int in [0, 2] (num_tasks=3)"),
    "embed_width": ("task_embeds", lambda col: [v[:EMB - 1] if i == 2 else v for i, v in enumerate(col)],
                    f"task_embeds column, train_dataset row 2: {EMB - 1} values; expected a list of {EMB} finite "
                    f"floats (task_embed_dim={EMB})"),
    "embed_none": ("task_embeds", lambda col: [None if i == 1 else v for i, v in enumerate(col)],
                   f"task_embeds column, train_dataset row 1: None; expected a list of {EMB} finite floats "
                   f"(task_embed_dim={EMB})"),
}


@pytest.mark.parametrize("case", BAD_TASK_COLUMNS)
def test_a_bad_task_column_row_is_named_before_training(case, tmp_path):
    column, corrupt, message = BAD_TASK_COLUMNS[case]
    rows = sft_rows(6, column=column).to_dict()
    rows[column] = corrupt(rows[column])
    config = hadapeft.FiLMConfig(num_tasks=3) if column == "task_ids" else hadapeft.FiLMConfig(task_embed_dim=EMB)
    model = build_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hadapeft.ConditioningError) as err:
        hadapeft.SFTTrainer(model, args=sft_args(tmp_path), train_dataset=datasets.Dataset.from_dict(rows),
                            processing_class=char_tokenizer(), peft_config=config)
    assert message in str(err.value)
    assert not hasattr(model, "peft_config") and model.state_dict().keys() == before.keys()  # not adapted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_bad_row_in_a_batch_is_named_by_the_collator():
    """A collator used alone (a training loop of its own, an iterable dataset) names the example of the batch."""
    collate = hadapeft.ConditioningCollator(lambda examples: {"n": len(examples)}, ("task_ids",), num_tasks=3)
    assert torch.equal(collate([{"task_ids": 2}, {"task_ids": 0}])["task_ids"], torch.tensor([2, 0]))
    with pytest.raises(hadapeft.ConditioningError,
                       match=r"task_ids column, example 1 of the batch: None; expected an int in \[0, 2\]"):
        collate([{"task_ids": 2}, {"task_ids": None}])


def test_trl_own_sft_trainer_says_it_drops_the_task_column(tmp_path):
    """TRL's own SFTTrainer drops the task_ids column: the error says so and names hadapeft.SFTTrainer."""
    trainer = trl.SFTTrainer(build_model("llama"), args=sft_args(tmp_path, max_steps=1), train_dataset=sft_rows(6),
                             processing_class=char_tokenizer(), peft_config=hadapeft.FiLMConfig(num_tasks=2))
    with pytest.raises(hadapeft.ConditioningError) as err:
        trainer.train()
    assert ("no task_ids were given: pass task_ids=LongTensor[batch] to forward / generate, or run the model inside "
            "`with hadapeft.conditioning(model, task_ids=...)`. From a dataset column: TRL's own trainers "
            "(trl.SFTTrainer, trl.DPOTrainer) and collators drop task columns; train with hadapeft.SFTTrainer / "
            "hadapeft.DPOTrainer, which carry them") in str(err.value)


# --- packing: one task per packed row ---------------------------------------------------------------------------
def _row_tasks(tok, input_ids) -> set[int]:
    """The tasks whose letters a packed row holds (task 2 shifts q..x to r..y)."""
    letters = set(tok.decode(input_ids)) - set(":<>/spad")  # special tokens decode to their text
    return {0 if ch <= "h" else 1 if ch <= "p" else 2 for ch in letters if ch.isalpha()}


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_packs_each_task_apart(strategy, tmp_path):
    tok = char_tokenizer()
    args = sft_args(tmp_path, packing=True, packing_strategy=strategy, max_steps=2)
    trainer = hadapeft.SFTTrainer(build_model("llama"), args=args, train_dataset=sft_rows(30, disjoint=True),
                                  processing_class=tok, peft_config=sft_config("film", init_weights=False))
    packed = trainer.train_dataset
    assert len(packed) < 30  # several examples per row
    for row in packed:
        assert _row_tasks(tok, row["input_ids"]) == {row["task_ids"]}, (tok.decode(row["input_ids"]), row["task_ids"])
    if strategy == "bfd":  # padded rows whose packed sequences are kept apart exactly
        batch = trainer.data_collator([packed[i] for i in range(3)])
        assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() > 3
        model = trainer.model.eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for r in range(3):
            start = 0
            for length in packed[r]["seq_lengths"]:
                ids = torch.tensor(packed[r]["input_ids"][start:start + length])[None]
                labels = torch.tensor(packed[r]["labels"][start:start + length])[None]
                with torch.no_grad():
                    alone = model(input_ids=ids, task_ids=batch["task_ids"][r:r + 1]).logits
                torch.testing.assert_close(logits[r:r + 1, start:start + length], alone, rtol=0, atol=2e-5)
                assert (labels != -100).any()
                start += length
        model.train()
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_flash_attention_with_padding_free_conditioning_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(hadapeft.trainer, "attn_implementation", lambda model: "flash_attention_2")
    with pytest.raises(hadapeft.ConditioningError, match="packing_strategy='wrapped'"):
        hadapeft.SFTTrainer(build_model("llama"), args=sft_args(tmp_path, packing=True),
                            train_dataset=sft_rows(6), processing_class=char_tokenizer(),
                            peft_config=hadapeft.FiLMConfig(num_tasks=3))


def test_an_untested_trl_version_warns():
    from hadapeft.seam.trainer import SUPPORTED_TRL, check_trl_version

    with pytest.warns(UserWarning, match="tested with trl"):
        check_trl_version(str(SUPPORTED_TRL[1]))
    check_trl_version(trl.__version__)  # the installed one is tested (the test extra pins it): no warning


# --- DPO: a chosen / rejected pair shares its task ----------------------------------------------------------------
def test_dpo_trainer_gives_chosen_and_rejected_their_task(tmp_path):
    rows = sft_rows(12)
    completions = list(rows["completion"])
    rows = rows.add_column("chosen", completions).add_column(
        "rejected", [c[::-1] + "a" for c in completions]).remove_columns("completion")
    torch.manual_seed(0)
    config = sft_config("film", init_weights=False)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2, learning_rate=5e-2,
                         use_cpu=True, train_sampling_strategy="sequential", save_strategy="no", disable_tqdm=True,
                         bf16=False)
    trainer = hadapeft.DPOTrainer(build_model("llama"), args=args, train_dataset=rows,
                                  processing_class=char_tokenizer(), peft_config=config)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["task_ids"].tolist() == [0, 1, 2, 0, 1, 2] * 2  # chosen rows, then rejected rows
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)


# --- the training guide's TRL example runs as written (docs/guides/training.md; it was the README's) ------------
def test_readme_trl_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "docs" / "guides" / "training.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "hadapeft.SFTTrainer" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "docs/guides/training.md", "exec"), namespace)
    assert (tmp_path / "film-sft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("peft_type", ["gated_lora", "lora"])
def test_a_quantized_base_keeps_hadapeft_adapters_in_fp32(peft_type, tmp_path):
    """TRL casts a quantized model's trainable parameters to bf16 (QLoRA's choice for LoRA), where a gate or scale
    starting at 1 cannot take AdamW's small steps; hadapeft's trainer puts its adapters back to fp32 and leaves
    peft's LoRA as TRL makes it. (The base here only claims to be 4-bit, which is all TRL reads.)"""
    from peft import LoraConfig

    base = build_model("llama")
    base.is_loaded_in_4bit = True
    config = (hadapeft.GatedLoraConfig(r=4, target_modules=TARGETS) if peft_type == "gated_lora"
              else LoraConfig(r=4, target_modules=TARGETS))
    trainer = hadapeft.SFTTrainer(get_peft_model(base, config), args=sft_args(tmp_path, max_steps=1),
                                  train_dataset=sft_rows(6).remove_columns("task_ids"),
                                  processing_class=char_tokenizer())
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == ({torch.float32} if peft_type == "gated_lora" else {torch.bfloat16})
