"""Crash-consistent saving: a save into a folder is all-or-nothing, even after SIGKILL or power loss, and under
concurrent savers (processes or threads) each save lands whole or is replaced whole by a later one.

File-safety code with no peft in it; ``hadapeft.seam`` routes ``PeftModel.save_pretrained`` of hadapeft adapters
through :func:`atomic_save`, and loads through :func:`reading` (which first finishes an interrupted save).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Callable, Iterable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; each save is still crash-consistent, concurrent savers are not
    fcntl = None

STAGE_PREFIX = ".hadapeft-tmp-"
COMMIT_NAME = ".hadapeft-commit"
# The weight files peft writes, in the order its loader prefers them: a stale file of the other format must not be
# left next to a new one (a stale adapter_model.safetensors would be loaded instead of a new adapter_model.bin).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


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


class _Flock:
    """An advisory ``flock`` on a directory itself (no lock file is left in the user's folder). The kernel drops it
    when its holder dies, so a killed saver never leaves a folder locked. Locks of two open() calls conflict even
    within one process, so threads are covered too. A no-op where the platform or file system has no flock."""

    def __init__(self, path: str):
        self.fd = None
        if fcntl is None:
            return
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            self.fd = None

    def acquire(self, exclusive: bool, blocking: bool = True) -> bool:
        """Take the lock; False when ``blocking`` is False and someone else holds it."""
        if self.fd is None:
            return True
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.fd, flags)
        except BlockingIOError:
            return False
        except OSError:  # no flock on this file system (some network mounts): carry on unlocked
            pass
        return True

    def close(self) -> None:  # releases the lock
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _locked(path: str, exclusive: bool):
    lock = _Flock(path)
    try:
        lock.acquire(exclusive)
        yield
    finally:
        lock.close()


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


def _roll_forward(save_directory: str) -> bool:
    """Finish an interrupted commit: move what is left in ``.hadapeft-commit`` into place. Idempotent and safe to run
    again after a crash in the middle of it; the caller holds the folder's exclusive lock. Returns whether there was
    anything to finish."""
    commit = os.path.join(save_directory, COMMIT_NAME)
    if not os.path.isdir(commit):
        return False
    files = []
    for dirpath, _, filenames in os.walk(commit):
        rel_dir = os.path.relpath(dirpath, commit)
        files += [os.path.normpath(os.path.join(rel_dir, n)) for n in filenames]
    # Weights before config within each folder, the model card last: a reader that does not recover sees the new
    # config only once the new weights are in place.
    order = {**{w: 0 for w in WEIGHT_FILES}, "adapter_config.json": 1, "README.md": 2}
    files.sort(key=lambda f: (os.path.basename(f) == "README.md", os.path.dirname(f),
                              order.get(os.path.basename(f), 1)))
    touched = set()
    for rel in files:
        src, dst = os.path.join(commit, rel), os.path.join(save_directory, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(dst):  # a folder where a file goes: not ours to delete
            raise OSError(f"cannot save {dst}: a directory is in the way")
        if os.path.basename(rel) in WEIGHT_FILES:
            # The other format goes first (a crash right after leaves no weights and the commit still holding the
            # new ones, which the next recovery moves in): the folder then loads what was saved, not a stale file.
            for other in WEIGHT_FILES:
                stale = os.path.join(os.path.dirname(dst), other)
                if other != os.path.basename(rel) and os.path.isfile(stale):
                    os.remove(stale)
        os.replace(src, dst)
        touched.add(os.path.dirname(dst))
    for d in touched:
        _fsync_path(d, directory=True)
    shutil.rmtree(commit)
    _fsync_path(save_directory, directory=True)
    return True


def _remove_abandoned_stages(save_directory: str) -> None:
    """Delete staging folders whose saver is gone. A saver holds an exclusive lock on its staging folder until it has
    committed it, so a folder whose lock can be taken is abandoned (no pid check: pids are reused, and threads of
    one process share one). The caller holds the folder's exclusive lock, under which savers also create their
    staging folder and lock it: no folder is seen between its creation and its locking."""
    for name in os.listdir(save_directory):
        if not name.startswith(STAGE_PREFIX):
            continue
        path = os.path.join(save_directory, name)
        lock = _Flock(path)
        try:
            if fcntl is None:  # no locks: fall back on the pid in the name
                try:
                    abandoned = not _pid_alive(int(name[len(STAGE_PREFIX):].split("-")[0]))
                except ValueError:
                    continue
            else:
                abandoned = lock.fd is not None and lock.acquire(exclusive=True, blocking=False)
            if abandoned:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.close()


def recover_interrupted_save(save_directory: str) -> None:
    """Bring ``save_directory`` to a consistent state after a save that was killed: complete a committed save
    (roll forward) and delete staging folders of savers that are gone. Called before each save and each load."""
    if not os.path.isdir(save_directory):
        return
    with _locked(save_directory, exclusive=True):
        _roll_forward(save_directory)
        _remove_abandoned_stages(save_directory)


@contextlib.contextmanager
def reading(folders: Iterable[str]):
    """Around a load from local ``folders`` (an adapter folder and the save folder above it): finish interrupted saves
    there, then hold a shared lock on each so that no concurrent save is applied while the files are read (a reader
    would otherwise see new weights with an old config)."""
    folders = sorted({os.path.normpath(f) for f in folders if os.path.isdir(f)})  # one order: no lock cycles
    for folder in folders:
        if os.path.isdir(os.path.join(folder, COMMIT_NAME)):
            with _locked(folder, exclusive=True):
                _roll_forward(folder)
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(_locked(folder, exclusive=False))
        yield


def atomic_save(save_directory, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` (peft's ``save_pretrained``, then a check of what it wrote) crash-consistently into
    ``save_directory``: after a crash (SIGKILL, power loss) at any moment, a load finds either the complete previous
    adapter(s) or the complete new one(s), never a mix or a truncated file; with several savers at once, the folder
    always holds exactly one of their saves, and a save that has returned is only ever replaced by a later one.

    Scheme (a redo log made of one directory rename):

    1. **stage** — ``write`` saves everything into a fresh ``save_directory/.hadapeft-tmp-<pid>-<rand>/`` (the
       existing ``README.md`` is copied in first, so that peft updates the user's model card as it would in place).
       Every file and folder in it is fsync'd. The saver holds a lock on its staging folder; a crash here leaves the
       old files untouched, and the next save or load deletes staging folders nobody holds.
    2. **commit** — under an exclusive lock on ``save_directory`` (so savers commit one at a time, and none can touch
       another's commit), the staging folder is renamed to ``save_directory/.hadapeft-commit`` (one atomic rename,
       then an fsync of ``save_directory``). From this instant the new save is durable and will be completed.
    3. **apply** — still under the lock, each staged file is moved over its target with ``os.replace`` (atomic per
       file; weights before config before model card; a weight file of the other format, which peft's loader might
       pick instead, is removed first), then the commit folder is removed. Only the files peft writes are replaced:
       other files the user keeps in ``save_directory`` or the adapter sub-folders stay.

    A crash during *apply* leaves ``.hadapeft-commit`` behind; the moves are finished at the start of every save and
    (by :func:`reading`) before every ``PeftModel.from_pretrained`` / ``load_adapter`` /
    ``AutoPeftModel*.from_pretrained`` of a local folder, so those always see the complete new adapter; they also
    hold a shared lock while they read. (A reader that bypasses hadapeft, e.g. a bare
    ``transformers`` ``load_adapter``, may see a save half applied.) The locks are ``flock`` locks: where the
    platform or file system has none (Windows, some network mounts), each save stays crash-consistent but concurrent
    savers are not serialized.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    os.makedirs(save_directory, exist_ok=True)
    stage = os.path.join(save_directory, f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
    with _locked(save_directory, exclusive=True):
        _roll_forward(save_directory)
        _remove_abandoned_stages(save_directory)
        os.makedirs(stage)
        ownership = _Flock(stage)  # held until the stage is committed: tells other savers it is not abandoned
        ownership.acquire(exclusive=True)
    try:
        card = os.path.join(save_directory, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(stage, "README.md"))
        write(stage)
        _fsync_tree(stage)
        # Commit and apply under the folder's exclusive lock: one save at a time moves files in, and the commit
        # folder only ever holds the save of the lock's holder (a leftover of a killed saver is finished first).
        with _locked(save_directory, exclusive=True):
            _roll_forward(save_directory)
            os.rename(stage, os.path.join(save_directory, COMMIT_NAME))
            _fsync_path(save_directory, directory=True)
            _roll_forward(save_directory)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        ownership.close()
