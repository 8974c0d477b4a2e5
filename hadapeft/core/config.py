"""Fields every hadapeft adapter config shares, their validation, and help text kept in one place.

Each field's help lives only in its ``metadata["help"]``; :func:`document_fields` writes the class docstring's
argument list from it, so the two can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, Union

from peft.config import PeftConfig

from .. import registry
from ..backend import BACKENDS
from ..errors import HadapeftConfigError
from ..seam.registration import peft_type
from ..version import __version__


def document_fields(cls):
    """Append an ``Args:`` section generated from the dataclass fields' help to ``cls.__doc__``."""
    own = [f for f in fields(cls) if "help" in f.metadata and f.metadata.get("hadapeft", False)]
    lines = [f"    {f.name}: {f.metadata['help']}" for f in own]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


def help_field(default, help: str, **kwargs):
    """A dataclass field whose help text is the single source for docs and error messages."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "hadapeft": True})
    return field(default=default, metadata={"help": help, "hadapeft": True}, **kwargs)


@dataclass
class HadaConfig(PeftConfig):
    """Base of all hadapeft adapter configs (not registered itself)."""

    target_modules: Optional[Union[list[str], str]] = help_field(
        None, "Module names (suffix match) or one regex (full match) to adapt; 'all-linear' for every linear layer "
              "but the output head; None picks the model family's default.")
    exclude_modules: Optional[Union[list[str], str]] = help_field(
        None, "Module names or a regex excluded from target_modules.")
    modules_to_save: Optional[list[str]] = help_field(
        None, "Extra modules (e.g. a classifier head) trained in full and saved with the adapter.")
    layers_to_transform: Optional[Union[list[int], int]] = help_field(
        None, "Only adapt these layer indices (needs layers_pattern for non-standard layouts).")
    layers_pattern: Optional[Union[list[str], str]] = help_field(
        None, "Name of the layer list used with layers_to_transform, e.g. 'layers' or 'h'.")
    init_weights: bool = help_field(
        True, "True: the adapted model computes exactly what the base model computes until trained.")
    backend: str = help_field(
        "auto", "'auto' (Triton on CUDA when available, else PyTorch), 'torch' or 'triton'.")
    hadapeft_version: Optional[str] = help_field(
        None, "hadapeft version that wrote this config (filled in automatically; loading needs `import hadapeft`).")

    # peft reads these on every config; hadapeft adapters never target embeddings or raw parameters.
    target_parameters: Optional[list[str]] = field(default=None, repr=False)

    # Field names of earlier releases -> today's, so that adapter_config.json files they wrote still load.
    renamed_fields: ClassVar[dict[str, str]] = {}
    # Fields that set the size of the adapter's tensors: named when they cannot be allocated.
    size_fields: ClassVar[tuple[str, ...]] = ()

    def sizes(self) -> str:
        """``"num_tasks=3, hidden_dim=64"``: the set fields of ``size_fields``."""
        return ", ".join(f"{n}={getattr(self, n)}" for n in self.size_fields if getattr(self, n) is not None)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """peft calls this with the fields read from adapter_config.json: map renamed fields to their new names."""
        for old, new in cls.renamed_fields.items():
            if old in kwargs:
                value = kwargs.pop(old)
                kwargs.setdefault(new, value)
        return super().check_kwargs(**kwargs)

    def __post_init__(self):
        super().__post_init__()
        adapter_type = registry.type_of_config(self)
        if adapter_type is None:
            raise HadapeftConfigError(f"{type(self).__name__} is not a registered adapter type: register it with "
                                      "hadapeft.registry.register(AdapterType(...))")
        self.peft_type = peft_type(adapter_type.name)
        self._check_version()
        if self.hadapeft_version is None:
            self.hadapeft_version = __version__
        self.validate()

    def validate(self) -> None:
        """Normalize and check every field (raises :class:`HadapeftConfigError` naming the field). Runs when the
        config is built and again when an adapter is injected from it: a config object can be changed in between
        (``cfg.r = 0``). Subclasses extend it (calling ``super().validate()`` first)."""
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.backend not in BACKENDS:
            raise HadapeftConfigError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and any(int(i) < 0 for i in self.layers_to_transform):
            raise HadapeftConfigError(f"layers_to_transform must be non-negative layer indices, "
                                      f"got {self.layers_to_transform}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise HadapeftConfigError("layers_pattern is only used together with layers_to_transform")
        if self.target_parameters:
            raise HadapeftConfigError("hadapeft adapters wrap modules; target_parameters is not supported")

    def _check_version(self):
        from packaging.version import InvalidVersion, Version

        if self.hadapeft_version is None:
            return
        try:
            written = Version(self.hadapeft_version)
        except InvalidVersion:
            raise HadapeftConfigError(f"hadapeft_version={self.hadapeft_version!r} is not a version") from None
        if written.major > Version(__version__).major or (
                written.major == 0 and written.minor > Version(__version__).minor):
            raise HadapeftConfigError(
                f"this adapter was written by hadapeft {written}, newer than the installed {__version__}; "
                f"upgrade with: pip install -U 'hadapeft>={written}'")

    def conditioning_spec(self):
        """What this adapter needs per sample (``ConditioningSpec``), or None for an unconditioned adapter."""
        return None

    @staticmethod
    def _positive(name, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise HadapeftConfigError(f"{name} must be a positive integer, got {value!r}")


# One source for the conditioning fields' help (FiLM and HyperMod have both, HadaIA3 has num_tasks).
NUM_TASKS_HELP = ("Number of tasks: a learned table row per task, chosen per sample by task_ids=LongTensor[batch] in "
                  "forward / generate / hadapeft.conditioning.")
TASK_EMBED_DIM_HELP = ("Width of an external conditioning vector per sample, task_embeds=FloatTensor[batch, dim] "
                       "(e.g. a sentence embedding of the task description): works for tasks unseen in training.")


@dataclass
class TaskConditionedConfig(HadaConfig):
    """Base of adapters conditioned per sample on a task id or a task embedding (exactly one of the two)."""

    num_tasks: Optional[int] = help_field(None, NUM_TASKS_HELP)
    task_embed_dim: Optional[int] = help_field(None, TASK_EMBED_DIM_HELP)
    size_fields = ("num_tasks", "task_embed_dim")

    def validate(self):
        super().validate()
        self._positive("num_tasks", self.num_tasks, allow_none=True)
        self._positive("task_embed_dim", self.task_embed_dim, allow_none=True)
        if (self.num_tasks is None) == (self.task_embed_dim is None):
            raise HadapeftConfigError(f"{type(self).__name__} needs exactly one of num_tasks (a task id per sample) "
                                      f"and task_embed_dim (a conditioning vector per sample); got "
                                      f"num_tasks={self.num_tasks}, task_embed_dim={self.task_embed_dim}")

    def conditioning_spec(self):
        from .conditioning import ConditioningSpec

        return ConditioningSpec(str(self.peft_type.value), self.num_tasks, self.task_embed_dim)


# One name per idea across configs: the rank of a low-rank term is ``r`` (as in peft's LoRA), the width of a small
# MLP that produces an adapter's tables is ``hidden_dim``.
