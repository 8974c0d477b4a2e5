from .config import FiLMConfig
from .layer import FiLMLinear
from .model import FiLMModel

__all__ = ["FiLMConfig", "FiLMLinear", "FiLMModel"]
