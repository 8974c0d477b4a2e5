"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict`` (broken links, missing API
references and docstring warnings fail it), its API reference covers every public name of ``hadapeft``, its option
tables match the configs, its ```python examples run (each one a program of its own, offline), and neither it nor
the README names a module or file that does not exist. The ```bash commands of the pages run in
tests/test_readme_commands.py, which also extracts the blocks for this file."""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hadapeft
from test_readme_commands import code_blocks, doc_pages

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *doc_pages()]
API = sorted((REPO / "docs" / "api").glob("*.md"))


def _page(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------------------- build
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="needs the docs extra (pip install '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    nav = re.findall(r":\s*([\w/]+\.md)\s*$|^\s*-\s*([\w/]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), flags=re.M)
    pages = {a or b for a, b in nav}
    assert {"index.md", "getting_started.md", "adapters/film.md", "guides/errors.md", "results.md",
            "api/configs.md"} <= pages
    for page in pages:  # every page of the nav was built
        html = site / (page[:-3].removesuffix("index") if page.endswith("index.md") else page[:-3]) / "index.html"
        assert html.is_file(), page
    configs = (site / "api" / "configs" / "index.html").read_text()
    for name in ("GatedLoraConfig", "HadaIA3Config", "FiLMConfig", "HyperModConfig"):  # rendered from docstrings
        assert f'id="hadapeft.tuners.' in configs and name in configs, name
    assert "Feature-wise linear modulation" in configs or "feature-wise linear modulation" in configs
    assert not list(site.glob("*.json"))  # docs/'s data files (results, tuned learning rates) are not pages


# -------------------------------------------------------------------------------------------------- API reference
def _resolve(dotted: str):
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_api_reference_covers_every_public_name():
    pytest.importorskip("trl", reason="hadapeft.SFTTrainer / DPOTrainer need trl")
    documented = [_resolve(path) for page in API for path in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(),
                                                                           flags=re.M)]
    public = [*hadapeft.__all__, *hadapeft._LAZY]  # the TRL trainers are public but not in __all__
    missing = [n for n in public if not any(getattr(hadapeft, n) is obj for obj in documented)]
    assert not missing, f"add `::: hadapeft.<module>.<name>` for {missing} to a page of docs/api/"
    index = (REPO / "docs" / "api" / "index.md").read_text()
    assert all(f"`{n}`" in index for n in public), "docs/api/index.md lists every public name"


# ---------------------------------------------------------------------------------------------- option tables
def _options(page: Path) -> dict[str, object]:
    """``| `name` | `default` | ... |`` rows of a page's option tables -> {name: default as a Python value}."""
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", page.read_text(), flags=re.M)
    return {name: ast.literal_eval(default) for name, default in rows}


ADAPTER_PAGES = {"gated_lora": "GatedLoraConfig", "hada_ia3": "HadaIA3Config", "film": "FiLMConfig",
                 "hypermod": "HyperModConfig"}


@pytest.mark.parametrize("page", [*ADAPTER_PAGES, "index"])
def test_option_tables_match_the_configs(page):
    """Each adapter page lists its config's own fields with their defaults; the adapters' index page the fields every
    config shares (hadapeft's fields carry ``metadata["hadapeft"]``; peft's own fields are peft's to document)."""
    from hadapeft.core.config import HadaConfig

    def own(cls, *bases):
        inherited = {f.name for b in bases for f in dataclasses.fields(b)}
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.metadata.get("hadapeft") and f.name not in inherited}

    expected = own(HadaConfig) if page == "index" else own(getattr(hadapeft, ADAPTER_PAGES[page]), HadaConfig)
    assert _options(REPO / "docs" / "adapters" / f"{page}.md") == expected


# ------------------------------------------------------------------------------------------------ code examples
RUNNER = textwrap.dedent("""
    import json, os, sys, tempfile, time, traceback
    blocks = json.load(sys.stdin)
    failed = []
    for where, code in blocks:
        os.chdir(tempfile.mkdtemp(prefix="docs-example-"))  # each example writes into a folder of its own
        start = time.perf_counter()
        try:
            exec(compile(code, where, "exec"), {"__name__": "__main__"})  # a fresh namespace: a program of its own
        except BaseException:
            failed.append(f"{where}:\\n{traceback.format_exc()}")
        print(f"{where}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(failed))
""")


def python_examples() -> list[tuple[str, str]]:
    return [(f"{_page(p)}[{i}]", code) for p in PAGES for i, code in enumerate(code_blocks(p.read_text(), "python"))]


def test_the_pages_have_examples():
    examples = python_examples()
    pages = {where.split("[")[0] for where, _ in examples}
    assert len(examples) >= 12 and {"README.md", "docs/getting_started.md", "docs/adapters/film.md",
                                     "docs/guides/training.md"} <= pages


@pytest.mark.slow
def test_python_examples_run():
    """Every ```python block of the README and the docs, each in a fresh namespace and folder, in one process (one
    import of torch and transformers: 26 s for 15 examples on 2 cores; slow, as it is near the 30 s line)."""
    pytest.importorskip("trl", reason="the training examples need trl and datasets (the test extra)")
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(python_examples()), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(failed)


# -------------------------------------------------------------------------------------------- paths in the text
ROOTS = ("hadapeft", "recipes", "scripts", "examples", "tests", "benchmarks", "docs", ".ci")
PATH = re.compile(r"(?<![\w./#-])((?:%s)/[\w./*{},-]*[\w*}/])" % "|".join(re.escape(r) for r in ROOTS))
MODULE = re.compile(r"(?<![\w./-])((?:hadapeft|recipes|scripts|examples)(?:\.[A-Za-z_]\w*)+)")
CHECKED = [*PAGES, REPO / "recipes" / "README.md", REPO / "pyproject.toml"]


def _expand(path: str) -> list[str]:
    """``recipes/{sft,multitask}.py`` -> both paths (one brace group)."""
    m = re.search(r"\{([^}]*)\}", path)
    return [path[:m.start()] + part + path[m.end():] for part in m.group(1).split(",")] if m else [path]


def stale_references(text: str) -> list[str]:
    """Module paths (``hadapeft/x.py``, ``scripts/`` folders, globs) and dotted names (``hadapeft.foo.bar``,
    ``python -m scripts.x``) in ``text`` that do not exist."""
    stale = []
    for path in PATH.findall(text):
        path = path.rstrip(".")
        for one in _expand(path):
            if not (glob.glob(str(REPO / one)) if "*" in one else (REPO / one).exists()):
                stale.append(one)
    for dotted in MODULE.findall(text):
        if dotted.endswith((".py", ".md", ".json", ".yaml", ".pth")):
            continue
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            stale.append(dotted)
    return stale


def test_the_stale_reference_check_can_fail():
    assert stale_references("see `hadapeft/_peft_integration.py`, `hadapeft.foo.bar` and `python -m scripts.nope`"
                            ) == ["hadapeft/_peft_integration.py", "hadapeft.foo.bar", "scripts.nope"]
    assert stale_references("`recipes/{sft,nope}.py`, `recipes/configs/*_smoke.yaml`, `hadapeft.core.targets.ATTENTION`"
                            ) == ["recipes/nope.py"]


@pytest.mark.parametrize("path", CHECKED, ids=_page)
def test_no_page_names_a_module_that_does_not_exist(path):
    pytest.importorskip("trl", reason="hadapeft.SFTTrainer resolves through trl")
    assert stale_references(path.read_text()) == []
