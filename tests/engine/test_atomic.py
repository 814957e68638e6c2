"""Atomic writes: the target names a complete file or folder, the old one or the new one, never a half."""

from __future__ import annotations

import pytest

from ember.engine.atomic import write_atomically


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
