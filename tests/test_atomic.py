"""Atomic files and folders, the file hash, and the cleanup of killed writers' temporaries (src/atomic.py)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

from src.atomic import (
    ForeignOutputError,
    OutputWriteError,
    file_sha256,
    pid_alive,
    remove_dead_temps,
    replacing,
    replacing_dir,
    save_torch_atomic,
    write_csv_atomic,
    write_json_atomic,
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_writers_replace_whole_files(tmp_path):
    write_csv_atomic(tmp_path / "rows.csv", ["step", "x"], [{"step": 1, "x": 0.5, "other": 9}])
    assert (tmp_path / "rows.csv").read_text() == "step,x\n1,0.5\n"
    save_torch_atomic(tmp_path / "t.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt")["w"], torch.arange(3))
    with replacing(tmp_path / "grid.png", suffix=".png") as tmp:
        assert tmp.name.endswith(".png")  # writers that pick a format by extension
        tmp.write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "rows.csv", "t.pt"]


def test_file_sha256_is_the_files_digest(tmp_path):
    data = os.urandom(5_000_000)  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())


def test_dead_writers_temporaries_go_and_live_ones_stay(tmp_path):
    out = tmp_path / "snapshot"
    dead = tmp_path / f".snapshot.tmp-{dead_pid()}"
    alive = tmp_path / f".snapshot.tmp-{os.getppid()}"
    dead.mkdir()
    alive.mkdir()
    remove_dead_temps(out)
    assert not dead.exists() and alive.exists()


def test_folder_swap_replaces_the_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "images"
    with replacing_dir(out) as tmp:
        (tmp / "a.png").write_bytes(b"a")
    with pytest.raises(RuntimeError), replacing_dir(out) as tmp:
        (tmp / "b.png").write_bytes(b"b")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in out.iterdir()] == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # the half-written folder is gone
    with replacing_dir(out) as tmp:
        (tmp / "c.png").write_bytes(b"c")
    assert [p.name for p in out.iterdir()] == ["c.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_replacing_dir_puts_the_old_folder_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("old")
    real_replace = os.replace

    def refuse_the_new_one(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_one)
    with pytest.raises(OutputWriteError, match=r"could not write .*out \(No space left on device\)"), \
            replacing_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "kept.txt").read_text() == "old"


def test_replacing_dir_with_a_marker_replaces_only_its_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with replacing_dir(tmp_path / "mine", marker=".ours") as tmp:
        (tmp / "a.png").write_text("1")
    with replacing_dir(tmp_path / "mine", marker=".ours") as tmp:  # its own earlier output: replaced whole
        (tmp / "b.png").write_text("2")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [".ours", "b.png"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "generator.pt").write_text("weights")
    for foreign, words in ((tmp_path / "theirs", "holds files this command did not write (generator.pt)"),
                           (tmp_path, "is the folder this runs in"), (tmp_path / "theirs" / "generator.pt", "is a file")):
        with pytest.raises(ForeignOutputError, match=re.escape(words)), replacing_dir(foreign, marker=".ours"):
            pass
    assert (tmp_path / "theirs" / "generator.pt").read_text() == "weights"
