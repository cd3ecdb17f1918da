"""运行目录的基本件：独占锁（进程死亡即释放）、已有运行的判定、--overwrite 的清理范围、
被打断的保存留下的临时目录、同一步重复保存时唯一的一份绝不先删、写盘失败说成一段话。"""

import errno
import os
import signal
import subprocess
import sys

import pytest

from conftest import tiny_config
from functional_lm.runs.checkpoint import list_checkpoints, save_checkpoint
from functional_lm.models.decoder import init_params
from functional_lm.runs.rundir import RunLock, clear_run, ensure_output_dir, remove_stale_temps, run_markers
from functional_lm.errors import RunDirError, StorageError, write_failure
from functional_lm.runs.monitor import StopFlag
from functional_lm.kd.step import build_optimizer
from functional_lm.config import TrainingConfig


def test_second_lock_is_refused_with_the_holders_pid(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # 释放之后可以再拿到
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = (
        "import sys, time; from functional_lm.runs.rundir import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=rf"pid {proc.pid}"):
        RunLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    RunLock(tmp_path).acquire().release()  # 操作系统已经释放了锁


def test_output_dir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(RunDirError, match=r"exists but is a file"):
        ensure_output_dir(file)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.write_bytes", read_only)
    with pytest.raises(RunDirError, match=r"cannot be written: the location is read-only .*\[EROFS\]"):
        ensure_output_dir(tmp_path / "new")


def test_markers_and_overwrite_keep_the_users_own_files(tmp_path):
    assert run_markers(tmp_path) == []
    (tmp_path / "checkpoints").mkdir()
    assert run_markers(tmp_path) == []  # 空的 checkpoints/ 不算一次运行
    (tmp_path / "checkpoints" / "step-00000001").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert run_markers(tmp_path) == ["metrics.jsonl", "checkpoints"]
    clear_run(tmp_path)
    assert run_markers(tmp_path) == [] and (tmp_path / "notes.txt").read_text() == "mine"


def test_stale_temps_are_removed_and_an_orphaned_old_copy_is_put_back(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000004").mkdir(parents=True)
    (ckpts / ".step-00000006.tmp-0a1b2c3d").mkdir()  # 没写完的保存
    (ckpts / "..step-00000006.tmp-0a1b2c3d.tmp-11112222").mkdir()  # 它里面 save_pretrained 的临时目录
    (ckpts / ".step-00000004.old-deadbeef").mkdir()  # 替换完成后残留的旧目录：多余
    (ckpts / ".step-00000002.old-feedface").mkdir()  # 旧的挪开了、新的还没到位：唯一的一份
    (ckpts / ".step-00000002.old-feedface" / "model.safetensors").write_text("only copy")
    (tmp_path / "student").mkdir()
    (tmp_path / ".student.old-12345678").mkdir()  # 新的 student/ 已就位：多余
    (tmp_path / "demo" / ".student.tmp-87654321").mkdir(parents=True)
    (tmp_path / "demo" / ".student.old-87654321").mkdir()  # 没有 student/：放回原处
    removed = sorted(p.name for p in remove_stale_temps(tmp_path))
    assert removed == [
        "..step-00000006.tmp-0a1b2c3d.tmp-11112222", ".step-00000004.old-deadbeef", ".step-00000006.tmp-0a1b2c3d",
        ".student.old-12345678", ".student.tmp-87654321",
    ]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    assert (ckpts / "step-00000002" / "model.safetensors").read_text() == "only copy"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["student"]


def _save(root, step, params, cfg, **kw):
    names = {id(p): k for k, p in params.items()}
    optimizer = build_optimizer(params, TrainingConfig())
    return save_checkpoint(root, step, params, cfg, optimizer, names, {"step": step}, **kw)


def test_saving_the_same_step_twice_never_deletes_the_only_copy_first(tmp_path, monkeypatch):
    cfg = tiny_config()
    first = {k: v.requires_grad_(True) for k, v in init_params(cfg, seed=1).items()}
    path = _save(tmp_path, 3, first, cfg)
    before = (path / "model.safetensors").read_bytes()
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((str(src), str(dst)))
        if str(dst) == str(path) and ".tmp-" in str(src):  # 新目录改名到位的那一刻失败
            raise OSError(errno.EIO, "simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    second = {k: v.detach().add(1.0).requires_grad_(True) for k, v in first.items()}
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 3, second, cfg)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    assert (path / "model.safetensors").read_bytes() == before  # 旧的完好如初，已放回原处
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert any(dst == str(path) for _, dst in calls)


def test_second_ctrl_c_waits_for_the_save_to_finish():
    flag = StopFlag()
    flag(signal.SIGINT, None)
    assert flag.requested == "SIGINT"
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with flag.protect():
            flag(signal.SIGINT, None)  # 保存中的第二次 Ctrl-C：不打断
            finished.append("save completed")
    assert finished == ["save completed"]
    with pytest.raises(KeyboardInterrupt):
        flag(signal.SIGINT, None)  # 不在保存中：立即中断


def test_write_failure_is_one_paragraph(tmp_path):
    err = write_failure(OSError(errno.ENOSPC, "No space left on device"), "the checkpoint of step 8",
                        tmp_path, tmp_path / "step-00000004")
    text = str(err)
    assert isinstance(err, StorageError) and "\n" not in text
    assert f"could not write the checkpoint of step 8 to {tmp_path}" in text
    assert "the disk is full" in text and "[ENOSPC]" in text
    assert f"last good checkpoint is {tmp_path / 'step-00000004'}" in text and "--resume" in text
