"""hadapeft: Hadamard-product adapters for HuggingFace PEFT.

``import hadapeft`` registers the adapter types with peft; then use peft as usual::

    import hadapeft
    from peft import get_peft_model
    model = get_peft_model(base_model, hadapeft.GatedLoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

The adapter types are the folders of ``hadapeft/tuners``; each registers itself in ``hadapeft.registry``, and the
config classes exported here (``GatedLoraConfig``, ``HadaIA3Config``, ``FiLMConfig``, ``HyperModConfig``) are read
from that registry.
"""

from .seam import check_peft_version

check_peft_version()

from . import registry, tuners  # noqa: E402
from .backend import use_backend  # noqa: E402
from .core.conditioning import conditioning, for_call  # noqa: E402
from .descriptions import DescriptionEncoder, describe_tasks  # noqa: E402
from .distributed import check_engine, fsdp_auto_wrap_policy, fsdp_units  # noqa: E402
from .errors import (AdapterCheckpointError, ConditioningError, EngineError, HadapeftConfigError,  # noqa: E402
                     TargetModuleError)
from .safety import allow_nonfinite_checkpoints, allow_pickle_checkpoints  # noqa: E402
from .seam import peft_model as _peft_model  # noqa: E402
from .version import __version__  # noqa: E402

tuners.import_all()
_peft_model.install(for_call)
globals().update({t.config_cls.__name__: t.config_cls for t in registry.ADAPTER_TYPES.values()})

# Trainer integrations, imported when first used (name -> module of hadapeft).
_LAZY = {"SFTTrainer": "trl", "DPOTrainer": "trl", "ConditionedTrainerMixin": "trainer",
         "ConditioningCollator": "trainer"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'hadapeft' has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"hadapeft.{name} needs {e.name}: pip install trl datasets") from e
    return getattr(module, name)


__all__ = [
    *(t.config_cls.__name__ for t in registry.ADAPTER_TYPES.values()),
    "conditioning", "DescriptionEncoder", "describe_tasks", "use_backend", "__version__",
    "allow_pickle_checkpoints", "allow_nonfinite_checkpoints",
    "HadapeftConfigError", "TargetModuleError", "AdapterCheckpointError", "ConditioningError", "EngineError",
    "fsdp_auto_wrap_policy", "fsdp_units", "check_engine",
    *(name for name, module in _LAZY.items() if module != "trl"),  # `import *` must work without TRL installed
]
