"""hadapeft: Hadamard-product adapters for HuggingFace PEFT.

``import hadapeft`` registers the adapter types with peft; then use peft as usual::

    import hadapeft
    from peft import get_peft_model
    model = get_peft_model(base_model, hadapeft.GatedLoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
"""

from ._peft_integration import allow_pickle_checkpoints, check_peft_version, install_conditioning_kwargs, \
    install_load_guard, register_adapter_type

check_peft_version()

from .backend import use_backend  # noqa: E402
from .errors import AdapterCheckpointError, ConditioningError, HadapeftConfigError, TargetModuleError  # noqa: E402
from .version import __version__  # noqa: E402

# Types must exist in peft's enum before the config classes (which reference PeftType.X) are used.
from ._peft_integration import _add_enum_member  # noqa: E402
from peft.utils import PeftType  # noqa: E402

for _name in ("GATED_LORA", "HADA_IA3", "FILM", "HYPERMOD"):
    _add_enum_member(PeftType, _name)

from .tuners.gated_lora import GatedLoraConfig, GatedLoraModel  # noqa: E402
from .tuners.hada_ia3 import HadaIA3Config, HadaIA3Model  # noqa: E402
from .tuners.film import FiLMConfig, FiLMModel  # noqa: E402
from .tuners.hypermod import HyperModConfig, HyperModModel  # noqa: E402
from .core.conditioning import conditioning  # noqa: E402

register_adapter_type("GATED_LORA", GatedLoraConfig, GatedLoraModel)
register_adapter_type("HADA_IA3", HadaIA3Config, HadaIA3Model)
register_adapter_type("FILM", FiLMConfig, FiLMModel)
register_adapter_type("HYPERMOD", HyperModConfig, HyperModModel)
install_load_guard()
install_conditioning_kwargs()

__all__ = [
    "GatedLoraConfig", "HadaIA3Config", "FiLMConfig", "HyperModConfig", "conditioning", "use_backend", "__version__",
    "allow_pickle_checkpoints",
    "HadapeftConfigError", "TargetModuleError", "AdapterCheckpointError", "ConditioningError",
]
