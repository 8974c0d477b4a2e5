"""One folder per adapter type: config.py (fields), layer.py (the formula), model.py (defaults, injection extras),
and ``__init__.py`` registering the type (``hadapeft.registry``). The folder's name is the peft type in lower case."""

from __future__ import annotations

import importlib
import pkgutil


def import_all() -> None:
    """Import every tuner folder, which registers its adapter type."""
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
