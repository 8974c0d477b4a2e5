"""Training recipes for hadapeft adapters on the ecosystem's trainers (``python -m recipes.<name> --config ...``, or
``accelerate launch -m recipes.<name> ...`` on 1..N processes).

``common.py`` holds what the trainers lack (model / adapter / data arguments, base model and adapter construction,
resume checks, the JSON-lines log, the files next to the adapter); ``sft.py`` and ``multitask.py`` run on
``hadapeft.SFTTrainer`` (TRL), ``seq_cls.py`` and ``image_cls.py`` on ``transformers.Trainer`` through
``classification.py``. ``loading.py`` holds the model/data/adapter loading that ``examples/`` and ``scripts/`` share.
"""

import logging
import os

# With its default busy-waiting, libgomp makes torch's OpenMP threads several times slower whenever another process
# shares the cores (measured on the 2-core dev machine: 5.3 s vs 0.8 s per MiniLM training step; the comparison's ViT
# pre-training under load ~8: 1,030 s vs 24 s), which is the normal case under `accelerate launch --num_processes N`.
# Only takes effect before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes >= 0.50 tries to fetch an optional CPU 4-bit kernel from the Hub (kernels-community) when it is
# imported (which `import peft` does) and logs a WARNING when it cannot; it then uses its own CPU code, which the
# recipes' QLoRA test checks. Quiet that one logger (bitsandbytes' other loggers are untouched).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
