from ...registry import AdapterType, OptionSet, register
from .config import HadaIA3Config
from .layer import HadaIA3Linear
from .model import HadaIA3Model

ADAPTER = register(AdapterType(
    name="HADA_IA3", config_cls=HadaIA3Config, model_cls=HadaIA3Model, quantity="scale l",
    option_sets={
        "ia3": OptionSet(),
        "ia3_all_linear": OptionSet(dict(target_modules="all-linear"), families=("llama", "gpt2", "bert", "vit")),
        "ia3_fused_qkv": OptionSet(dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                        fused_qkv_modules=["c_attn"]), families=("gpt2",)),
        "ia3_tasks": OptionSet(dict(num_tasks=3), families=("llama", "gpt2", "bert", "vit")),
    },
    bench_options=("ia3", "ia3_tasks"),
))

__all__ = ["HadaIA3Config", "HadaIA3Linear", "HadaIA3Model", "ADAPTER"]
