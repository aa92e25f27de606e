"""The run folder and what a run leaves in it, one process each: the lock's rules (owner,
restart, takeover of a dead job's lock), output folders that cannot be written, a torn last
line of metrics.jsonl, the checkpoint a non-finite stop names, and which rank prints a user
error. The same faults under torchrun are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from train_utils import logged_losses, tiny_recipe, tiny_recipe_dict, write_corpus, write_toml

from lh_cp.cli import main
from lh_cp.train import runlock
from lh_cp.train.checkpoint import checkpoint_path
from lh_cp.train.engines import NonFiniteStep
from lh_cp.train.metrics import MetricsWriter
from lh_cp.train.runlock import LOCK_NAME, STALE_AFTER_S, RunFolderLocked, acquire_run_lock
from lh_cp.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _write_lock(folder: Path, **owner) -> Path:
    lock = folder / LOCK_NAME
    fields = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": ""}
    lock.write_text(json.dumps({**fields, "started": "then", "job": "torchrun other", **owner}))
    return lock


def test_the_run_folder_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path, monkeypatch):
    said = []
    folder = tmp_path / "run"
    held = acquire_run_lock(folder, said.append)  # creates the folder
    owner = json.loads((folder / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    again = acquire_run_lock(folder, said.append)  # the same job (a restart) keeps it
    assert said == [] and again.owner.job == held.owner.job
    monkeypatch.setattr(runlock, "job_id", lambda: "torchrun someone@elsewhere:1")
    with pytest.raises(RunFolderLocked) as refused:
        acquire_run_lock(folder, said.append)
    assert str(refused.value) == (
        f"run.out_dir {folder} is in use by job {owner['job']} (host {owner['host']}, pid "
        f"{owner['pid']}, started {owner['started']}) (lock {folder / LOCK_NAME}); use another "
        f"run.out_dir, or stop that job first"
    )
    held.release()
    assert not (folder / LOCK_NAME).exists()

    dead = _dead_pid()
    _write_lock(folder, pid=dead)
    acquire_run_lock(folder, said.append).release()
    assert said == [
        f"took over the run folder lock {folder / LOCK_NAME} of job torchrun other (host "
        f"{socket.gethostname()}, pid {dead}, started then): pid {dead} on this host has ended"
    ]
    # A pid that lives but started later than the lock says has been reused: taken over.
    _write_lock(folder, pid=os.getpid(), pid_started="1")
    acquire_run_lock(folder, said.append).release()
    assert said[-1].endswith(
        f"pid {os.getpid()} on this host has ended (the number is now another process's)"
    )
    # Another host: refused while refreshed, taken over once older than STALE_AFTER_S.
    lock = _write_lock(folder, host="some-other-host", pid=1)
    with pytest.raises(RunFolderLocked, match="host some-other-host, pid 1"):
        acquire_run_lock(folder, said.append)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    acquire_run_lock(folder, said.append).release()
    assert said[-1].endswith("not refreshed for 11 min (more than 10 min)")
    assert sorted(p.name for p in folder.iterdir()) == []  # no temporary files left


def test_output_folders_that_cannot_be_written_are_refused_by_plan_and_train(
    tmp_path, corpus, capsys
):
    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(tmp_path / "run", corpus))
    (tmp_path / "a_file").write_text("")
    # Root writes through file modes; /sys refuses everyone.
    unwritable = Path("/sys/lh-cp-run") if os.geteuid() == 0 else tmp_path / "ro" / "run"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    for out, problem in (
        (tmp_path / "a_file" / "run", f"lies under {tmp_path / 'a_file'}, a file, not a folder"),
        (unwritable, f"cannot be written (it would be created in {unwritable.parent}): "),
    ):
        for command in ("plan", "train"):
            code = main([command, str(recipe_file), "--set", f"run.out_dir='{out}'"])
            err = capsys.readouterr().err
            assert code == 2 and f"run.out_dir='{out}' {problem}" in err, err
            assert "Traceback" not in err
    assert main(["plan", str(recipe_file)]) == 0
    printed = capsys.readouterr().out
    assert (
        f"checkpoints in {tmp_path / 'run' / 'checkpoints'}: about 2.6 MB each, up to 5" in printed
    )


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    jsonl = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "kind": "train", "train/loss": 1.0}) for s in (1, 2, 3)]
    jsonl.write_text("\n".join(lines) + "\n" + lines[0][:17])  # a crash mid-write
    writer = MetricsWriter(tmp_path / "tb", jsonl, resume_step=2, run_name="t")
    assert f"warning: {jsonl}: dropped its last line" in capsys.readouterr().out
    writer.scalars(3, {"train/loss": 0.5})
    writer.close()
    assert jsonl.read_text().splitlines() == lines[:2] + [
        json.dumps({"step": 3, "kind": "train", "train/loss": 0.5})
    ]


def test_a_non_finite_stop_names_the_newest_checkpoint_that_verifies(tmp_path, corpus, monkeypatch):
    """Checkpoints at steps 2 and 4; step 4 is corrupted, so the resume falls back to step 2;
    a non-finite loss at step 3 then names step 2 as the last good checkpoint (not the newer
    step 4 folder, which failed verification)."""
    out = tmp_path / "run"
    train(tiny_recipe(out, corpus, ["checkpoint.interval=2", "run.stop_after_step=4"]))
    step4 = checkpoint_path(out / "checkpoints", 4)
    largest = max((p for p in step4.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))

    import lh_cp.train.trainer as trainer_module

    real_loss = trainer_module.training_loss

    def nan_loss(*args, **kwargs):  # the resumed run's first step, step 3
        loss, mean = real_loss(*args, **kwargs)
        return loss, mean * float("nan")

    monkeypatch.setattr(trainer_module, "training_loss", nan_loss)
    with pytest.raises(NonFiniteStep) as stopped:
        train(tiny_recipe(out, corpus, ["checkpoint.interval=2"]))
    message = str(stopped.value)
    assert "non-finite loss (nan) at step 3" in message
    assert (
        f"the last good checkpoint is {checkpoint_path(out / 'checkpoints', 2)} (step 2)" in message
    )
    assert sorted(logged_losses(out)) == [1, 2]


def test_errors_every_rank_meets_alike_are_printed_by_the_first_rank_of_each_node(
    tmp_path, corpus, capsys, monkeypatch
):
    import lh_cp.cli

    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(tmp_path / "run", corpus))
    bad = ["train", str(recipe_file), "--set", "optim.lr=-1"]
    monkeypatch.setattr(lh_cp.cli, "QUIET_RANK_WAIT_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(bad) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("lh-cp train: error: the recipe is not valid:") and "lr=-1.0" in err
    # A bad data file stops the run before any process group, naming it.
    shutil.copytree(corpus, tmp_path / "corpus")
    (tmp_path / "corpus" / "doc_000.txt").write_bytes(b"ok\n\xff\n")
    code = main(["train", str(recipe_file), "--set", f"data.path='{tmp_path / 'corpus'}'"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        f"lh-cp train: error: {tmp_path / 'corpus' / 'doc_000.txt'}:2: invalid UTF-8 at byte offset 3"
    ), err


def test_a_manifest_entry_without_a_size_fails_verification_naming_it(tmp_path):
    from lh_cp.train.checkpoint import MANIFEST, verify_checkpoint

    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / "a.distcp").write_bytes(b"x")
    (folder / MANIFEST).write_text(json.dumps({"files": {"a.distcp": {"crc32": "00000000"}}}))
    verdict = verify_checkpoint(folder)
    assert not verdict.ok
    assert (
        verdict.reason
        == "manifest.json is unreadable (KeyError: 'the entry of a.distcp has no size')"
    )
