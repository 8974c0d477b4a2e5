"""A real causal LM's training step and greedy generation: peft LoRA against Gated LoRA's two ``gate_grad`` options.

    python -m scripts.bench_llm                          # SmolLM2-135M-Instruct: training (4 modes) + generation
    python -m scripts.bench_llm --modes eager --steps 12 # eager without / with gradient checkpointing only
    python -m scripts.bench_llm --model path/or/hub-id --name mymodel

Training: LoRA and Gated LoRA on the same targets (q, v), r = 16, lora_alpha = 32, batch 8 × 64 random token ids
(labels = inputs), AdamW; in each mode (eager / ``torch.compile(model)``, each without / with non-reentrant gradient
checkpointing) the methods are built side by side on one shared copy of the frozen weights and take turns step by
step (``scripts.bench.measure_steps``: median step time, peak memory with weights, gradients and optimizer state).
Generation: greedy ``generate`` of ``--new-tokens`` tokens for a batch of prompts, adapters unmerged, the base model
alone for reference, interleaved the same way. Ratios are against peft LoRA in the same mode.

Results go to ``benchmarks/results/<date>-<device>-<name>.{json,md}`` (``--name``: default from the model).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from scripts.bench import _e2e_step, device_tag, environment, measure_steps

TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA = 16, 32
MODES = {"eager": (False, False), "eager+gc": (False, True), "compiled": (True, False), "compiled+gc": (True, True)}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three prime numbers.", "How do I boil an egg?", "Translate 'good morning' to Spanish.",
           "What is 12 times 7?", "Name a famous painter."]


def methods():
    """label -> adapter config factory (the same rank, alpha and targets for all)."""
    import hadapeft
    from peft import LoraConfig

    def gated(gate_grad):
        return lambda: hadapeft.GatedLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, gate_grad=gate_grad)
    return {"peft_lora": lambda: LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0),
            "gated_recompute": gated("recompute"), "gated_save": gated("save")}


def shared_copy(base):
    """A new module tree over the same frozen weight tensors (each adapted copy costs only its adapter)."""
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def train_rows(base, args, device, modes):
    from peft import get_peft_model

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(2)]
    rows = []
    for mode in modes:
        compiled, gc = MODES[mode]
        built = []
        for label, make in methods().items():
            row = dict(section="train", method=label, mode=mode, tokens_per_step=args.batch * args.seq)
            rows.append(row)
            try:
                model = shared_copy(base)
                model.config.use_cache = False
                if gc:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model = get_peft_model(model, make())
                model.train()
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                forward = torch.compile(model) if compiled else model
                built.append((row, _e2e_step(forward, opt, batches, {}, None), model, opt))
            except Exception as e:  # noqa: BLE001 - the table says what failed
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        t0 = time.perf_counter()
        measure_steps(built, device, args.warmup, args.steps, tokens=args.batch * args.seq)
        print(f"train {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
        built.clear()
    return rows


def generate_rows(base, tok, args, device):
    from peft import get_peft_model

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(PROMPTS[: args.prompts], return_tensors="pt", padding=True).to(device)
    cases = {"base": None, **{k: v for k, v in methods().items() if k != "gated_save"}}  # save = recompute here
    rows, built = [], []
    for label, make in cases.items():
        model = shared_copy(base)
        model = (model if make is None else get_peft_model(model, make())).eval()
        row = dict(section="generate", method=label, mode="eager", prompts=enc["input_ids"].shape[0],
                   prompt_tokens=enc["input_ids"].shape[1], new_tokens=args.new_tokens)
        rows.append(row)

        def step(i, model=model):
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
        built.append((row, step, model, None))
    measure_steps(built, device, 1, args.gen_repeats, tokens=enc["input_ids"].shape[0] * args.new_tokens,
                  peak=False)
    return rows


def ratios(rows):
    for r in rows:
        ref = next((q for q in rows if q["section"] == r["section"] and q["mode"] == r["mode"]
                    and q["method"] == "peft_lora" and q.get("step_ms")), None)
        if ref and r.get("step_ms"):
            r["time_x_peft_lora"] = r["step_ms"] / ref["step_ms"]
            if r.get("peak_gib") and ref.get("peak_gib"):
                r["peak_x_peft_lora"] = r["peak_gib"] / ref["peak_gib"]
        base = next((q for q in rows if q["section"] == "generate" and q["method"] == "base" and q.get("step_ms")),
                    None)
        if r["section"] == "generate" and base and r.get("step_ms"):
            r["time_x_base"] = r["step_ms"] / base["step_ms"]


def _f(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def markdown(env, rows, args, command):
    lines = [f"# {args.model}: training step and greedy generation, peft LoRA vs Gated LoRA — {env['device']}", "",
             f"Date {env['date']}; torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}"
             + (f"; load average at start {env['load_average_1min']}" if "load_average_1min" in env else "")
             + f". Targets {', '.join(TARGETS)}, r = {RANK}, lora_alpha = {ALPHA}, fp32. Training: batch "
             f"{args.batch} × {args.seq} tokens, AdamW, median of {args.steps} steps after {args.warmup} warm-up, "
             "the methods of a mode built side by side (one shared copy of the frozen weights) and taking turns step "
             "by step; `+gc`: non-reentrant gradient checkpointing; `compiled`: `torch.compile(model)` (inductor). "
             "Peak: the most memory held during one step, weights, gradients and optimizer state included (on CPU "
             "from the profiler's allocation records; the shared frozen weights count once per model). Generation: "
             f"greedy, {args.new_tokens} new tokens for {args.prompts} prompts in one batch, unmerged, median of "
             f"{args.gen_repeats}, interleaved.", "", f"Command: `{command}`", "",
             "| section | method | mode | step ms | × peft LoRA | peak GiB | peak × peft LoRA | × base | tokens/s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['section']} | {r['method']} | {r['mode']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['section']} | {r['method']} | {r['mode']} | {_f(r.get('step_ms'), '.1f')} | "
                     f"{_f(r.get('time_x_peft_lora'))} | {_f(r.get('peak_gib'))} | {_f(r.get('peak_x_peft_lora'))} | "
                     f"{_f(r.get('time_x_base'))} | {_f(r.get('tokens_per_s'), '.0f')} |")
    return "\n".join(lines) + "\n"


def write(stem, env, rows, args, command) -> str:
    ratios(rows)
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, args=vars(args), command=command, rows=rows),
                                                    indent=1, default=str))
    md = markdown(env, rows, args, command)
    stem.with_suffix(".md").write_text(md)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="recipes.models alias, folder or Hub id")
    p.add_argument("--name", default=None, help="result file name part (default: the model alias's first word)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="training modes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per case (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-generate", dest="generate", action="store_false")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--gen-repeats", type=int, default=10)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file name device tag (default: h100, h200, ... or cpu)")
    args = p.parse_args(argv)
    command = "python -m scripts.bench_llm" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                      else argv))
    from recipes.models import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok = load_causal_lm(args.model)
    base = base.to(device=device, dtype=torch.float32).requires_grad_(False)
    env = environment(device)
    print(json.dumps(env), flush=True)
    tag = args.tag or device_tag(env["device"], device)
    name = args.name or Path(args.model).name.split("-")[0].lower()
    stem = Path(args.out_dir) / f"{env['date']}-{tag}-{name}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    # Training modes one at a time, greedy generation after the first: the files are rewritten after each part, so
    # a run stopped early keeps what it measured.
    for k, mode in enumerate(args.modes):
        rows += train_rows(base, args, device, [mode])
        if k == 0 and args.generate:
            rows += generate_rows(base, tok, args, device)
        md = write(stem, env, rows, args, command)
    if not args.modes and args.generate:
        rows += generate_rows(base, tok, args, device)
        md = write(stem, env, rows, args, command)
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
