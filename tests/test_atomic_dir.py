"""`atomic_files.replace_dir`: a folder holds its old or its new contents at every moment."""

from __future__ import annotations

import os

import pytest

from peftkit import atomic_files


def make(folder, **files) -> None:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)


def contents(folder) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replace_dir_swaps_in_the_new_folder_and_deletes_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    make(tmp_path / "adapter", a="old", stale="old only")
    make(tmp_path / ".adapter.tmp-1", a="new")
    atomic_files.replace_dir(tmp_path / ".adapter.tmp-1", tmp_path / "adapter")
    assert contents(tmp_path / "adapter") == {"a": "new"}
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_replace_dir_into_a_new_name(tmp_path):
    make(tmp_path / ".step-3.tmp-1", a="new")
    atomic_files.replace_dir(tmp_path / ".step-3.tmp-1", tmp_path / "step-3")
    assert sorted(os.listdir(tmp_path)) == ["step-3"]


def test_a_swap_killed_between_its_two_renames_is_undone(tmp_path):
    """Without an atomic exchange, the old folder is `.name.old` for a moment; a killed process leaves it
    there and `recover_dir` (run by the next `peftkit train`) puts it back."""
    make(tmp_path / ".adapter.old", a="old")
    make(tmp_path / ".adapter.tmp-1", a="new, never swapped in")
    assert atomic_files.recover_dir(tmp_path / "adapter")
    assert contents(tmp_path / "adapter") == {"a": "old"}
    assert not atomic_files.recover_dir(tmp_path / "adapter")  # nothing to undo any more
