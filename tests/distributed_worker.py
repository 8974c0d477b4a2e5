"""The training side of ``tests/test_distributed.py``: every adapter type trained on a tiny Llama (fp32) under one
engine, with a fixed global batch split over the processes, then saved as the engine gathers a full state dict.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py --engine fsdp2 --out DIR

writes ``DIR/<case>/`` (a saved adapter) for each case of :func:`cases`. ``--engine single`` (one process, no
torchrun needed; also called in-process by the test) is the reference. Engines, at the layer below accelerate
(accelerate starts FSDP and DeepSpeed only on GPU-type devices):

* ``ddp``    torch DistributedDataParallel.
* ``fsdp2``  ``fully_shard`` on a gloo DeviceMesh; units from ``hadapeft.fsdp_units`` (blocks, HyperMod's
             hypernetwork), and HyperMod again with the root as the only unit and with peft's leaf units.
* ``fsdp1``  ``FullyShardedDataParallel(device_id=cpu, use_orig_params=True)`` with ``hadapeft.fsdp_auto_wrap_policy``,
             and HyperMod again with peft's ``fsdp_auto_wrap_policy`` and with the root alone.
* ``zero2`` / ``zero3``  ``deepspeed.initialize`` (DeepSpeed's CPU accelerator, gloo) with a client AdamW.

Gradient clipping that bites (every step's global norm is far above ``CLIP``) runs as one more case per adapter
type: the engine's own clipping (FSDP1 ``clip_grad_norm_``, ``torch.nn.utils.clip_grad_norm_`` on FSDP2's DTensors,
DeepSpeed's ``gradient_clipping``).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import transformers as tf

import hadapeft
from peft import get_peft_model

KINDS = ("gated_lora", "hada_ia3", "film", "hypermod")
CONDITIONED = ("hada_ia3", "film", "hypermod")  # these get mixed task_ids in every batch
NUM_TASKS = 3
STEPS, GLOBAL_BATCH, SEQ, VOCAB = 4, 8, 10, 96
LR, CLIP = 1e-2, 1e-3


def adapter_config(kind: str):
    common = dict(task_type="CAUSAL_LM", init_weights=False)  # non-trivial adapters: every tensor gets gradient
    if kind == "gated_lora":
        return hadapeft.GatedLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **common)
    if kind == "hada_ia3":
        return hadapeft.HadaIA3Config(num_tasks=NUM_TASKS, **common)
    if kind == "film":
        return hadapeft.FiLMConfig(num_tasks=NUM_TASKS, **common)
    return hadapeft.HyperModConfig(num_tasks=NUM_TASKS, r=2, embed_dim=8, hidden_dim=16, **common)


def base_model():
    """The tiny Llama, the same on every rank (seeded): every rank builds it, ZeRO-3 included."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).float()


def build(kind: str):
    base = base_model()
    torch.manual_seed(1)
    return get_peft_model(base, adapter_config(kind))


def global_batch(step: int, kind: str) -> dict:
    """The batch of step ``step`` (all ranks draw the same one and take their rows): equal-length rows, no padding,
    so the mean loss over the global batch is the mean of the ranks' mean losses."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    if kind in CONDITIONED:  # mixed tasks on every rank
        batch["task_ids"] = (torch.arange(GLOBAL_BATCH) + step) % NUM_TASKS
    return batch


def eval_inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    inputs = {"input_ids": torch.randint(0, VOCAB, (6, SEQ), generator=g)}
    if kind in CONDITIONED:
        inputs["task_ids"] = torch.tensor([0, 1, 2, 2, 1, 0])
    return inputs


def cases(engine: str) -> list[tuple[str, str, bool, str]]:
    """(case name, adapter kind, clip, wrap) for ``engine``; ``wrap`` says which FSDP units (FSDP engines only)."""
    out = [(kind, kind, False, "hadapeft") for kind in KINDS] + [(f"{kind}-clip", kind, True, "hadapeft")
                                                               for kind in KINDS]
    if engine.startswith("fsdp"):
        out += [("hypermod-peft_policy", "hypermod", False, "peft"), ("hypermod-root_only", "hypermod", False, "root")]
    return out


def local_rows(batch: dict, rank: int, world: int) -> dict:
    n = GLOBAL_BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --- engines: each returns (step function, save function) -------------------------------------------------------
def run_single(model, clip, wrap):
    opt = torch.optim.AdamW(trainable(model), lr=LR, weight_decay=0.0)

    def step(batch):
        model(**batch).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable(model), CLIP)
        opt.step()
        opt.zero_grad()

    return step, lambda folder: model.save_pretrained(folder)


def run_ddp(model, clip, wrap):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    opt = torch.optim.AdamW(trainable(model), lr=LR, weight_decay=0.0)

    def step(batch):
        ddp(**batch).loss.backward()
        if clip:  # after DDP's all-reduce every rank holds the global gradient
            torch.nn.utils.clip_grad_norm_(trainable(model), CLIP)
        opt.step()
        opt.zero_grad()

    def save(folder):
        if torch.distributed.get_rank() == 0:
            model.save_pretrained(folder)

    return step, save


def _peft_leaf_units(model):
    """The modules peft's ``fsdp_auto_wrap_policy`` wraps on its own: leaves with a trainable ``weight``."""
    return [m for m in model.modules() if not list(m.children()) and getattr(m, "weight", None) is not None
            and m.weight.requires_grad]


