"""Exception types. Each subclasses ValueError so code written against peft's errors keeps working."""


class HadapeftConfigError(ValueError):
    """An adapter config field has an invalid value, or fields conflict."""


class TargetModuleError(ValueError):
    """``target_modules`` matched nothing adaptable, or matched a module type hadapeft cannot adapt."""


class AdapterCheckpointError(ValueError):
    """A saved adapter is missing, corrupt, or does not fit the base model."""


class ConditioningError(ValueError):
    """``task_ids`` / ``task_embeds`` are missing or do not fit the adapter or the batch."""


class EngineError(RuntimeError):
    """A distributed engine (FSDP, DeepSpeed) was asked for but would not run, or runs in a way hadapeft cannot
    train correctly under."""
