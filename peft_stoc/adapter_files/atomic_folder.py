"""Replacing an adapter folder atomically: a crash at any moment leaves the old adapter or the new one.

`staged_folder` yields a fresh folder beside the target (in the parent of its resolved absolute path, whatever the
target is: the working directory too) to save into, then swaps it in whole by one atomic exchange. Where a folder
cannot be exchanged (a mount point; a system or file system without `renameat2`'s exchange), the complete new
files are staged inside the target, committed there by one rename (`.stoc-commit-*`) and moved in, each adapter
folder's config first. `recover`, which every load reaches (PEFT's `from_pretrained` through `load_adapter`,
`AutoPeftModel*`, the command line, the next save), settles what a killed save left: an adapter folder whose config
was moved in gets the rest of its new files, one whose config was not keeps its old adapter. So a folder never lacks
its config, and a config never pairs with the weights of another save once anything reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import secrets
import shutil
import socket
import stat
import sys

WEIGHTS_NAME = "adapter_model.safetensors"  # moved in last: a folder with the new weights is complete
CONFIG_NAME = "adapter_config.json"  # moved in first: from then on the folder is the new adapter
STAGE_TAG = ".stoc-stage-"
COMMIT_TAG = ".stoc-commit-"  # a complete staged replacement inside the target: recovery moves it in
PROBE_TAG = ".stoc-probe-"  # two empty folders that tell whether a file system can exchange folders
OLD_TAG = ".stoc-old-"  # left beside the target by versions that swapped by two renames
MAX_CARRIED = 10_000  # other entries linked into a new folder; beyond this, files are replaced one by one
_MAX_TAGGED_NAME = 200  # longer folder names are hashed in the names of their stages (file names stop at 255 bytes)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike):
    """Yield an empty folder to save an adapter into; on success it takes the place of `target`.

    `target` holds its old adapter or the new one at every moment: the new folder is written beside it and synced,
    receives hard links to everything else `target` holds (a tokenizer, a checkpoint's optimizer state) and is
    swapped in by one atomic exchange. A process whose working directory was inside `target` follows it into the
    new folder. Where no exchange is possible the replacement is committed inside `target` and moved in (see the
    module's docstring).
    """
    target = os.path.realpath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target} is a file, not a folder.")
    recover(target)
    stage, swap = _make_stage(target)
    try:
        copy_regular_file(os.path.join(target, "README.md"), os.path.join(stage, "README.md"))  # edits are kept
        yield stage
        _sync_tree(stage)
        if swap:
            _swap_in(stage, target)
        else:
            _commit_in_place(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def copy_regular_file(source: str, destination: str) -> bool:
    """Copy `source` if it is a regular file, never through a symbolic link (a README linked to a file elsewhere
    would copy that file into the model card); False when there is nothing to copy."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # missing, or a symbolic link
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return False
        with open(destination, "wb") as out:
            shutil.copyfileobj(handle, out)
    return True


def _tag(base: str) -> str:
    """The folder's name as its stages beside it carry it (hashed when too long to carry whole)."""
    if len(os.fsencode(base)) <= _MAX_TAGGED_NAME:
        return base
    return "h" + hashlib.sha256(os.fsencode(base)).hexdigest()[:32]


def recover(target: str, tidy: bool = True) -> None:
    """Finish or undo what a crash during `staged_folder` left: a committed replacement inside the target is moved
    in; an old folder moved away whole comes back if the new one never arrived; with `tidy`, stages of saves whose
    process is gone are removed."""
    target = os.path.realpath(target)
    parent, base = os.path.split(target)
    tag = _tag(base)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(f".{tag}{OLD_TAG}") and not os.path.lexists(target):
            os.rename(path, target)  # it was renamed away whole: a complete adapter
        elif tidy and name.startswith((f".{tag}{OLD_TAG}", f".{tag}{STAGE_TAG}", PROBE_TAG)) and not _alive(name):
            shutil.rmtree(path, ignore_errors=True)
    if not os.path.isdir(target) or os.path.islink(target):
        return
    for name in sorted(os.listdir(target)):
        path = os.path.join(target, name)
        if name.startswith(COMMIT_TAG) and not _alive(name):
            _move_in(path, target, recovering=True)
        elif tidy and name.startswith(STAGE_TAG) and not _alive(name):
            shutil.rmtree(path, ignore_errors=True)


def recover_for_reading(path: str | os.PathLike) -> None:
    """Before an adapter folder is read: put back the folder (or the save folder holding it) if an interrupted save
    left it moved away, and finish a committed replacement in it or in the save folder above it (adapters other than
    'default' are saved in subfolders of one save)."""
    wanted = path = os.path.realpath(os.fspath(path))
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for folder in [*reversed(missing), os.path.dirname(wanted), wanted]:  # outer first: inner ones come with them
        recover(folder, tidy=False)


def _host() -> str:
    """This machine, as a leftover's name records it (a shared file system is seen from several machines)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    """What a stage, commit or probe is named after: this process, a random part, this machine."""
    return f"{os.getpid()}-{secrets.token_hex(4)}-{_host()}"


def _alive(name: str) -> bool:
    """Whether the process that made the leftover `name` (its pid, and its machine, follow the tag) may still run.
    A process of another machine cannot be looked up from here: its leftovers count as alive (that machine's next
    save or load settles them)."""
    try:
        parts = name.rsplit(".stoc-", 1)[1].split("-")
        pid = int(parts[1])
    except (IndexError, ValueError):
        return True
    if len(parts) > 3 and parts[3] != _host():
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
    """A new empty folder beside `target` (True: to be swapped in) or, where `target` cannot be exchanged, inside it
    (False: to be committed there)."""
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if _can_swap(target):
        stage = os.path.join(parent, f".{_tag(base)}{STAGE_TAG}{_owner()}")
        try:
            os.mkdir(stage)
        except OSError:
            pass  # a parent we cannot write to
        else:
            if os.path.isdir(target):
                os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode))  # the folder keeps its permissions
            return stage, True
    os.makedirs(target, exist_ok=True)
    stage = os.path.join(target, f"{STAGE_TAG}{_owner()}")
    os.mkdir(stage)
    return stage, False


def _can_swap(target: str) -> bool:
    """A new folder can take `target`'s place in one step: `target` does not exist yet (one rename), or it can be
    exchanged with a folder beside it."""
    if not os.path.exists(target):
        return True
    return not os.path.ismount(target) and _exchange_works(os.path.dirname(target))


def _exchange_works(parent: str) -> bool:
    """Whether two folders in `parent` can be exchanged atomically, tried on two empty folders (once per device)."""
    try:
        device = os.stat(parent).st_dev
    except OSError:
        return False
    if device not in _EXCHANGE_WORKS:
        probe = os.path.join(parent, f"{PROBE_TAG}{_owner()}")
        first, second = probe + "-1", probe + "-2"
        try:
            os.mkdir(first)
            os.mkdir(second)
            _EXCHANGE_WORKS[device] = _exchange(first, second)
        except OSError:
            return False  # a parent we cannot write to: not recorded, another folder may do
        finally:
            for folder in (first, second):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
    return _EXCHANGE_WORKS[device]


_EXCHANGE_WORKS: dict[int, bool] = {}


def _swap_in(stage: str, target: str) -> None:
    parent = os.path.dirname(target)
    if not os.path.exists(target):
        os.rename(stage, target)
        _sync_dir(parent)
        return
    if not _carry(target, stage):
        _commit_in_place(stage, target)
        return
    _sync_tree(stage, files=False)
    cwd = _working_directory()
    if not _exchange(stage, target):
        _commit_in_place(stage, target)  # the exchange stopped working since it was tried
        return
    _sync_dir(parent)  # `stage` now names the old folder, which the caller removes
    if cwd is not None and (cwd == target or cwd.startswith(target + os.sep)):
        # The working directory moved along with the old folder: continue at the same path in the new one.
        os.chdir(cwd if os.path.isdir(cwd) else target)


def _working_directory() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def _commit_in_place(stage: str, target: str) -> None:
    """Commit the complete new files of `stage` inside `target` by one rename, then move them in (`_move_in`); a
    crash after the rename is finished by `recover`."""
    _refuse_links_on_the_way(stage, target)
    commit = os.path.join(target, f"{COMMIT_TAG}{_owner()}")
    os.rename(stage, commit)
    _sync_dir(target)
    _move_in(commit, target)


def _refuse_links_on_the_way(stage: str, target: str) -> None:
    """Files are moved into `target` by their paths: a symbolic link among the folders on the way would send them
    elsewhere (outside the folder). Refused before anything changes."""
    for folder, _, _ in os.walk(stage):
        relative = os.path.relpath(folder, stage)
        if relative == os.curdir:
            continue
        path = target
        for part in relative.split(os.sep):
            path = os.path.join(path, part)
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                raise ValueError(
                    f"{path} is a symbolic link or a file where the adapter needs a folder; refusing to save through "
                    "it. Remove it or save into another folder."
                )


def _move_in(commit: str, target: str, recovering: bool = False) -> None:
    """Move the files of the committed replacement `commit` to their places in `target`, folder by folder: each
    adapter folder's config first (from then on that folder is the new adapter), its weights last. Then remove
    `commit`.

    `recovering` (the writer was killed): a folder whose config was moved already has its remaining files moved in;
    one whose config was not keeps its old adapter, whose config a reader may have read already (PEFT reads it
    before any StocTuning code runs), so every adapter folder ends as the old adapter or the new one, whole."""
    for folder, _, files in os.walk(commit):  # top-down: the save folder before the adapters in its subfolders
        if recovering and CONFIG_NAME in files:
            continue  # nothing of this folder was moved in yet: the old adapter stays
        destination = os.path.normpath(os.path.join(target, os.path.relpath(folder, commit)))
        os.makedirs(destination, exist_ok=True)
        for name in sorted(files, key=lambda f: (f != CONFIG_NAME, f == WEIGHTS_NAME)):
            with contextlib.suppress(FileNotFoundError):  # moved already
                os.replace(os.path.join(folder, name), os.path.join(destination, name))
        _sync_dir(destination)
    shutil.rmtree(commit, ignore_errors=True)
    _sync_dir(target)


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
        if entry.name.startswith((STAGE_TAG, COMMIT_TAG)) or (
            entry.name.startswith(".adapter-") and entry.name.endswith(".tmp")
        ):
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
