"""megaclip/extensions.py: ops compile in a node-local folder unless the user chose one; with a
torch that blocks on lock files, a stale lock is an error naming it and a wait is bounded."""
import os
import time

import pytest
from torch.utils.file_baton import FileBaton

from megaclip import extensions
from megaclip.errors import FatalError, UserError


def test_a_node_local_folder_unless_the_user_set_one():
    assert extensions.extensions_dir({"USER": "ann", "TMPDIR": "/scratch/job7"}) == \
        ("/scratch/job7/megaclip-ext-ann", "node-local")
    assert extensions.extensions_dir({"USER": "ann"})[0] == "/tmp/megaclip-ext-ann"
    assert extensions.extensions_dir({"TORCH_EXTENSIONS_DIR": "/mine", "USER": "ann"}) == \
        ("/mine", "TORCH_EXTENSIONS_DIR")


def _lock(root, name, age_s):
    os.makedirs(root / name, exist_ok=True)
    path = root / name / "lock"
    path.write_text("")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return str(path)


def test_a_stale_lock_is_an_error_naming_it(tmp_path, monkeypatch):
    old = _lock(tmp_path, "fused_adam", extensions.STALE_LOCK_S + 60)
    _lock(tmp_path, "shm_comm", 5)  # a compile going on now
    assert extensions.stale_locks(str(tmp_path)) == [old]
    monkeypatch.setattr(extensions, "uses_lock_files", lambda: True)
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)  # setup_extensions bounds it
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    with pytest.raises(UserError, match=f"stale compile lock.*{old}.*rm {old}"):
        extensions.setup_extensions(env)
    os.remove(old)
    assert "lock waits bounded" in extensions.setup_extensions(env)
    monkeypatch.setattr(extensions, "uses_lock_files", lambda: False)  # torch's advisory lock
    _lock(tmp_path, "fused_adam", extensions.STALE_LOCK_S + 60)
    env = {"USER": "ann", "TMPDIR": str(tmp_path)}
    assert extensions.setup_extensions(env).startswith(f"ops compile in {tmp_path}/megaclip-ext-ann")
    assert env["TORCH_EXTENSIONS_DIR"] == f"{tmp_path}/megaclip-ext-ann"


def test_a_wait_on_a_lock_file_gives_up_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)  # undone after the test
    extensions.bound_lock_wait(limit_s=0.3)
    lock = tmp_path / "lock"
    lock.write_text("")
    baton = FileBaton(str(lock), wait_seconds=0.05)
    assert not baton.try_acquire()
    start = time.time()
    with pytest.raises(FatalError, match=f"waited 0 s for {lock}.*rm {lock}"):
        baton.wait()
    assert time.time() - start < 5


def test_the_node_local_folder_must_be_the_users_own(tmp_path):
    env = {"USER": "ann", "TMPDIR": str(tmp_path)}
    extensions.setup_extensions(dict(env))
    folder = tmp_path / "megaclip-ext-ann"
    assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
    folder.chmod(0o777)  # writable by anyone: someone could swap the compiled library
    with pytest.raises(UserError, match="is not a folder of yours"):
        extensions.setup_extensions(dict(env))
    folder.rmdir()
    os.symlink(tmp_path, folder)  # a link planted in its place
    with pytest.raises(UserError, match="is not a folder of yours"):
        extensions.setup_extensions(dict(env))
