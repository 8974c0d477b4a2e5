from ...registry import AdapterType, OptionSet, register
from .config import FiLMConfig
from .layer import FiLMLinear
from .model import FiLMModel

_FAMILIES = ("llama", "gpt2", "bert", "vit")
ADAPTER = register(AdapterType(
    name="FILM", config_cls=FiLMConfig, model_cls=FiLMModel, quantity="scale γ(task)",
    option_sets={
        "film_tasks": OptionSet(dict(num_tasks=3), families=_FAMILIES),
        "film_embeds": OptionSet(dict(task_embed_dim=6), families=_FAMILIES),
    },
))

__all__ = ["FiLMConfig", "FiLMLinear", "FiLMModel", "ADAPTER"]
