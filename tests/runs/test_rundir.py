"""One owner per run dir: claims, the lock and who holds it, with real processes where the
point is two processes at once; the rules for continuing a run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pandas as pd
import pytest
from conftest import make_imagefolder, write_config
from processes import Finetune, Torchrun, csv_rows

from finetune.config.load import load_config
from finetune.errors import FinetuneError
from finetune.runs.lock import LOCK_FILE, RunLock, claim, hold
from finetune.runs.rundir import check_continuation, claim_new_run_dir, is_finished


def finetune(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "finetune.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_a_claimed_dir_is_locked_until_released_and_names_its_holder(tmp_path):
    run = tmp_path / "runs" / "a"
    lock = claim(run)
    assert lock is not None and claim(run) is None, "a second open of the lock file is refused"
    holder = lock.holder()
    assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname())
    with pytest.raises(FinetuneError, match=rf"--resume {re.escape(str(run))} is in use by pid {os.getpid()} on "):
        hold(run, "--resume")
    lock.release()
    assert not (tmp_path / "runs").exists(), "a dir claimed and left empty goes, and so do parents made for it"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    with claim(run):
        assert (run / LOCK_FILE).exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_temp_files_go_only_when_the_lock_is_taken(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".last.pt.x1.tmp"
    stale.write_text("half")
    with claim(run):
        assert not stale.exists()
        live = run / ".best.pt.x2.tmp"
        live.write_text("being written")
        assert claim(run) is None
        assert live.exists(), "a refused claim leaves the holder's temp files alone"


def test_auto_named_runs_take_the_next_name_no_one_created(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=x"])
    (tmp_path / "x").mkdir()  # empty, yet someone's: mkdir is the claim
    with claim_new_run_dir(cfg, None) as first, claim_new_run_dir(cfg, None) as second:
        assert (first.folder.name, second.folder.name) == ("x-2", "x-3")


def test_continuing_a_run_may_only_raise_epochs():
    saved = load_config(None, ["train.epochs=3"])
    check_continuation(saved, load_config(None, ["train.epochs=5", "log.tensorboard=true"]), "here", "fix")
    with pytest.raises(FinetuneError, match=r"here: train.epochs .* \(run has 3\), not lowered to 2; fix"):
        check_continuation(saved, load_config(None, ["train.epochs=2"]), "here", "fix")
    with pytest.raises(FinetuneError, match=r"here: config differs from the run's in seed; .*\(fix\)"):
        check_continuation(saved, load_config(None, ["train.epochs=3", "seed=1"]), "here", "fix")


def test_a_run_continues_with_other_data_workers():
    """How many processes load the images changes no batch: a run saved with num_workers 0 (one
    per core before `auto`) may continue with auto."""
    saved = load_config(None, ["data.num_workers=0"])
    check_continuation(saved, load_config(None, ["data.num_workers=auto"]), "here", "fix")


def test_a_run_is_finished_when_done_or_stopped_early_before_its_last_epoch():
    done = {"epochs_completed": 3, "epochs": 3, "stopped_early": None}
    assert is_finished(done, 3) and not is_finished(done, 4)
    early = {"epochs_completed": 2, "epochs": 3, "stopped_early": {"epoch": 2, "reason": "patience"}}
    assert is_finished(early, 3) and is_finished(early, 5)
    on_last = {"epochs_completed": 3, "epochs": 3, "stopped_early": {"epoch": 3, "reason": "patience"}}
    assert is_finished(on_last, 3) and not is_finished(on_last, 4), "a stop on the last epoch is extendable"


def test_two_trains_of_one_config_started_at_once_get_their_own_dirs(config_file, tmp_path):
    config = config_file(train={"epochs": 2})
    procs = [Finetune("train", config) for _ in range(2)]
    for proc in procs:
        _, err = proc.finish()
        assert proc.returncode == 0, err
    dirs = sorted(re.search(r"files in (\S+)", "".join(p.lines)).group(1) for p in procs)
    assert dirs == [str(tmp_path / "runs" / "tiny"), str(tmp_path / "runs" / "tiny-2")]
    for run in dirs:
        assert pd.read_csv(f"{run}/results.csv")["epoch"].tolist() == [1, 2]


def test_a_live_run_is_refused_to_others_and_resumable_at_once_after_kill_9(config_file, tmp_path):
    run = tmp_path / "run"
    writer = Finetune("train", config_file(train={"epochs": 200}), "--run-dir", run)
    assert writer.wait_for(lambda: csv_rows(run) >= 1), "the first epoch should finish"
    live_temp = run / ".last.pt.live.tmp"
    live_temp.write_text("a write in progress")
    second, resume = Finetune("train", config_file(), "--run-dir", run), Finetune("train", "--resume", run)
    for proc, flag in ((second, "--run-dir"), (resume, "--resume")):
        _, err = proc.finish()
        assert proc.returncode == 2, err
        assert f"error: {flag} {run} is in use by pid {writer.pid} on {socket.gethostname()} since " in err
        assert len(err.strip().splitlines()) == 1
    assert writer.poll() is None, "the refusals must have met a live writer"
    assert live_temp.exists(), "a refused resume leaves the live writer's temp files"
    writer.send_signal(signal.SIGKILL)
    writer.finish()
    assert (run / LOCK_FILE).exists(), "kill -9 leaves the lock file, but not the lock"
    again = Finetune("train", "--resume", run)
    assert again.wait_for(lambda: again.printed("/200 backbone |")), again.finish()
    again.send_signal(signal.SIGKILL)
    again.finish()
    assert not live_temp.exists(), "the new owner removes a dead writer's temp files"
    assert RunLock(run).holder().pid == again.pid


def test_under_torchrun_rank_0_claims_and_every_rank_gets_its_refusal(config_file, tmp_path):
    """Rank 0 alone takes the lock and broadcasts the outcome, so a held dir stops every rank
    with rank 0's line instead of leaving rank 1 waiting for a path."""
    run = tmp_path / "run"
    with claim(run):
        proc = Torchrun(tmp_path / "logs", "train", config_file(), "--run-dir", run)
        out = proc.finish(timeout=120)
    assert proc.returncode != 0 and "exitcode  : 2" in out, out
    line = f"error: --run-dir {run} is in use by pid {os.getpid()} on {socket.gethostname()} since "
    for rank in (0, 1):
        assert line in proc.rank_log(rank, "stderr"), proc.rank_log(rank, "stderr")


def test_two_sweeps_on_one_dir_train_every_run_exactly_once(tmp_path):
    data = make_imagefolder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", train={"epochs": 2})
    names = [f"lr_backbone={lr}" for lr in ("1e-4", "2e-4", "3e-4", "4e-4")]
    out = tmp_path / "sweep"
    grid = ["--grid", "train.lr_backbone=1e-4,2e-4,3e-4,4e-4", "--out", out]
    procs = [Finetune("sweep", config, *grid) for _ in range(2)]
    for proc in procs:
        _, err = proc.finish()
        assert proc.returncode == 0, err
    for i, name in enumerate(names, start=1):
        trained = [p for p in procs if p.printed(f"[{i}/4] {name}\n")]
        assert len(trained) == 1, f"{name} trained by {len(trained)} processes"
        assert pd.read_csv(out / name / "results.csv")["epoch"].tolist() == [1, 2]
    table = pd.read_csv(out / "comparison" / "comparison.csv")
    assert sorted(table["run"]) == names
    assert not (out / "comparison" / LOCK_FILE).exists()
