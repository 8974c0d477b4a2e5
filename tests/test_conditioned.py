"""Task-conditioned adapters (FiLM, HyperMod, multi-task HadaIA3): per-sample task_ids / task_embeds through forward,
generate, the HF Trainer, gradient checkpointing, merge, save/load, and bad input. The generic peft contract (identity,
save/load, merge, multiple adapters, dtypes, ...) runs for these option sets in test_contract.py's table; this file
holds what only conditioned adapters have. Checks use ``init_weights=False`` unless they are about the identity at
init."""

from __future__ import annotations

import copy
import inspect
import threading
from contextlib import nullcontext

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import hadapeft
from conftest import BNB_LAYOUTS, build_model, logits, make_inputs, use_bnb_layout
from test_contract import grads_with_and_without_checkpointing, hada_layers, make_config, option_sets, peft_model

EMB = 6  # task_embed_dim of the task_embeds option sets
# The registered option sets whose adapter is conditioned per sample (num_tasks or task_embed_dim).
COND_OPTIONS = {o: (t.config_cls, dict(s.kwargs)) for o, (t, s) in option_sets().items()
                if t.make_config(o).conditioning_spec() is not None}
assert all(kw.get("task_embed_dim", EMB) == EMB for _, kw in COND_OPTIONS.values())
FAMS = ["llama", "gpt2", "bert", "vit"]
CASES = [(o, f) for o in COND_OPTIONS for f in FAMS]
case = pytest.mark.parametrize("option,family", CASES, ids=[f"{o}-{f}" for o, f in CASES])
options = pytest.mark.parametrize("option", list(COND_OPTIONS))


def cond(option, ids) -> dict:
    """Conditioning kwargs for ``ids``: the ids themselves, or a fixed embedding per id for task_embeds options."""
    if COND_OPTIONS[option][1].get("num_tasks"):
        return {"task_ids": ids}
    bank = torch.randn(3, EMB, generator=torch.Generator().manual_seed(5))
    return {"task_embeds": bank[ids]}


def select(d: dict, rows) -> dict:
    return {k: v[rows] for k, v in d.items()}


def adapter_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(a: dict, b: dict, tol=1e-6):
    """Gradients agree to ``tol`` relative to their scale (max(1, |g|)): sums over samples in another order differ by
    fp32 rounding of the sum, ~1e-7 · |g|."""
    assert a.keys() == b.keys() and a
    for n in a:
        assert (a[n] - b[n]).abs().max() <= tol * max(1.0, b[n].abs().max().item()), n


MIXED = torch.tensor([0, 2, 1, 2])


# --- (2) a mixed batch equals each task run on its own: forward and training gradients ---------------------------
@case
def test_mixed_batch_equals_separate_tasks(option, family):
    inputs = make_inputs(family, batch=4)
    model = peft_model(option, family)  # eval mode (no dropout); gradients still flow
    weight = torch.randn(logits(model, dict(inputs, **cond(option, MIXED))).shape,
                         generator=torch.Generator().manual_seed(3))

    def run(rows):
        out = model(**select(inputs, rows), **select(cond(option, MIXED), rows)).logits
        (out * weight[rows]).sum().backward()
        return out.detach()

    mixed = run(slice(None))
    grads_mixed = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    separate = torch.empty_like(mixed)
    for task in MIXED.unique():
        rows = (MIXED == task).nonzero().flatten()
        separate[rows] = run(rows)
    grads_separate = adapter_grads(model)
    assert (mixed - separate).abs().max() <= 1e-6
    assert_same_grads(grads_mixed, grads_separate)
    # and the task matters: sample 1 (task 2) under task 0 gives another output
    other = logits(model, dict(select(inputs, [1]), **cond(option, torch.tensor([0]))))
    assert (other - mixed[1:2]).abs().max() > 1e-6


