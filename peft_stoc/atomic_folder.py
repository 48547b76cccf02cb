"""Replacing an adapter folder atomically: a crash at any moment leaves the old adapter or the new one.

`staged_folder` yields a fresh folder beside the target to save into, then swaps it in by one rename (or, where a
folder cannot be swapped, renames the files in one by one, the weights last). `recover` undoes what a crash left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
import sys

WEIGHTS_NAME = "adapter_model.safetensors"  # renamed in last: a folder with the new weights is complete
STAGE_TAG = ".stoc-stage-"
OLD_TAG = ".stoc-old-"
MAX_CARRIED = 10_000  # other entries linked into a new folder; beyond this, files are replaced one by one


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike):
    """Yield an empty folder to save an adapter into; on success it takes the place of `target`.

    `target` holds its old adapter or the new one at every moment: the new folder is written beside it and synced,
    receives hard links to everything else `target` holds (a tokenizer, a checkpoint's optimizer state) and is
    swapped in by one rename. Where a folder cannot be swapped (a mount point, the working directory, a parent we
    cannot write to), the files are renamed in one by one, the weights last.
    """
    target = os.path.realpath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target} is a file, not a folder.")
    recover(target)
    stage, swap = _make_stage(target)
    try:
        readme = os.path.join(target, "README.md")
        if os.path.isfile(readme):
            shutil.copyfile(readme, os.path.join(stage, "README.md"))  # the writers update a card, keeping edits
        yield stage
        _sync_tree(stage)
        if swap:
            _swap_in(stage, target)
        else:
            _replace_files(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def recover(target: str, tidy: bool = True) -> None:
    """Undo what a crash during `staged_folder` left: the old folder goes back if it was moved away and the new one
    never arrived; with `tidy`, leftovers of saves whose process is gone are removed."""
    target = os.path.realpath(target)
    parent, base = os.path.split(target)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(f".{base}{OLD_TAG}") and not os.path.lexists(target):
            os.rename(path, target)  # it was renamed away whole: a complete adapter
        elif tidy and name.startswith((f".{base}{OLD_TAG}", f".{base}{STAGE_TAG}")) and not _alive(name):
            shutil.rmtree(path, ignore_errors=True)
    if tidy and os.path.isdir(target):
        for name in os.listdir(target):
            if name.startswith(STAGE_TAG) and not _alive(name):
                shutil.rmtree(os.path.join(target, name), ignore_errors=True)


def _alive(name: str) -> bool:
    """Whether the process that made the leftover `name` (its pid follows the tag) still runs."""
    try:
        pid = int(name.rsplit(".stoc-", 1)[1].split("-")[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True  # os.kill would terminate it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _make_stage(target: str) -> tuple[str, bool]:
    """A new empty folder beside `target` (True: to be swapped in) or, failing that, inside it (False)."""
    parent, base = os.path.split(target)
    if _can_swap(target):
        try:
            os.makedirs(parent, exist_ok=True)
            stage = os.path.join(parent, f".{base}{STAGE_TAG}{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(stage)
        except OSError:
            pass
        else:
            if os.path.isdir(target):
                os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode))  # the folder keeps its permissions
            return stage, True
    os.makedirs(target, exist_ok=True)
    stage = os.path.join(target, f"{STAGE_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(stage)
    return stage, False


def _can_swap(target: str) -> bool:
    if len(os.path.basename(target)) > 200:
        return False  # no room for the stage's longer name
    if not os.path.exists(target):
        return True
    cwd = os.path.realpath(os.getcwd())
    # A process's working directory follows the folder it is in: it would end up in the removed old folder.
    return not os.path.ismount(target) and cwd != target and not cwd.startswith(target + os.sep)


def _swap_in(stage: str, target: str) -> None:
    parent, base = os.path.split(target)
    if not os.path.exists(target):
        os.rename(stage, target)
        _sync_dir(parent)
        return
    if not _carry(target, stage):
        _replace_files(stage, target)
        return
    _sync_tree(stage, files=False)
    if _exchange(stage, target):
        _sync_dir(parent)  # `stage` now names the old folder, which the caller removes
        return
    old = os.path.join(parent, f".{base}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    os.rename(stage, target)  # a crash between these two renames is undone by `recover`
    _sync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux `renameat2` with RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # an old kernel or a file system without it
    raise OSError(error, os.strerror(error), second)


def _carry(source: str, stage: str) -> bool:
    """Link into `stage` every entry of `source` that `stage` lacks (recursively); False, doing nothing, when there
    are too many or some cannot be carried (sockets, pipes)."""
    plan: list[tuple[str, str, bool]] = []
    if not _plan_carry(source, stage, plan):
        return False
    for src, dst, is_dir in plan:
        if is_dir:
            os.mkdir(dst)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)  # a file system without hard links
    for src, dst, is_dir in reversed(plan):
        if is_dir:
            shutil.copystat(src, dst)
    return True


def _plan_carry(source: str, stage: str, plan: list) -> bool:
    for entry in os.scandir(source):
        if entry.name.startswith(STAGE_TAG) or (entry.name.startswith(".adapter-") and entry.name.endswith(".tmp")):
            continue  # leftovers of interrupted saves
        dst = os.path.join(stage, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(dst):
                plan.append((entry.path, dst, True))
            elif not os.path.isdir(dst) or os.path.islink(dst):
                continue  # the new save has a file of that name
            if not _plan_carry(entry.path, dst, plan):
                return False
        elif not os.path.lexists(dst):
            if not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                return False
            plan.append((entry.path, dst, False))
        if len(plan) > MAX_CARRIED:
            return False
    return True


def _replace_files(stage: str, target: str) -> None:
    """Rename the staged files into `target` one by one, each atomically; the weights files go last, so a folder
    whose config does not change holds a complete adapter throughout."""
    moves = []
    for folder, _, files in os.walk(stage):
        relative = os.path.relpath(folder, stage)
        moves += [(os.path.join(folder, f), os.path.normpath(os.path.join(target, relative, f))) for f in files]
    moves.sort(key=lambda move: os.path.basename(move[0]) == WEIGHTS_NAME)
    for src, dst in moves:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    for folder in sorted({os.path.dirname(dst) for _, dst in moves}):
        _sync_dir(folder)


def _sync_tree(root: str, files: bool = True) -> None:
    """Flush `root`'s files (optionally) and folders to disk, so a rename never publishes unwritten data."""
    for folder, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    fsync(path)
        _sync_dir(folder)


def _sync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # platforms that cannot sync a folder
    finally:
        os.close(fd)


def fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
