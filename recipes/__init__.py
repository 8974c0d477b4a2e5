"""Training recipes for hadapeft adapters (run with ``accelerate launch recipes/<name>.py --config ...``).

``common.py`` is the one base (config, model and data loading, the Accelerate training loop, checkpoints, resume, the
final adapter and its model card); ``sft.py``, ``seq_cls.py``, ``image_cls.py`` and ``multitask.py`` each add only
what their task needs. ``loading.py`` holds the model/data/adapter loading that ``examples/`` and ``scripts/`` share.
"""

import os

# With its default busy-waiting, libgomp makes torch's OpenMP threads several times slower whenever another process
# shares the cores (measured on the 2-core dev machine: 5.3 s vs 0.8 s per step, see examples/quickstart.py), which is
# the normal case under `accelerate launch --cpu --num_processes N`. Only takes effect before torch is imported; an
# explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
