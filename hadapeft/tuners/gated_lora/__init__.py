from .config import GatedLoraConfig
from .layer import GatedLoraLinear
from .model import GatedLoraModel

__all__ = ["GatedLoraConfig", "GatedLoraLinear", "GatedLoraModel"]