@options
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_mixed_batch(option, family):
    model = peft_model(option, family)
    inputs = make_inputs(family, batch=3, seq=5)
    ids = torch.tensor([2, 0, 1])
    kw = cond(option, ids)
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
    out = model.generate(**inputs, **kw, **beam)
    alone = torch.cat([model.generate(**select(inputs, [i]), **select(kw, [i]), **beam) for i in range(3)])
    assert torch.equal(out, alone)
    greedy = model.generate(**inputs, **kw, max_new_tokens=4, do_sample=False)
    with hadapeft.conditioning(model, **kw):
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), greedy)
    sampled = model.generate(**inputs, **kw, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2)
    assert sampled.shape == (6, 9)


# --- (3) gradient checkpointing, Trainer, fresh-process reload -----------------------------------------------------
@pytest.mark.parametrize("option", ["film_tasks", "hypermod_r2", "hypermod_embeds", "ia3_tasks"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(option, family, reentrant):
    assert_same_grads(*grads_with_and_without_checkpointing(option, family, reentrant, make_inputs(family, batch=4),
                                                            ids=MIXED.tolist()))


class _TaskData(torch.utils.data.Dataset):
    """Rows with an input_ids, labels and task_ids column (the rule per task: shift tokens by task + 1)."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        task = i % 3
        ids = (torch.arange(8) * (task + 1) + i) % 96
        return {"input_ids": ids, "labels": ids, "task_ids": task}


@pytest.mark.parametrize("option", ["film_tasks", "hypermod_r1"])
def test_trainer_keeps_task_ids_column(option, tmp_path):
    model = peft_model(option, "llama")
    assert "task_ids" in inspect.signature(model.get_base_model().forward).parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=6,
                                learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                                logging_steps=1)
    # remove_unused_columns=True (default): without the signature the column would be dropped and the conditioned
    # forward would raise for missing task_ids.
    trainer = tf.Trainer(model=model, args=args, train_dataset=_TaskData())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


def test_fresh_process_reload_reproduces_conditioned_logits(tmp_path):
    from test_loading import _run_fresh

    table = []
    for i, (option, family) in enumerate([(o, "llama") for o in COND_OPTIONS] + [("hypermod_r2", "vit"),
                                                                                   ("film_tasks", "bert")]):
        base_dir, adapter_dir = tmp_path / f"base{i}", tmp_path / f"adapter{i}"
        build_model(family).save_pretrained(base_dir)
        model = peft_model(option, family)
        inputs = dict(make_inputs(family, batch=4), **cond(option, MIXED))
        torch.save({"inputs": inputs, "logits": logits(model, inputs)}, tmp_path / f"expected{i}.pt")
        model.save_pretrained(adapter_dir)
        auto = {"llama": "AutoModelForCausalLM", "bert": "AutoModelForSequenceClassification",
                "vit": "AutoModelForImageClassification"}[family]
        table.append((option, auto, str(base_dir), str(adapter_dir), str(tmp_path / f"expected{i}.pt")))
    out = _run_fresh(f"""
        import torch, transformers, hadapeft
        from peft import PeftModel
        for option, auto, base_dir, adapter_dir, expected in {table!r}:
            exp = torch.load(expected)
            def check(model, how):
                with torch.no_grad():
                    diff = (model.eval()(**exp["inputs"]).logits - exp["logits"]).abs().max().item()
                print(option, how, diff)
                assert diff <= 1e-6, (option, how, diff)
            check(PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(base_dir), adapter_dir),
                  "PeftModel")
            if not option.startswith("hypermod"):  # peft refuses native loading of shared-state tuners
                plain = getattr(transformers, auto).from_pretrained(base_dir)
                plain.load_adapter(adapter_dir)
                check(plain, "transformers.load_adapter")
        print("ALL OK")
    """)
    assert "ALL OK" in out


# --- save / load, multiple adapters, disable, dtypes ---------------------------------------------------------------
@pytest.mark.parametrize("cls", [hadapeft.FiLMConfig, hadapeft.HyperModConfig])
def test_two_active_adapters_one_on_ids_one_on_embeds(cls):
    """Both active: the second modulates the map built by the first (the composite path), both kinds of conditioning
    are needed, and merging both (one task each) reproduces the composite forward."""
    model = get_peft_model(build_model("llama"), cls(num_tasks=3, init_weights=False, task_type="CAUSAL_LM"))
    model.add_adapter("b", cls(task_embed_dim=EMB, init_weights=False, task_type="CAUSAL_LM"))
    model.base_model.set_adapter(["default", "b"])
    inputs = make_inputs("llama")
    embeds = torch.randn(1, EMB).expand(2, -1)
    with pytest.raises(hadapeft.ConditioningError, match=r"adapter 'b' .* needs task_embeds"):
        model(**inputs, task_ids=torch.tensor([1, 1]))
    both = logits(model, dict(inputs, task_ids=torch.tensor([1, 1]), task_embeds=embeds))
    with pytest.warns(UserWarning, match="added a bias"):  # llama's layers have none for β
        model.merge_adapter(["default", "b"], task_id=1, task_embeds=embeds[0])
    assert torch.allclose(logits(model, inputs), both, atol=1e-5, rtol=0)


def test_hypermod_checkpoint_without_hypernet_is_refused(tmp_path):
    model = peft_model("hypermod_r1", "llama")
    model.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    tensors = load_file(f)
    del tensors["base_model.hypermod_hypernet.mlp.0.weight"]
    save_file(tensors, f)
    base = build_model("llama")
    with pytest.raises(hadapeft.AdapterCheckpointError, match="missing from the checkpoint.*hypermod_hypernet"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not hada_layers(base)


@pytest.mark.parametrize("layout", BNB_LAYOUTS)
def test_quantized_bases(tmp_path, layout, monkeypatch):
    test_bnb = pytest.importorskip("test_bnb")  # skips without bitsandbytes
    use_bnb_layout(monkeypatch, layout)
    test_bnb.save_base(tmp_path)
    inputs = make_inputs("llama")
    for quant in test_bnb.QUANT:
        ref = logits(test_bnb.quantized(tmp_path, quant), inputs)
        for option in ("film_tasks", "hypermod_r2", "ia3_tasks"):
            kw = cond(option, torch.tensor([2, 0]))
            model = get_peft_model(test_bnb.quantized(tmp_path, quant), make_config(option, "llama"))
            assert torch.equal(logits(model, dict(inputs, **kw)), ref), (quant, option)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            model.train()
            losses = []
            for _ in range(4):
                loss = model(**inputs, **kw, labels=inputs["input_ids"]).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            assert losses[-1] < losses[0], (quant, option, losses)
            quantized_state = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
            with pytest.warns(UserWarning, match="added a bias") if option != "ia3_tasks" else nullcontext():
                model.merge_adapter(task_id=2)
            model.unmerge_adapter()
            assert all(torch.equal(model.state_dict()[k], v) for k, v in quantized_state.items()), (quant, option)


# --- merge one task -------------------------------------------------------------------------------------------------
@options
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_merge_and_unload_one_task(option, family):
    inputs = make_inputs(family)
    model = peft_model(option, family)
    task = cond(option, torch.tensor([2, 2]))
    expected = logits(model, dict(inputs, **task))
    merge_kw = {"task_id": 2} if "task_ids" in task else {"task_embeds": task["task_embeds"][0]}
    with pytest.raises(hadapeft.ConditioningError, match="pass task_"):
        model.merge_and_unload()
    base_state = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "base_layer" in k}
    adds_bias = family == "llama" and "ia3" not in option  # a shift on bias-less layers: the merge creates biases
    bias_warning = lambda: pytest.warns(UserWarning, match="added a bias") if adds_bias else nullcontext()  # noqa
    with bias_warning():
        model.merge_adapter(**merge_kw)
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    after = model.base_model.model.state_dict()
    assert {k for k in after if "base_layer" in k} == set(base_state)  # biases created by the merge are gone
    for k, v in base_state.items():
        assert torch.allclose(after[k], v, atol=1e-6, rtol=0), k
    with bias_warning():
        merged = copy.deepcopy(model).merge_and_unload(**merge_kw)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert "forward" not in merged.__dict__ and not hasattr(merged, "_hadapeft_conditioning")  # a plain model
    assert type(merged) is type(build_model(family))
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5, rtol=0)


# --- (5) bad input ----------------------------------------------------------------------------------------------------
BAD = [
    ("film_tasks", {}, r"no task_ids were given: pass task_ids=LongTensor\[batch\]"),
    ("film_tasks", {"task_ids": torch.tensor([0, 3])}, r"out of range .* got values in \[0, 3\], expected \[0, 2\]"),
    ("film_tasks", {"task_ids": torch.tensor([-1, 0])}, r"out of range"),
    ("film_tasks", {"task_ids": torch.tensor([0.0, 1.0])}, r"integer \(long\) tensor, got dtype torch.float32"),
    ("film_tasks", {"task_ids": [0, 1]}, r"must be a LongTensor of shape \(batch,\), got list"),
    ("film_tasks", {"task_ids": torch.tensor([[0, 1]])}, r"must be 1-D"),
    ("film_tasks", {"task_ids": torch.tensor([0, 1, 2])}, r"task_ids has 3 entries but the batch has 2 samples"),
    ("film_tasks", {"task_ids": torch.tensor([0, 1]), "task_embeds": torch.zeros(2, EMB)},
     r"both task_ids and task_embeds were given, but adapter 'default' \(FILM, num_tasks=3\) takes only task_ids"),
    ("film_embeds", {}, r"no task_embeds were given"),
    ("film_embeds", {"task_ids": torch.tensor([0, 1])}, r"task_ids were given, but .*takes only task_embeds"),
    ("film_embeds", {"task_embeds": torch.zeros(2, EMB + 1)}, rf"shape \(batch, {EMB}\) .* got \(2, {EMB + 1}\)"),
    ("film_embeds", {"task_embeds": torch.zeros(3, EMB)}, r"task_embeds has 3 entries but the batch has 2"),
    ("hypermod_embeds", {"task_embeds": torch.zeros(2, EMB, dtype=torch.long)}, r"must be a float tensor"),
    ("ia3_tasks", {"task_ids": torch.tensor([0, 1]), "task_embeds": torch.zeros(2, EMB)}, r"both task_ids and"),
    ("gated_vector", {"task_ids": torch.tensor([0, 1])}, r"no adapter among \['default'\] is task-conditioned"),
]


@pytest.mark.parametrize("option,kwargs,message", BAD, ids=[f"{o}-{m[:30]}" for o, _, m in BAD])
def test_bad_conditioning_input(option, kwargs, message):
    model = peft_model(option, "llama")
    inputs = make_inputs("llama")
    with pytest.raises(hadapeft.ConditioningError, match=message):
        model(**inputs, **kwargs)
    if kwargs:
        with pytest.raises(hadapeft.ConditioningError, match=message):
            model.generate(**inputs, **kwargs, max_new_tokens=2)


def test_conditioning_needs_a_hadapeft_model():
    with pytest.raises(hadapeft.ConditioningError, match="holds no hadapeft adapter"):
        with hadapeft.conditioning(build_model("llama"), task_ids=torch.tensor([0])):
            pass


def test_layer_refuses_rows_that_do_not_fit_the_conditioning():
    model = peft_model("film_tasks", "llama")
    with pytest.raises(hadapeft.ConditioningError, match="conditioning has 2 samples but an adapted layer received 3"):
        with hadapeft.conditioning(model, task_ids=torch.tensor([0, 1])):
            model(**make_inputs("llama", batch=3))


@pytest.mark.parametrize("cls,kwargs,message", [
    (hadapeft.FiLMConfig, {}, "needs exactly one of num_tasks"),
    (hadapeft.FiLMConfig, dict(num_tasks=2, task_embed_dim=4), "needs exactly one of num_tasks"),
    (hadapeft.HyperModConfig, dict(num_tasks=0), "num_tasks must be a positive integer"),
    (hadapeft.HyperModConfig, dict(num_tasks=2, r=0), "r must be a positive integer"),
    (hadapeft.HadaIA3Config, dict(num_tasks=-1), "num_tasks must be a positive integer"),
])
def test_invalid_conditioned_configs(cls, kwargs, message):
    with pytest.raises(hadapeft.HadapeftConfigError, match=message):
        cls(**kwargs)


# --- how the conditioning reaches the layers ---------------------------------------------------------------------------
def test_every_entry_point_gives_the_same_logits():
    model = peft_model("hypermod_r2", "llama")
    inputs = make_inputs("llama", batch=4)
    expected = logits(model, dict(inputs, task_ids=MIXED))
    with hadapeft.conditioning(model, task_ids=MIXED):
        assert torch.equal(logits(model, inputs), expected)
    with hadapeft.conditioning(model.get_base_model(), task_ids=MIXED):
        assert torch.equal(logits(model.get_base_model(), inputs), expected)
    assert torch.equal(logits(model.get_base_model(), dict(inputs, task_ids=MIXED)), expected)


def test_two_threads_do_not_mix():
    model = peft_model("film_tasks", "llama")
    inputs = make_inputs("llama", batch=2, seq=24)
    ids = {t: torch.tensor([t, t]) for t in (0, 2)}
    expected = {t: logits(model, dict(inputs, task_ids=i)) for t, i in ids.items()}
    assert not torch.allclose(expected[0], expected[2])
    errors = []
    barrier = threading.Barrier(2)

    def worker(t):
        barrier.wait()
        for _ in range(15):
            with hadapeft.conditioning(model, task_ids=ids[t]):
                if not torch.equal(logits(model, inputs), expected[t]):
                    errors.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in ids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_poly_keeps_its_task_ids():
    from peft import PolyConfig

    model = get_peft_model(build_model("llama"), PolyConfig(task_type="CAUSAL_LM", r=2, n_tasks=3, n_skills=2,
                                                            target_modules=["q_proj"]))
    inputs = make_inputs("llama")
    assert logits(model, dict(inputs, task_ids=torch.tensor([0, 2]))).shape[0] == 2
    with pytest.raises(Exception, match="task_ids"):  # Poly itself requires them: they were not swallowed
        logits(model, inputs)


def test_hypermod_parameter_count_does_not_grow_with_layers_times_tasks(capsys):
    """Llama-7B shapes on the meta device (no memory): the count is additive in tasks and layers."""
    def count(num_tasks, layers=32):
        cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
        with torch.device("meta"):
            base = tf.LlamaForCausalLM(cfg)
        model = get_peft_model(base, hadapeft.HyperModConfig(num_tasks=num_tasks, target_modules=["q_proj", "v_proj"]))
        return model.get_nb_trainable_parameters()[0]

    e, H, d = 32, 64, 4096
    analytic = lambda T, L: (T * e + (L + 1) * e + 2 * e + (3 * e * H + H) + (H * H + H)  # noqa: E731
                             + 2 * (H * 3 * d + 3 * d))  # 2 kinds (q, v) × head H → u, v, β
    n8, n64, n8_half = count(8), count(64), count(8, layers=16)
    assert (n8, n64, n8_half) == (analytic(8, 32), analytic(64, 32), analytic(8, 16))
    assert n64 - n8 == 56 * e and n8 - n8_half == 16 * e
    with capsys.disabled():
        print(f"\nHyperMod trainable params, Llama-7B shape (q_proj, v_proj, rank 1): 8 tasks {n8:,}, "
              f"64 tasks {n64:,}")


# --- (4) learning on real data -----------------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class _Digits:
    """sklearn's 8×8 handwritten digits, labelled three ways: (task, digit) → label."""

    LABELS = torch.stack([torch.arange(10), torch.arange(10) % 2, (torch.arange(10) > 4).long()])

    def __init__(self):
        digits = pytest.importorskip("sklearn.datasets").load_digits()
        self.X, self.y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
        perm = torch.randperm(len(self.X), generator=torch.Generator().manual_seed(0))
        self.train_rows, self.test_rows = perm[:1300], perm[1300:]

    def fit(self, model, steps, conditioned, tasks=3, seed=1):
        """Adam on batches of 128 with tasks mixed within each batch."""
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            rows = self.train_rows[torch.randint(0, len(self.train_rows), (128,), generator=g)]
            t = torch.randint(0, tasks, (128,), generator=g)
            out = model(self.X[rows], task_ids=t) if conditioned else model(self.X[rows])
            loss = torch.nn.functional.cross_entropy(out, self.LABELS[t, self.y[rows]])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def accuracy(self, model, conditioned) -> list[float]:
        X, y, n = self.X[self.test_rows], self.y[self.test_rows], len(self.test_rows)
        with torch.no_grad():
            return [((model(X, task_ids=torch.full((n,), k)) if conditioned else model(X)).argmax(-1)
                     == self.LABELS[k, y]).float().mean().item() for k in range(3)]


@pytest.mark.slow
def test_conditioned_adapters_learn_several_labelings_of_real_digits(capsys):
    """Three tasks label the same real images differently (digit, parity, digit > 4), mixed within each batch. The
    backbone MLP is pre-trained on the digit task and frozen. The base model can only train a shared head, which sees
    the same features whatever the task; each conditioned adapter (+ the shared head) must beat it clearly on every
    task."""
    data = _Digits()
    targets = dict(target_modules=["fc1", "fc2"], modules_to_save=["head"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to a busy machine's oversubscription
    try:
        torch.manual_seed(0)
        backbone = _MLP()
        data.fit(backbone, 150, conditioned=False, tasks=1, seed=0)  # pre-train on task 0 (the digit) only
        base = copy.deepcopy(backbone).requires_grad_(False)
        base.head.requires_grad_(True)
        data.fit(base, 300, conditioned=False)
        results = {"base (shared head)": data.accuracy(base, False)}
        for name, cfg in [("FiLM", hadapeft.FiLMConfig(num_tasks=3, **targets)),
                          ("HyperMod", hadapeft.HyperModConfig(num_tasks=3, **targets)),
                          ("HadaIA3", hadapeft.HadaIA3Config(num_tasks=3, **targets))]:
            model = get_peft_model(copy.deepcopy(backbone), cfg)
            data.fit(model, 300, conditioned=True)
            results[name] = data.accuracy(model, True)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print("\naccuracy per task (digit, parity, >4):", {k: [round(a, 3) for a in v] for k, v in results.items()})
    base_acc = results.pop("base (shared head)")
    for name, acc in results.items():
        assert all(a > b + 0.2 and a > 0.85 for a, b in zip(acc, base_acc)), (name, acc, base_acc)


@pytest.mark.parametrize("option", ["hypermod_r1", "hypermod_r2", "hypermod_embeds"])
def test_hypernetwork_runs_once_per_forward_with_the_same_gradients(option, monkeypatch):
    """The tuner runs the shared hypernetwork once for all layers before the forward; the layers' outputs and the
    gradients equal those of every layer running it itself (generate's path)."""
    from hadapeft.tuners.hypermod import HyperNet

    inputs = make_inputs("llama", batch=4)
    results = []
    for batched in (True, False):
        model = peft_model(option, "llama").train()
        if not batched:
            monkeypatch.setattr(type(model.base_model), "prepare", lambda self: None)
        calls = []
        original = HyperNet.forward
        monkeypatch.setattr(HyperNet, "forward", lambda self, task, pairs: calls.append(len(pairs)) or
                            original(self, task, pairs))
        out = model(**inputs, **cond(option, MIXED)).logits
        out.pow(2).mean().backward()
        layers = len(hada_layers(model))
        assert calls == ([layers] if batched else [1] * layers)
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        monkeypatch.undo()
    (out_a, g_a), (out_b, g_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6, rtol=1e-5)
    assert_same_grads(g_a, g_b, tol=1e-5)
