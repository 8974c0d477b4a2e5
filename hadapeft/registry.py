"""The registry of adapter types: what each tuner folder declares, read by everything else.

Each folder ``hadapeft/tuners/<name>/`` ends its ``__init__.py`` with ``register(AdapterType(...))``. ``import
hadapeft`` imports every tuner folder, so the registry then holds all types; from it

* ``hadapeft/__init__.py`` exports the config classes,
* ``hadapeft.seam`` registers each type with peft (a ``PeftType`` member, config and tuner classes, prefix),
* the start-up hint (``_hadapeft_peft_hint.py``) names the types by their folder names, without importing hadapeft,
* ``tests/`` runs every option set through the contract table,
* ``scripts/bench.py`` times each type's benchmark option sets and ``scripts/inspect_adapter.py`` labels its plots.

Adding a fifth adapter is one new tuner folder (config, layer, model, this entry) plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional


@dataclass(frozen=True)
class OptionSet:
    """One configuration of an adapter exercised by the contract tests (and, if named in ``bench_options``, by the
    benchmark): config keyword arguments beyond ``task_type`` / ``modules_to_save`` / ``init_weights``."""

    kwargs: Mapping = field(default_factory=dict)
    families: Optional[tuple[str, ...]] = None  # model families of tests/conftest.py it applies to; None: all


@dataclass(frozen=True)
class AdapterType:
    """Everything the project needs to know about one adapter type."""

    name: str  # peft type, upper case; the tuner folder is hadapeft/tuners/<name.lower()>
    config_cls: type  # a hadapeft.core.config.HadaConfig subclass
    model_cls: type  # a hadapeft.core.model.HadaModel subclass (its ``prefix`` starts every parameter name)
    quantity: str  # what scripts/inspect_adapter.py reports per feature, e.g. "gate γ"
    option_sets: Mapping[str, OptionSet]  # the contract table's cases for this type; the first is its default
    bench_options: tuple[str, ...] = ()  # option sets scripts/bench.py times; () means the first one

    def __post_init__(self):
        if self.name != self.name.upper():
            raise ValueError(f"adapter type names are upper case, got {self.name!r}")
        if not self.option_sets:
            raise ValueError(f"{self.name}: declare at least one option set")
        unknown = set(self.bench_options) - set(self.option_sets)
        if unknown:
            raise ValueError(f"{self.name}: bench_options {sorted(unknown)} are not option sets")

    @property
    def benchmarked(self) -> tuple[str, ...]:
        return self.bench_options or (next(iter(self.option_sets)),)

    def make_config(self, option: str, **overrides):
        return self.config_cls(**{**self.option_sets[option].kwargs, **overrides})


ADAPTER_TYPES: dict[str, AdapterType] = {}  # name -> type, in registration order


def register(adapter_type: AdapterType) -> AdapterType:
    """Add ``adapter_type`` to the registry and register it with peft; idempotent for the same type."""
    from .seam.registration import register_with_peft

    known = ADAPTER_TYPES.get(adapter_type.name)
    if known is not None and known.config_cls is not adapter_type.config_cls:
        raise ValueError(f"adapter type {adapter_type.name} is already registered with {known.config_cls.__name__}")
    clash = [t.name for t in ADAPTER_TYPES.values()
             if t.name != adapter_type.name and t.model_cls.prefix == adapter_type.model_cls.prefix]
    if clash:
        raise ValueError(f"{adapter_type.name}: prefix {adapter_type.model_cls.prefix!r} is already used by {clash[0]}")
    register_with_peft(adapter_type.name, adapter_type.config_cls, adapter_type.model_cls)
    ADAPTER_TYPES[adapter_type.name] = adapter_type
    return adapter_type


def unregister(name: str) -> None:
    """Forget a type (tests that define a throwaway adapter); peft keeps knowing it, which is harmless."""
    ADAPTER_TYPES.pop(name, None)


def type_of_config(config) -> Optional[AdapterType]:
    """The registered type of a config object or class (subclasses of a registered config count), or None."""
    cls = config if isinstance(config, type) else type(config)
    for klass in cls.__mro__:
        for t in ADAPTER_TYPES.values():
            if t.config_cls is klass:
                return t
    return None


def is_hadapeft_type(peft_type) -> bool:
    """Whether a ``PeftType`` member or string names a registered hadapeft type."""
    return str(getattr(peft_type, "value", peft_type)) in ADAPTER_TYPES
