"""What all hadapeft adapters share: the modulated layer (fused, composed and merged paths derived from one
``Modulation``), injection and rollback, merge bookkeeping, configs, per-sample conditioning and default targets.
Each adapter in ``hadapeft/tuners`` is a thin instance of it."""
