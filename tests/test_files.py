"""Atomic writes' neighbours: what a failed block may remove, and what it must leave."""

from __future__ import annotations

import os

import pytest

from finetune.files import removed_on_failure


def test_a_failed_block_removes_the_folders_it_made_and_never_a_dangling_link_that_was_there(tmp_path):
    made = tmp_path / "new" / "data"
    with pytest.raises(OSError), removed_on_failure(made, ("cifar-10-batches-py",)):
        os.makedirs(made)
        raise OSError("the download failed")
    assert not (tmp_path / "new").exists()
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "unmounted")  # a user's link to a drive not mounted now
    with pytest.raises(FileExistsError), removed_on_failure(link, ("cifar-10-batches-py",)):
        os.makedirs(link)
    assert link.is_symlink()
