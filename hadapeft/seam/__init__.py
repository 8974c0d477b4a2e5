"""The one seam between hadapeft and the private internals of peft, transformers, TRL and torch.

Only the modules of this package import or override private names of those libraries (``tests/test_seam.py``
greps the rest of the project); each such name is listed, with the reason, in :data:`hooks.PRIVATE_HOOKS`.

* ``registration`` — new members of peft's closed ``PeftType`` enum, then ``register_peft_method``;
* ``tuner`` — peft's ``BaseTuner`` / ``BaseTunerLayer`` with their private hooks mapped onto named methods;
* ``peft_model`` — all-or-nothing loading, crash-consistent saving and ``task_ids`` / ``task_embeds`` on
  ``PeftModel`` and its task classes;
* ``bnb`` — bitsandbytes 4-bit weights in either of its CPU layouts (repacked for AVX512-BF16 or not);
* ``trainer`` — transformers' ``Trainer`` / TRL's trainers: the columns they keep, TRL's dataset preparation (for
  ``hadapeft.trainer`` and ``hadapeft.trl``; tested with TRL 1.16.x, ``SUPPORTED_TRL``, a warning outside it);
* ``hooks`` — the inventory, and accessors for the few private functions used elsewhere.

Tested with peft 0.21.x (``SUPPORTED_PEFT``); outside that range ``import hadapeft`` raises, because the enum surgery
and the tuner hooks depend on private layout that peft changes between minor releases.
"""

from __future__ import annotations

from .bnb import import_quietly

import_quietly()  # bitsandbytes, before `import peft` imports it

import peft  # noqa: E402
from packaging.version import Version  # noqa: E402

# Lowest tested peft (inclusive) and first untested minor (exclusive). Keep in sync with pyproject.toml.
SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


class UnsupportedPeftVersionError(ImportError):
    """peft is installed in a version hadapeft was not tested with."""


def check_peft_version(version: str | None = None) -> None:
    v = Version(version or peft.__version__)
    low, high = SUPPORTED_PEFT
    if not (low <= v < high):
        raise UnsupportedPeftVersionError(
            f"hadapeft supports peft >={low},<{high} but peft {v} is installed. "
            f"Install a supported version: pip install 'peft>={low},<{high}'."
        )
