"""Training recipes for hadapeft adapters on the ecosystem's trainers (``python -m recipes.<name> --config ...``, or
``accelerate launch -m recipes.<name> ...`` on 1..N processes).

``common.py`` holds what the trainers lack (model / adapter / data arguments, base model and adapter construction,
resume checks, the JSON-lines log, the files next to the adapter); ``sft.py`` and ``multitask.py`` run on
``hadapeft.SFTTrainer`` (TRL), ``seq_cls.py`` and ``image_cls.py`` on ``transformers.Trainer`` through
``classification.py``. ``loading.py`` holds the model/data/adapter loading that ``examples/`` and ``scripts/`` share.
"""

import os

# With its default busy-waiting, libgomp makes torch's OpenMP threads several times slower whenever another process
# shares the cores (measured on the 2-core dev machine: 5.3 s vs 0.8 s per MiniLM training step; the comparison's ViT
# pre-training under load ~8: 1,030 s vs 24 s), which is the normal case under `accelerate launch --num_processes N`.
# Only takes effect before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes' import-time kernel fetch warns on CPUs with AVX512-BF16 (hadapeft.seam.bnb.import_quietly): import it
# quietly before anything a recipe imports (peft, transformers' 4-bit loading) does.
from hadapeft.seam.bnb import import_quietly  # noqa: E402

import_quietly()
