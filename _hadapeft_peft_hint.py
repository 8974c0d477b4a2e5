"""Loaded at interpreter start by ``hadapeft_peft_hint.pth`` (installed with hadapeft).

peft only knows hadapeft's adapter types after ``import hadapeft``; without it, loading such an adapter failed with
a bare ``KeyError: 'GATED_LORA'``. This hook waits for ``peft.config`` to be imported (it imports nothing itself) and
wraps the two places where peft reads an adapter's type, so that the error says what to do. It never changes a
successful load, and any failure inside the hook leaves peft untouched.
"""

import sys


def hadapeft_types() -> set:
    """The adapter types of the installed hadapeft, without importing it: the folder names of ``hadapeft/tuners``
    (each folder is one type, named as its peft type in lower case; see ``hadapeft/registry.py``)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("hadapeft")
    if spec is None or not spec.submodule_search_locations:
        return set()
    types = set()
    for root in spec.submodule_search_locations:
        tuners = os.path.join(root, "tuners")
        if os.path.isdir(tuners):
            types |= {d.upper() for d in os.listdir(tuners) if os.path.isfile(os.path.join(tuners, d, "__init__.py"))}
    return types


def _check(peft_type):
    name = str(getattr(peft_type, "value", peft_type))
    # Also a wrongly written type ('gated_lora'): after `import hadapeft` it would still fail, so say both.
    normalized = name.strip().upper().replace("-", "_")
    if "hadapeft" not in sys.modules and normalized and normalized in hadapeft_types():
        fix = f"; also write its peft_type as {normalized!r} (not {name!r}) in adapter_config.json" \
            if normalized != name else ""
        raise ValueError(f"this adapter is a hadapeft {normalized} adapter: run `import hadapeft` before loading it "
                         f"(pip install hadapeft); peft does not know the type otherwise{fix}")


def _patch(module):
    cls = module.PeftConfigMixin
    get_type, from_type = cls._get_peft_type.__func__, cls.from_peft_type.__func__

    def _get_peft_type(klass, *args, **kwargs):
        peft_type = get_type(klass, *args, **kwargs)
        _check(peft_type)
        return peft_type

    def from_peft_type(klass, **kwargs):
        _check(kwargs.get("peft_type"))
        return from_type(klass, **kwargs)

    cls._get_peft_type = classmethod(_get_peft_type)
    cls.from_peft_type = classmethod(from_peft_type)


class _Finder:
    """Meta-path finder that patches ``peft.config`` right after it has executed, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft.config":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            try:
                _patch(module)
            except Exception:  # a hint must never break peft
                pass
            finally:
                _remove()

        spec.loader.exec_module = exec_and_patch
        return spec


def _remove():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install():
    if "peft.config" in sys.modules:
        _patch(sys.modules["peft.config"])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:
    pass
