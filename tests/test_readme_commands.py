"""Every shell command in the bash blocks of recipes/README.md, the root README.md's "Recipes and scripts" section and
the documentation pages (docs/**.md; there only the lines starting with ``.venv/bin/``) runs as written, in order,
from the repository root. :func:`code_blocks` is also what tests/test_docs.py runs the pages' ```python blocks from.

Where they write: the commands' output folders are all under ``runs/readme/``, ``runs/quick/`` and ``runs/docs/``
(gitignored); the test removes those folders before and after, so nothing else of the checkout is touched.
``.venv/bin/...`` is the venv ``scripts/setup_env.sh`` creates; without one (a CI job with another interpreter), the
test links ``.venv`` to the running interpreter's environment for its duration.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = [REPO / "runs" / "readme", REPO / "runs" / "quick", REPO / "runs" / "docs"]
VENV = ".venv/bin/"


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced ```<lang> blocks of ``text``, in order (fences may be indented, e.g. in a list)."""
    return [textwrap.dedent(body) for body in re.findall(rf"^[ \t]*```{lang}\n(.*?)^[ \t]*```", text,
                                                         flags=re.S | re.M)]


def bash_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of ``text`` (a trailing backslash continues a line)."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def doc_pages() -> list[Path]:
    """The Markdown pages of the documentation site (docs/, without docs/ci/)."""
    return sorted(p for p in (REPO / "docs").rglob("*.md") if "ci" not in p.relative_to(REPO / "docs").parts[:1])


def readme_commands() -> list[str]:
    root = (REPO / "README.md").read_text()
    section = root[root.index("## Recipes and scripts"):]
    section = section[:section.index("\n## ", 3)]
    docs = [c for page in doc_pages() for c in bash_commands(page.read_text()) if c.startswith(VENV)]
    return bash_commands((REPO / "recipes" / "README.md").read_text()) + bash_commands(section) + docs


def test_the_readmes_have_commands():
    commands = readme_commands()
    assert len(commands) >= 10 and all(c.startswith(VENV) for c in commands), commands
    dirs = [c.split("--output_dir ")[1].split()[0] for c in commands if "--output_dir" in c]
    assert len(dirs) == len(set(dirs)), "each training example writes its own output_dir"


@pytest.mark.slow
def test_readme_commands_run_as_written():
    pytest.importorskip("trl", reason="needs trl (the test extra)")
    venv = REPO / ".venv"
    linked = False
    if not (venv / "bin" / "python").exists():
        if venv.exists() or venv.is_symlink():
            pytest.skip(".venv exists but has no bin/python")
        venv.symlink_to(Path(sys.prefix), target_is_directory=True)  # the running interpreter's environment
        linked = True
    for out in OUTPUTS:
        shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # as a new user runs them: the checkout's packages come from the current folder
    try:
        for command in readme_commands():
            proc = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    finally:
        for out in OUTPUTS:
            shutil.rmtree(out, ignore_errors=True)
        if linked:
            venv.unlink()
