"""Crash-consistent saving: a save into a folder is all-or-nothing, even after SIGKILL or power loss.

File-safety code with no peft in it; ``hadapeft.seam`` routes ``PeftModel.save_pretrained`` of hadapeft adapters
through :func:`atomic_save`, and runs :func:`recover_interrupted_save` before loads.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Callable

STAGE_PREFIX = ".hadapeft-tmp-"
COMMIT_NAME = ".hadapeft-commit"


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # directories cannot be opened on Windows; nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath, directory=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM), or no way to tell: keep its folder
        return True
    return True


def roll_forward(save_directory: str) -> bool:
    """Finish an interrupted commit: move what is left in ``.hadapeft-commit`` into place. Idempotent and safe to run
    again after a crash in the middle of it. Returns whether there was anything to finish."""
    commit = os.path.join(save_directory, COMMIT_NAME)
    if not os.path.isdir(commit):
        return False
    files = []
    for dirpath, _, filenames in os.walk(commit):
        rel_dir = os.path.relpath(dirpath, commit)
        files += [os.path.normpath(os.path.join(rel_dir, n)) for n in filenames]
    # Weights before config within each folder, the model card last: a reader that does not recover sees the new
    # config only once the new weights are in place.
    order = {"adapter_model.safetensors": 0, "adapter_model.bin": 0, "adapter_config.json": 1, "README.md": 2}
    files.sort(key=lambda f: (os.path.basename(f) == "README.md", os.path.dirname(f),
                              order.get(os.path.basename(f), 1)))
    touched = set()
    for rel in files:
        src, dst = os.path.join(commit, rel), os.path.join(save_directory, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(dst):  # a folder where a file goes: not ours to delete
            raise OSError(f"cannot save {dst}: a directory is in the way")
        try:
            os.replace(src, dst)
        except FileNotFoundError:  # moved by a concurrent recovery
            continue
        touched.add(os.path.dirname(dst))
    for d in touched:
        _fsync_path(d, directory=True)
    shutil.rmtree(commit, ignore_errors=True)
    _fsync_path(save_directory, directory=True)
    return True


def recover_interrupted_save(save_directory: str) -> None:
    """Bring ``save_directory`` to a consistent state after a save that was killed: complete a committed save
    (roll forward) and delete staging folders of processes that are gone. Called before each save and each load."""
    if not os.path.isdir(save_directory):
        return
    roll_forward(save_directory)
    for name in os.listdir(save_directory):
        if not name.startswith(STAGE_PREFIX):
            continue
        try:
            pid = int(name[len(STAGE_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid) or name.startswith(f"{STAGE_PREFIX}{os.getpid()}-"):
            shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)


def atomic_save(save_directory, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` (peft's ``save_pretrained``) crash-consistently into ``save_directory``: after a crash (SIGKILL, power loss) at any moment, a load finds
    either the complete previous adapter(s) or the complete new one(s), never a mix or a truncated file.

    Scheme (a redo log made of one directory rename):

    1. **stage** — peft saves everything into a fresh ``save_directory/.hadapeft-tmp-<pid>-<rand>/`` (the existing
       ``README.md`` is copied in first, so that peft updates the user's model card as it would in place). Every
       file and folder in it is fsync'd. A crash here leaves the old files untouched; the staging folder is deleted
       by the next save or load (its pid is dead).
    2. **commit** — the staging folder is renamed to ``save_directory/.hadapeft-commit`` (one atomic rename, then an
       fsync of ``save_directory``). From this instant the new save is durable and will be completed.
    3. **apply** — each staged file is moved over its target with ``os.replace`` (atomic per file; weights before
       config before model card), then the commit folder is removed. Only the files peft writes are replaced:
       other files the user keeps in ``save_directory`` or the adapter sub-folders stay.

    A crash during *apply* leaves ``.hadapeft-commit`` behind; :func:`recover_interrupted_save` finishes the moves,
    and it runs at the start of every save and before every ``PeftModel.from_pretrained`` / ``load_adapter`` /
    ``AutoPeftModel*.from_pretrained`` of a local folder, so those always see the complete new adapter. (A reader
    that bypasses hadapeft, e.g. a bare ``transformers`` ``load_adapter`` in the crash window, may see it half
    applied until the next hadapeft save or load.)
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    os.makedirs(save_directory, exist_ok=True)
    recover_interrupted_save(save_directory)
    stage = os.path.join(save_directory, f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(stage)
    try:
        card = os.path.join(save_directory, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(stage, "README.md"))
        write(stage)
        _fsync_tree(stage)
        commit = os.path.join(save_directory, COMMIT_NAME)
        for _ in range(10):  # a concurrent saver may hold the commit slot: finish its save, then take it
            try:
                os.rename(stage, commit)
                break
            except OSError:
                if not roll_forward(save_directory):
                    raise
        else:
            raise OSError(f"could not commit the save into {save_directory}: another process keeps saving there")
        _fsync_path(save_directory, directory=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    roll_forward(save_directory)
