"""The one atomic directory writer (longqlora.output.atomic_directory): a failure leaves the output as it was, a
success replaces it whole (or moves files into it, the `last` ones last), and a killed writer's leftovers go."""

import os
from pathlib import Path

import pytest

from longqlora.output import atomic_directory, write_text_atomic


def test_replace_whole_and_failure_leaves_the_old_output(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (
        sorted(p.name for p in out.iterdir()) == ["a.txt"]
        and (out / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    )
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # untouched
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_into_keeps_other_files_and_moves_the_last_names_last(tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "adapter_config.json").write_text("old")
    (out / ".partial-stale").mkdir()  # left by a killed writer
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: order.append(os.path.basename(dst)) or real(src, dst))
    with atomic_directory(out, into=True, last=("adapter_config.json",)) as tmp:
        assert tmp.parent == out
        for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
            (tmp / name).write_text("new")
    assert order[-1] == "adapter_config.json" and set(order) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-2",
        "tokenizer.json",
    ]
    assert (out / "adapter_config.json").read_text() == "new"


def test_a_kill_between_the_renames_is_repaired_and_a_live_writer_is_left_alone(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "merged"
    aside = tmp_path / ".merged.old-999999999-abc"  # a writer killed after moving the old output aside
    (aside / "merged").mkdir(parents=True)
    (aside / "merged" / "config.json").write_text("previous")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".merged.partial-{sleeper.pid}-xyz"  # another process writing right now
        live.mkdir()
        with pytest.raises(RuntimeError), atomic_directory(out):
            raise RuntimeError("this run fails at once")
        assert (out / "config.json").read_text() == "previous"  # put back, not deleted
        assert not aside.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("new")
    assert not live.exists() and (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())


def test_symlinks_inside_are_not_followed(tmp_path):
    import os

    private = tmp_path / "secret.txt"
    private.write_text("x")
    os.chmod(private, 0o600)
    with atomic_directory(tmp_path / "data") as tmp:
        (tmp / "link").symlink_to(private)
        (tmp / "dangling").symlink_to(tmp_path / "nothing-here")
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data" / "link").is_symlink()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads which file a descriptor is from /proc")
def test_renames_are_durable_the_data_and_the_folder_entry_are_synced(tmp_path, monkeypatch):
    """A rename survives a power cut only if the renamed data and the folder holding the new entry reach the disk:
    every file of a new output folder, the folder, and its parent are fsynced (writers such as safetensors do not)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    out = tmp_path / "adapter"
    with atomic_directory(out) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"x" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    names = {Path(p).name for p in synced}
    assert {"weights.safetensors", "config.json", "sub"} <= names and str(tmp_path) in synced
    synced.clear()
    write_text_atomic(tmp_path / "report.md", "text")
    assert any(Path(p).name.startswith(".report.md.") for p in synced) and synced[-1] == str(tmp_path)
