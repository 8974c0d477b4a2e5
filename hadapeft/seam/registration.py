"""Registering a hadapeft type with peft: a new member of peft's closed ``PeftType`` enum, then
``register_peft_method`` (there is no plugin mechanism, see huggingface/peft#2273 and #2282)."""

from __future__ import annotations

import enum
import sys

from peft.utils import PeftType, register_peft_method


def add_enum_member(enum_cls: type[enum.Enum], name: str, python: tuple[int, int] | None = None) -> enum.Enum:
    """Add member ``name`` (value ``name``) to a ``(str, Enum)`` class at runtime; idempotent.

    ``python`` selects the code path (defaults to the running interpreter) so that the branch for the other
    interpreter versions can be unit tested from one interpreter.
    """
    if name in enum_cls.__members__:
        return enum_cls[name]
    python = python or sys.version_info[:2]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)  # definition order (read by Python >= 3.11)
    if python >= (3, 13) and hasattr(enum_cls, "_add_member_"):
        # 3.13 grew a helper that binds the class attribute (as a descriptor) and fills _member_map_; it leaves
        # _member_names_ and the value map to the caller, as enum's own class construction does.
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        # Bypass EnumType.__setattr__, which refuses to rebind members.
        type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member
    return member


def peft_type(name: str) -> PeftType:
    """The ``PeftType`` member of a hadapeft type (created on first use)."""
    return add_enum_member(PeftType, name)


def register_with_peft(name: str, config_cls: type, model_cls: type) -> None:
    """Register one adapter type with peft; safe to call more than once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    member = peft_type(name)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is config_cls:
        return
    prefix = model_cls.prefix
    # register_peft_method checks prefix uniqueness against the mapping's keys, not its values: check it here.
    clash = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != member]
    if clash:
        raise RuntimeError(f"hadapeft prefix {prefix!r} for {name} is already used by peft type {clash[0]}")
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
