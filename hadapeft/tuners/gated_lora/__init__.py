from ...registry import AdapterType, OptionSet, register
from .config import GatedLoraConfig
from .layer import GatedLoraLinear
from .model import GatedLoraModel

ADAPTER = register(AdapterType(
    name="GATED_LORA", config_cls=GatedLoraConfig, model_cls=GatedLoraModel, quantity="gate γ",
    option_sets={
        "gated_vector": OptionSet(dict(r=4, lora_alpha=8)),
        "gated_recompute": OptionSet(dict(r=4, lora_alpha=8, gate_grad="recompute"),
                                     families=("llama", "gpt2", "bert", "vit")),
        "gated_scalar_all_linear": OptionSet(dict(r=2, lora_alpha=4, gate="scalar", target_modules="all-linear",
                                                  lora_dropout=0.1), families=("llama", "gpt2", "bert", "vit")),
    },
    bench_options=("gated_vector", "gated_recompute"),
))

__all__ = ["GatedLoraConfig", "GatedLoraLinear", "GatedLoraModel", "ADAPTER"]
