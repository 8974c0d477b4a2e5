"""One folder per adapter type: config.py (fields), layer.py (the formula), model.py (defaults, injection extras)."""
