"""Atomic writes: a kill or a full disk at any instant leaves every file's previous version readable."""

import errno
import json
import os
import random
import signal
import time

import pytest
import torch
from conftest import FullDisk

import locallearn.atomic
from locallearn.atomic import atomic_open, write_json, write_text
from locallearn.training.checkpoint import AtomicCheckpointIO


def test_a_writer_that_dies_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"status": "finished", "steps": 400})
    with pytest.raises(RuntimeError, match="died"):
        with atomic_open(path) as f:
            f.write('{"status": "fail')
            raise RuntimeError("died half way")
    assert json.loads(path.read_text()) == {"status": "finished", "steps": 400}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left behind


def test_a_full_disk_leaves_the_old_file_and_names_the_target(tmp_path, monkeypatch):
    path = tmp_path / "diagnostics.json"
    write_text(path, "previous version\n")
    monkeypatch.setattr(locallearn.atomic, "_fdopen", FullDisk(budget=5))  # 5 bytes fit, then the disk is full
    with pytest.raises(OSError) as info:
        write_json(path, {"findings": list(range(100))})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_text() == "previous version\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics.json"]


def test_the_temporary_file_lives_beside_the_target_and_gets_normal_permissions(tmp_path, monkeypatch):
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real(src, dst))[1])
    path = tmp_path / "sub" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    (src, dst), = renames
    assert os.path.dirname(src) == str(path.parent) and dst == path  # never through $TMPDIR: no EXDEV
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert torch.load(path, weights_only=False)["step"] == 1


def _save_forever(path, ready_fd: int):
    """The body of a forked child: save checkpoints in a loop until killed."""
    io, big = AtomicCheckpointIO(), torch.randn(2_000_000)  # 8 MB: a save takes long enough to be caught mid-way
    step = 0
    while True:
        io.save_checkpoint({"step": step, "w": big, "check": step}, path)
        if step == 0:
            os.write(ready_fd, b"1")
        step += 1


def test_kill_9_at_random_instants_during_saves_never_leaves_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    for _ in range(10):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest: it saves until SIGKILL (or exits at once on error)
            try:
                _save_forever(path, ready_w)
            finally:
                os._exit(1)
        assert os.read(ready_r, 1) == b"1"  # one save is complete
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
        ckpt = torch.load(path, weights_only=False)  # loads: the last complete save
        assert ckpt["step"] == ckpt["check"] and ckpt["w"].numel() == 2_000_000
