from .config import HyperModConfig
from .layer import HyperModLinear, HyperNet
from .model import HyperModModel

__all__ = ["HyperModConfig", "HyperModLinear", "HyperModModel", "HyperNet"]