def run_fsdp2(model, clip, wrap):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    units = {"hadapeft": hadapeft.fsdp_units, "peft": _peft_leaf_units, "root": lambda m: []}[wrap](model)
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(trainable(model), lr=LR, weight_decay=0.0)

    def step(batch):
        model(**batch).loss.backward()
        if clip:  # DTensor gradients: the norm is the global one
            torch.nn.utils.clip_grad_norm_(trainable(model), CLIP)
        opt.step()
        opt.zero_grad()

    def save(folder):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if torch.distributed.get_rank() == 0:
            model.save_pretrained(folder, state_dict=state)

    return step, save


def run_fsdp1(model, clip, wrap):
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

    policy = {"hadapeft": hadapeft.fsdp_auto_wrap_policy, "peft": peft_policy, "root": lambda m: None}[wrap](model)
    fsdp = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
    opt = torch.optim.AdamW(trainable(fsdp), lr=LR, weight_decay=0.0)

    def step(batch):
        fsdp(**batch).loss.backward()
        if clip:  # FSDP1's own clipping: the norm over all ranks' shards
            fsdp.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()

    def save(folder):
        # offload_to_cpu=True crashes on CPU-only ranks (torch FSDP1); the tensors are on the CPU anyway.
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, config):
            state = fsdp.state_dict()
        if torch.distributed.get_rank() == 0:  # the PeftModel's module paths hold _fsdp_wrapped_module segments
            fsdp.module.save_pretrained(folder, state_dict=state)

    return step, save


def _run_zero(stage):
    def run(model, clip, wrap):
        import deepspeed

        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2,
                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "fp16": {"enabled": False}, "bf16": {"enabled": False},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if stage == 3:
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        if clip:
            config["gradient_clipping"] = CLIP
        opt = torch.optim.AdamW(trainable(model), lr=LR, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

        def step(batch):
            engine.backward(engine(**batch).loss)
            engine.step()

        def save(folder):
            if stage == 3:  # what accelerate's get_state_dict does under ZeRO-3 (a collective)
                state = engine._zero3_consolidated_16bit_state_dict()
            else:
                state = None
            if torch.distributed.get_rank() == 0:
                model.save_pretrained(folder, **({"state_dict": state} if state is not None else {}))

        return step, save

    return run


ENGINES = {"single": run_single, "ddp": run_ddp, "fsdp2": run_fsdp2, "fsdp1": run_fsdp1, "zero2": _run_zero(2),
           "zero3": _run_zero(3)}


def train_case(engine: str, kind: str, clip: bool, wrap: str, folder: str) -> None:
    distributed = engine != "single"
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    model = build(kind).train()
    step, save = ENGINES[engine](model, clip, wrap)
    for i in range(STEPS):
        step(local_rows(global_batch(i, kind), rank, world))
    save(folder)
    if distributed:
        torch.distributed.barrier()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.engine != "single":
        if args.engine.startswith("zero"):
            import deepspeed

            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (C++, ~2 minutes on a fresh machine)
            # before using gloo anyway for what it cannot do; plain gloo is enough for 2 tiny processes.
            deepspeed.ops.__compatible_ops__.update({k: False for k in deepspeed.ops.__compatible_ops__ if "shm" in k})
            deepspeed.init_distributed(dist_backend="gloo")
        else:
            torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for name, kind, clip, wrap in cases(args.engine):
            train_case(args.engine, kind, clip, wrap, os.path.join(args.out, name))
    finally:
        if args.engine != "single":
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
