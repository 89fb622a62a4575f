"""llm_features/atomic.py: the old file or the whole new one, never a half-written one or a stray temp file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm_features.atomic import atomic_path, write_bytes, write_json, write_text
from llm_features.errors import UserError


def test_write_json_text_and_bytes(tmp_path):
    path = write_json(tmp_path / "new" / "dir" / "m.json", {"b": np.float32(0.5), "a": np.int64(3),
                                                           "p": Path("/x"), "v": np.arange(2)})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')  # sorted, one line per key
    assert json.loads(text) == {"a": 3, "b": 0.5, "p": "/x", "v": [0, 1]}  # numpy as numbers, paths as str
    write_json(path, {"b": 1, "a": 2}, sort_keys=False)
    assert path.read_text().index('"b"') < path.read_text().index('"a"')
    assert write_text(tmp_path / "t.txt", "hello").read_text() == "hello"
    assert write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "new", "t.txt"]


def test_a_failed_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_temp_file_is_beside_the_destination_or_in_the_given_dir(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    with atomic_path(tmp_path / "out" / "x.bin", tmp_dir=staging) as tmp:
        assert tmp.parent == staging and tmp.name.startswith(".x.bin.")
        tmp.write_bytes(b"1")
    with atomic_path(tmp_path / "y.bin") as tmp:
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"2")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"1" and not list(staging.iterdir())


def test_a_linked_destination_is_refused(tmp_path):
    target = write_text(tmp_path / "real.json", "keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(UserError, match=r"link\.json: is a symbolic link to .*real\.json; refusing"):
        write_json(link, {"a": 1})
    assert link.is_symlink() and target.read_text() == "keep"
    linked_dir = tmp_path / "out"
    linked_dir.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    write_text(linked_dir / "ok.txt", "an output directory may be a link")
    assert (tmp_path / "elsewhere" / "ok.txt").exists()


def test_linking_a_file_over_its_own_hard_link_leaves_no_temp_file(tmp_path):
    """rename(2) of one hard link over another of the same file does nothing: the temp name is removed."""
    import os

    src = write_text(tmp_path / "best.safetensors", "weights")
    dest = tmp_path / "out" / "best.safetensors"
    for _ in range(2):  # the second time, dest already is a link to src
        with atomic_path(dest) as tmp:
            os.link(src, tmp)
    assert dest.read_text() == "weights" and os.path.samefile(src, dest)
    assert [p.name for p in dest.parent.iterdir()] == ["best.safetensors"]
