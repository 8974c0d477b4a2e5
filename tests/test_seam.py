"""The seam: every private name of peft / transformers / torch that hadapeft relies on is in one inventory that the
installed versions are checked against, and no code outside ``hadapeft/seam`` reaches such a name itself."""

from __future__ import annotations

import ast
import pathlib

import pytest
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

import importlib.util

from hadapeft import registry
from hadapeft.seam import hooks

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("peft", "transformers", "bitsandbytes", "trl", "torch")  # torch last: scripts may use its privates
# Modules of peft whose contents are internal (no underscore, but not peft's public API).
INTERNAL_MODULES = ("peft.mapping", "peft.utils.integrations", "peft.utils.peft_types", "peft.auto")


def test_every_private_hook_exists_on_the_installed_versions():
    missing = hooks.missing_hooks()
    assert missing == [], f"private names hadapeft relies on are gone from the installed versions: {missing}"


@pytest.mark.parametrize("owner,name", [(BaseTuner, "_remap_adapter_state_dict_for_load"),
                                        (BaseTunerLayer, "_move_adapter_to_device_of_base_layer")])
def test_the_inventory_fails_when_a_hook_is_renamed(monkeypatch, owner, name):
    monkeypatch.delattr(owner, name)  # what a peft release renaming it would look like
    assert any(m.endswith(f"{owner.__name__}.{name}") for m in hooks.missing_hooks())


def _private_members() -> set[str]:
    names = set()
    for cls in (BaseTuner, BaseTunerLayer, PeftModel, PeftConfig):
        names |= {n for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
    return names


def _chain(node) -> list[str]:
    """``torch._C.x`` -> ["torch", "_C", "x"]; [] when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def private_uses(path: pathlib.Path, torch_too: bool) -> list[str]:
    """Where ``path`` imports or touches a private name of peft / transformers / bitsandbytes / trl (and torch, if
    ``torch_too``)."""
    libraries = LIBRARIES if torch_too else LIBRARIES[:-1]
    members = _private_members()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in libraries:
            if any(p.startswith("_") for p in node.module.split(".")) or node.module.startswith(INTERNAL_MODULES):
                found.append(f"{where} from {node.module} import ...")
            found += [f"{where} from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in libraries
                      and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in libraries and any(p.startswith("_") and not p.startswith("__")
                                                       for p in chain[1:]):
                found.append(f"{where} {'.'.join(chain)}")
            elif node.attr in members:
                found.append(f"{where} .{node.attr} (private member of a peft class)")
        elif isinstance(node, ast.FunctionDef) and node.name in members:
            found.append(f"{where} def {node.name} (overrides a private peft method)")
    return found


def project_files():
    """(file, whether torch privates count) for the package outside the seam, recipes, scripts and examples. The
    start-up hint is not in the list: it runs before hadapeft is importable; its two peft hooks are in the
    inventory."""
    for folder, torch_too in (("hadapeft", True), ("recipes", False), ("scripts", False), ("examples", False)):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "seam" not in path.relative_to(ROOT).parts:
                yield path, torch_too


def test_no_private_names_outside_the_seam():
    found = [use for path, torch_too in project_files() for use in private_uses(path, torch_too)]
    assert found == [], "private names used outside hadapeft/seam:\n" + "\n".join(found)


def test_the_scan_finds_private_names(tmp_path):
    """The scan above can fail: each kind of use it looks for is caught."""
    bad = ROOT / "hadapeft" / "_scan_probe.py"
    bad.write_text("import torch\nfrom peft.tuners.tuners_utils import _get_tuner_state_dict_key_prefixes\n"
                   "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\nx = torch._C._current_graph_task_id()\n"
                   "class T:\n    def _create_and_replace(self):\n        self._replace_module()\n")
    try:
        found = private_uses(bad, torch_too=True)
    finally:
        bad.unlink()
    assert len(found) >= 5 and all(any(k in f for f in found) for k in (
        "_get_tuner_state_dict_key_prefixes", "peft.mapping", "torch._C", "def _create_and_replace",
        "._replace_module")), found


def test_the_seam_does_not_import_core():
    for path in sorted((ROOT / "hadapeft" / "seam").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hadapeft")):
                parts = (node.module or "").split(".")
                assert "core" not in parts and "tuners" not in parts, (path.name, node.module)


def test_the_start_up_hint_names_every_registered_type():
    spec = importlib.util.spec_from_file_location("_hint_under_test", ROOT / "_hadapeft_peft_hint.py")
    hint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hint)
    hint._remove()  # the copy loaded here must not stay on sys.meta_path
    assert hint.hadapeft_types() == set(registry.ADAPTER_TYPES)
