from .config import GatedLoraConfig
from .layer import GatedLoraLayer
from .model import GatedLoraModel

__all__ = ["GatedLoraConfig", "GatedLoraLayer", "GatedLoraModel"]
