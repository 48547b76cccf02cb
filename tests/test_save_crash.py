"""A save killed at any moment leaves the folder holding the old adapter or the new one, never neither."""

from __future__ import annotations

import copy
import os
import random
import shutil
import signal
import stat
import sys
import time

import pytest
import torch
from peft import PeftModel

from peft_stoc.adapter_files import adapter_file, atomic_folder

from .helpers import predict, tiny_model, train_stoc

# Forks savers and kills them; fork is safe for these small CPU saves on Linux only.
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills forked savers")

FOREIGN = {"tokenizer.json": "{}", "notes/run.txt": "kept"}  # files of the user's in the adapter folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapters of one base, loaded for inference: A; B with another config (candidates, k); C with A's config."""
    root = tmp_path_factory.mktemp("crash")
    train_stoc(k=30, seed=1, target_modules=["query"]).save_pretrained(root / "a")
    train_stoc(k=50, seed=2, target_modules=["value", "dense"]).save_pretrained(root / "b")
    train_stoc(k=30, seed=3, target_modules=["query"], steps=4).save_pretrained(root / "c")
    base = tiny_model()
    models = {name: PeftModel.from_pretrained(copy.deepcopy(base), root / name) for name in "abc"}
    expected = {name: (predict(m), m.base_model.adapter_delta("default")) for name, m in models.items()}
    return root, base, models, expected


def _fresh_folder(root, models, mode="exchange"):
    folder = _target(root, mode)
    shutil.rmtree(folder, ignore_errors=True)
    models["a"].save_pretrained(folder)
    for relative, text in FOREIGN.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


def _same_delta(first, second) -> bool:
    return first.tensors.keys() == second.tensors.keys() and all(
        all(torch.equal(x, y) for x, y in zip(first.tensors[n], second.tensors[n])) for n in first.tensors
    )


def _which(folder, base, expected, models=None) -> str:
    """The adapter ('a', 'b' or 'c') the folder loads as through PEFT's own `PeftModel.from_pretrained`, its logits
    and delta both matching (with `models`, a StocTuning model's `load_adapter` reads it first: legacy leftovers)."""
    if models is not None and not folder.exists():
        models["c"].load_adapter(folder, adapter_name="probe")
        models["c"].delete_adapter("probe")
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    logits, delta = predict(model), model.base_model.adapter_delta("default")
    for name, (want_logits, want_delta) in expected.items():
        if torch.equal(logits, want_logits) and _same_delta(delta, want_delta):
            return name
    raise AssertionError("the folder loads, but as neither the old adapter nor the new one")


def _check_nothing_outside(root, folder):
    """A save writes only into its folder and its own stages beside it."""
    assert {p.name for p in root.iterdir() if ".stoc-" not in p.name} <= {"a", "b", "c", "target", LONG}


def _check_foreign(folder):
    for relative, text in FOREIGN.items():
        assert (folder / relative).read_text() == text, relative


def _without_exchange():
    """A system or file system without an atomic folder exchange (no renameat2: macOS, some file systems)."""
    atomic_folder._exchange = lambda first, second: False
    atomic_folder._EXCHANGE_WORKS.clear()


def _in_place():
    """A target that cannot be swapped (a mount point)."""
    atomic_folder._can_swap = lambda target: False


MODES = {
    "exchange": lambda: None,
    "rename": _without_exchange,
    "in_place": _in_place,
    "working_directory": lambda: None,
    "long_name": lambda: None,
}
# What a save replaces A with: B, whose config differs (other candidates and k), in every mode.
NEW = dict.fromkeys(MODES, "b")
LONG = "x" * 230  # a folder name with no room for a stage name built from it


def _target(root, mode):
    return root / (LONG if mode == "long_name" else "target")


def _saver(models, folder, pipe, mode, kill_at=None):
    """In a forked child: save the new adapter, A, the new one, ... over `folder` (which holds A) until killed,
    logging b(egin)/e(nd) of each save to `pipe`. In mode "working_directory" the child works inside `folder` and
    saves to "."."""
    try:
        torch.set_num_threads(1)
        MODES[mode]()
        if mode == "working_directory":
            os.chdir(folder)
            folder = "."
        if kill_at is not None:
            _kill_at_call(kill_at)
        os.write(pipe, b"s")
        for i in range(10**6):
            os.write(pipe, b"b")
            models[(NEW[mode], "a")[i % 2]].save_pretrained(folder)
            os.write(pipe, b"e")
    finally:
        os._exit(0)


