from ...registry import AdapterType, OptionSet, register
from .config import HyperModConfig
from .layer import HyperModLinear, HyperNet
from .model import HyperModModel

_FAMILIES = ("llama", "gpt2", "bert", "vit")
ADAPTER = register(AdapterType(
    name="HYPERMOD", config_cls=HyperModConfig, model_cls=HyperModModel, quantity="row mean of u vᵀ",
    option_sets={
        "hypermod_r1": OptionSet(dict(num_tasks=3), families=_FAMILIES),
        "hypermod_r2": OptionSet(dict(num_tasks=3, r=2), families=_FAMILIES),
        "hypermod_embeds": OptionSet(dict(task_embed_dim=6), families=_FAMILIES),
    },
))

__all__ = ["HyperModConfig", "HyperModLinear", "HyperModModel", "HyperNet", "ADAPTER"]
