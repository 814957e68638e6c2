"""Atomic writes: the target names a complete file or folder, the old one or the new one, never a half; the
temporaries of killed writers are cleared."""

from __future__ import annotations

import os

import pytest

from ember.engine.atomic import remove_stale_temporaries, write_atomically


def test_a_file_and_a_folder_replace_the_old_ones_whole(tmp_path):
    write_atomically(tmp_path / "weights.bin", lambda path: path.write_bytes(b"first"))
    write_atomically(tmp_path / "weights.bin", lambda path: path.write_bytes(b"second"))
    assert (tmp_path / "weights.bin").read_bytes() == b"second"

    def folder(contents):
        def write(path):
            path.mkdir()
            for name, text in contents.items():
                (path / name).write_text(text)
        return write

    write_atomically(tmp_path / "step", folder({"a.txt": "old", "stale.txt": "old"}))
    write_atomically(tmp_path / "step", folder({"a.txt": "new"}))
    assert sorted(p.name for p in (tmp_path / "step").iterdir()) == ["a.txt"]
    assert (tmp_path / "step" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step", "weights.bin"]  # no temporary left


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path, error):
    target = tmp_path / "adapter_model.safetensors"
    target.write_text("the last good one")

    def write(path):
        path.write_text("half")
        raise error

    with pytest.raises(type(error)):
        write_atomically(target, write)
    assert target.read_text() == "the last good one"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead = 2**22 + 1  # above Linux's largest process id: no process has it
    stale = [tmp_path / f".step-00000005.tmp-{dead}", tmp_path / f".final.tmp-{os.getpid()}"]  # ours: not writing
    kept = [tmp_path / f".step-00000006.tmp-{os.getppid()}",  # a live writer's: it may be mid-write
            tmp_path / ".hidden", tmp_path / ".notes.tmp-x", tmp_path / "step-00000004"]
    for path in (*stale, *kept):
        path.mkdir()
    (tmp_path / f".log.jsonl.tmp-{dead}").write_text("half")  # files go too
    stale.append(tmp_path / f".log.jsonl.tmp-{dead}")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "nowhere") == []
