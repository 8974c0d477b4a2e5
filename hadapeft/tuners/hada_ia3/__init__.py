from .config import HadaIA3Config
from .layer import HadaIA3Linear
from .model import HadaIA3Model

__all__ = ["HadaIA3Config", "HadaIA3Linear", "HadaIA3Model"]