def _kill_at_call(number: int) -> None:
    """SIGKILL this process just before its `number`-th file-system step of a save (rename, replace, link, fsync,
    folder swap or removal), so that every boundary between two steps gets a crash."""
    calls = [0]

    def counted(function):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapper

    for module, name in (
        (os, "rename"),
        (os, "replace"),
        (os, "link"),
        (os, "fsync"),
        (os, "mkdir"),
        (shutil, "rmtree"),
        (atomic_folder, "_exchange"),
        (adapter_file, "save_file"),
    ):
        setattr(module, name, counted(getattr(module, name)))


def _run_and_kill(models, folder, mode, delay=None, kill_at=None) -> str:
    """Fork a saver, kill it after `delay` seconds (or let it kill itself), return what it logged."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _saver(models, folder, write_end, mode, kill_at)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"s"
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        log = b""
        while chunk := os.read(read_end, 65536):
            log += chunk
    finally:
        os.close(read_end)
    return log.decode()


def _save_seconds(models, tmp_path) -> float:
    models["b"].save_pretrained(tmp_path / "warm")
    start = time.perf_counter()
    for _ in range(5):
        models["b"].save_pretrained(tmp_path / "warm")
    return (time.perf_counter() - start) / 5


def _leftovers_of(folder) -> list[str]:
    """Stages beside `folder` named after it (other folders of the module's root keep theirs until their next save)."""
    return [p for p in os.listdir(folder.parent) if p.startswith(f".{folder.name}.stoc-")]


def _skip_without_exchange(mode):
    if mode in ("exchange", "working_directory", "long_name") and not atomic_folder._renameat2():
        pytest.skip("no renameat2 here")


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_at_random_moments_during_save_keeps_a_loadable_adapter(adapters, tmp_path, mode):
    """30 SIGKILLs at seeded random moments of saves over an existing adapter: the folder always loads as the old
    adapter or the new one, with the user's other files in it."""
    _skip_without_exchange(mode)
    root, base, models, expected = adapters
    rng = random.Random(12)
    seconds = _save_seconds(models, tmp_path)
    folder = _fresh_folder(root, models, mode)
    seen, mid_save = {"a": 0, NEW[mode]: 0}, 0
    for _ in range(30):
        log = _run_and_kill(models, folder, mode, delay=rng.uniform(0, 3 * seconds))
        mid_save += log.count("b") > log.count("e")
        seen[_which(folder, base, expected)] += 1
        _check_foreign(folder)
        _check_nothing_outside(root, folder)
    print(
        f"{mode}: save {seconds * 1000:.1f} ms; 30 kills, {mid_save} inside a save; loaded as {seen}", file=sys.stderr
    )
    assert mid_save >= 20, "most kills should land inside a save"


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_before_each_file_step_of_a_save_keeps_a_loadable_adapter(adapters, mode):
    """A kill before every single file-system step of one save: the folder loads as the old or the new adapter
    each time, through PEFT's own `from_pretrained`. Saving into the working directory, into a folder that cannot
    be swapped (a mount point) or whose name leaves no room for a stage name, or without an atomic exchange, used to
    rename files in one by one (the new config with the old weights at 4 of 27 kill points) or to leave no folder
    for a moment ("Can't find adapter_config.json")."""
    _skip_without_exchange(mode)
    root, base, models, expected = adapters
    steps, results = 0, set()
    for number in range(1, 200):
        folder = _fresh_folder(root, models, mode)
        log = _run_and_kill(models, folder, mode, kill_at=number)
        results.add(_which(folder, base, expected))
        _check_foreign(folder)
        _check_nothing_outside(root, folder)
        if log.count("e") >= 1:
            break  # the first save completed before step `number`: every step has had its kill
        steps = number
    print(f"{mode}: a save has {steps} file-system steps, each killed once", file=sys.stderr)
    assert steps >= 5, "a save has several file-system steps"
    assert results == {"a", NEW[mode]}, results


def test_save_keeps_other_files_permissions_and_adapters_in_subfolders(adapters, tmp_path):
    root, base, models, expected = adapters
    folder = _fresh_folder(root, models)
    folder.chmod(0o750)
    tokenizer_inode = (folder / "tokenizer.json").stat().st_ino
    models["b"].save_pretrained(folder)
    assert _which(folder, base, expected) == "b"
    _check_foreign(folder)
    assert (folder / "tokenizer.json").stat().st_ino == tokenizer_inode, "carried over as a hard link, not copied"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert not _leftovers_of(folder), "no staging leftovers"
    # A second adapter saved alone goes to its subfolder and leaves the first one in place.
    model = models["a"]
    model.load_adapter(root / "b", adapter_name="other")
    model.save_pretrained(folder, selected_adapters=["other"])
    assert (folder / "other" / adapter_file.WEIGHTS_NAME).is_file()
    assert _which(folder, base, expected) == "b"
    model.delete_adapter("other")


def test_interrupted_swap_is_recovered_at_load(adapters):
    """Without an atomic exchange the old folder is renamed away first: a crash right then leaves no folder at the
    target; a StocTuning model's `load_adapter` (or the next save) puts the old one back."""
    root, base, models, expected = adapters
    folder = _fresh_folder(root, models)
    backup = folder.parent / f".{folder.name}{atomic_folder.OLD_TAG}999999999-dead"
    os.rename(folder, backup)
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(copy.deepcopy(base), folder)  # PEFT reads the config before StocTuning code runs
    assert _which(folder, base, expected, models) == "a"
    _check_foreign(folder)
    assert not backup.exists()


def test_failed_save_leaves_the_old_adapter(adapters):
    root, base, models, expected = adapters
    folder = _fresh_folder(root, models)
    model = models["b"]
    index, values = model.base_model.adapter_delta("default").tensors[next(iter(expected["b"][1].tensors))]
    saved = values[0].item()
    values[0] = float("nan")
    try:
        with pytest.raises(ValueError, match="NaN or infinite"):
            model.save_pretrained(folder)
    finally:
        values[0] = saved
    assert _which(folder, base, expected) == "a"
    assert not _leftovers_of(folder)


def test_a_readme_linked_to_a_file_elsewhere_is_not_copied_into_the_model_card(adapters, tmp_path):
    """The save kept the README's edits by copying it, following a symbolic link: the linked file (anything the
    user can read) ended up in the model card."""
    root, base, models, expected = adapters
    folder = _fresh_folder(root, models)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(secret)
    models["b"].save_pretrained(folder)
    assert not (folder / "README.md").is_symlink()
    assert "private key material" not in (folder / "README.md").read_text()
    assert secret.read_text() == "private key material"
    assert _which(folder, base, expected) == "b"


@pytest.mark.parametrize("mode", ["working_directory", "in_place"])
def test_a_linked_adapter_subfolder_is_never_written_through(adapters, tmp_path, mode, monkeypatch):
    """Saving into the working directory renamed files in one by one along their paths: a subfolder that was a
    symbolic link sent the second adapter's files outside the save folder."""
    root, base, models, expected = adapters
    folder = _fresh_folder(root, models)
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "other").symlink_to(outside, target_is_directory=True)
    model = models["a"]
    model.load_adapter(root / "b", adapter_name="other")
    try:
        if mode == "working_directory":
            monkeypatch.chdir(folder)
            model.save_pretrained(".")
            assert os.getcwd() == str(folder.resolve())  # the working directory follows the folder
            assert (folder / "other" / adapter_file.WEIGHTS_NAME).is_file() and not (folder / "other").is_symlink()
        else:
            monkeypatch.setattr(atomic_folder, "_can_swap", lambda target: False)
            with pytest.raises(ValueError, match="symbolic link"):
                model.save_pretrained(folder)
            assert (folder / "other").is_symlink()
    finally:
        model.delete_adapter("other")
    assert list(outside.iterdir()) == []
    assert _which(folder, base, expected) == "a"
    _check_foreign(folder)


def test_leftovers_of_another_machine_are_left_to_it(adapters, tmp_path):
    """On a file system several machines share, a stage or commit named after another machine's process cannot be
    told dead from here: recovery leaves it alone; one of this machine's dead processes is settled."""
    root, base, models, expected = adapters
    folder = _fresh_folder(root, models)
    dead = 2**22 + 12345  # above every pid this machine hands out
    foreign = folder / f"{atomic_folder.COMMIT_TAG}{dead}-00000000-ffffffff"
    ours = folder / f"{atomic_folder.STAGE_TAG}{dead}-00000000-{atomic_folder._host()}"
    foreign.mkdir()
    ours.mkdir()
    atomic_folder.recover(str(folder))
    assert foreign.exists() and not ours.exists()
    assert _which(folder, base, expected) == "a"
    shutil.rmtree(foreign)
