from .config import HadaIA3Config
from .layer import HadaIA3Layer
from .model import HadaIA3Model

__all__ = ["HadaIA3Config", "HadaIA3Layer", "HadaIA3Model"]
