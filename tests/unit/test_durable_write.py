"""``write_durably``, the one durable atomic write of the terminal's files (card-data key,
policy documents and pointer, scheduler state)."""

from __future__ import annotations

import os
import stat

import pytest

from edge.terminal.files import write_durably


def _left(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_durably__writes_whole_then_replaces_whole_leaving_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    assert write_durably(target, b"one\n") is True
    assert write_durably(target, b"two, longer\n") is True
    assert target.read_bytes() == b"two, longer\n"
    assert _left(tmp_path) == ["state.json"]


def test_write_durably__sets_the_exact_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_durably(tmp_path / "shared", b"x", mode=0o644)
    finally:
        os.umask(old)
    old = os.umask(0)
    try:
        write_durably(tmp_path / "secret", b"k", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_write_durably__exclusive_never_replaces_a_file_that_is_there(tmp_path):
    key = tmp_path / "key"
    assert write_durably(key, b"first", exclusive=True) is True
    assert write_durably(key, b"second", exclusive=True) is False
    assert key.read_bytes() == b"first"
    assert _left(tmp_path) == ["key"]


def test_write_durably__a_failed_write_raises_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    write_durably(target, b"old")
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError):  # os.replace cannot put a file over a directory
        write_durably(tmp_path / "sub", b"new")
    with pytest.raises(FileNotFoundError):
        write_durably(tmp_path / "missing" / "state.json", b"new")
    assert target.read_bytes() == b"old"
    assert _left(tmp_path) == ["state.json", "sub"]
