"""The same config under torchrun: two CPU processes with gloo on localhost, real processes."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config
from processes import Torchrun, assert_same_as_reference, csv_rows

from finetune.cli import main

STAGES = {
    "epochs": 3,
    "unfreeze": [{"epoch": 1, "modules": ["layer4"]}, {"epoch": 2, "modules": ["backbone"]}],
    "scheduler": {"name": "cosine", "warmup_epochs": 0.5},
    "unfreeze_warmup_epochs": 0.5,
}


@pytest.fixture(scope="module")
def staged_ddp(tmp_path_factory):
    """A finished 2-process run of a 3-stage cosine config (its cached stages wrapped in DDP too)."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_imagefolder(root / "data", train_per_class=80, val_per_class=6)  # 30 steps per rank: 3 stop votes
    config = write_config(root / "c.yaml", data, root / "runs", data={"batch_size": 4}, train=STAGES)
    proc = Torchrun(root / "logs", "train", config, "--run-dir", root / "reference")
    out = proc.finish()
    assert proc.returncode == 0, out + proc.rank_log(0, "stderr") + proc.rank_log(1, "stderr")
    return config, root / "reference", proc


def test_two_processes_keep_identical_weights_and_only_rank_0_writes(staged_ddp):
    _, run, proc = staged_ddp
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "results.csv", "summary.json"]
    printed = proc.rank_log(0, "stdout")
    assert printed.count("weights identical on 2 ranks") == 3
    assert "2 processes, data.batch_size 4 per process (8 images per optimizer step)" in printed
    assert proc.rank_log(1, "stdout") == "", "other ranks print nothing"
    assert pd.read_csv(run / "results.csv")["stage"].tolist() == ["head", "layer4", "backbone"]
    assert json.loads((run / "summary.json").read_text())["processes"] == 2


def test_two_processes_of_batch_4_match_one_process_of_batch_8_while_batchnorm_is_frozen(tmp_path):
    """Rank r's j-th batch holds positions 8j+r, 8j+r+2 ... of the epoch's order, so the two
    ranks' batches are the one-process batch of 8: same samples and flips per step, averaged
    gradients. With BatchNorm frozen (head-only training) only float rounding differs (1e-5).
    Once BatchNorm trains, each rank normalizes over its own 4 images, so runs then differ."""
    data = make_imagefolder(tmp_path / "data", train_per_class=16, val_per_class=4)
    train = {"epochs": 2, "unfreeze_epoch": None}
    one = write_config(tmp_path / "one.yaml", data, tmp_path / "runs", data={"batch_size": 8}, train=train)
    two = write_config(tmp_path / "two.yaml", data, tmp_path / "runs", data={"batch_size": 4}, train=train)
    assert main(["train", str(one), "--run-dir", str(tmp_path / "one")]) == 0
    proc = Torchrun(tmp_path / "logs", "train", two, "--run-dir", tmp_path / "two")
    assert proc.finish() is not None and proc.returncode == 0
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("one", "two"))
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-5, msg=key)


def test_sigterm_under_torchrun_then_resume_with_two_or_one_processes(staged_ddp, tmp_path):
    config, reference, _ = staged_ddp
    run = tmp_path / "run"
    proc = Torchrun(tmp_path / "logs", "train", config, "--run-dir", run)
    deadline = time.monotonic() + 120
    while csv_rows(run) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.finish()
        time.sleep(0.01)
    # The ranks vote once more just after results.csv gets epoch 1's row, and a signal before
    # that vote stops the run at the epoch boundary (as it should). Epoch 2 takes about 3 s
    # (its layer4 inputs, then 30 steps): half a second in, the signal lands inside it, and
    # the ranks stop at its next vote (step 10 or 20 of 30).
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.finish()
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] > 0, "stopped inside epoch 2"
    assert state["progress"]["world"] == 2
    single = tmp_path / "single"
    shutil.copytree(run, single)

    resumed = Torchrun(tmp_path / "logs2", "train", "--resume", run)
    out = resumed.finish()
    assert resumed.returncode == 0, out + resumed.rank_log(0, "stderr")
    assert f"after epoch 1, step {state['progress']['step']}" in resumed.rank_log(0, "stdout")
    assert_same_as_reference(run, reference)

    printed = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--resume", str(single)], capture_output=True, text=True
    )
    assert printed.returncode == 0, printed.stderr
    assert "with 2 process(es), now 1: that epoch starts over" in printed.stdout
    assert pd.read_csv(single / "results.csv")["epoch"].tolist() == [1, 2, 3]


def test_a_bad_config_under_torchrun_stops_every_rank_with_exit_2(tmp_path, config_file):
    """Every rank checks the config before any collective and exits 2 with the one line; torchrun
    then ends whichever rank has not exited yet, so nothing hangs."""
    started = time.monotonic()
    proc = Torchrun(tmp_path / "logs", "train", config_file(), "--set", "train.epochs=0")
    out = proc.finish(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode != 0 and "exitcode  : 2" in out, out
    line = "error: config: train.epochs = 0 must be greater than 0"
    errors = [proc.rank_log(rank, "stderr") for rank in (0, 1)]
    assert any(line in e for e in errors)
    assert all(e.strip() in ("", line) for e in errors), errors


def test_two_nodes_on_localhost(tmp_path, config_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = config_file(train={"epochs": 2})
    run = tmp_path / "run"
    nodes = [
        Torchrun(
            tmp_path / f"logs{rank}",
            "train",
            config,
            "--run-dir",
            run,
            nproc=1,
            launcher=("--nnodes=2", f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"),
        )
        for rank in (0, 1)
    ]
    outs = [node.finish() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert "2 processes" in nodes[0].rank_log(0, "stdout")
    assert pd.read_csv(run / "results.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.parametrize("nproc", [2, 1])
def test_resume_between_epochs_under_torchrun_trains_the_added_epoch(tmp_path, config_file, nproc):
    """last.pt written at an epoch boundary holds no per-rank steps; resuming it must not index them."""
    config = config_file(train={"epochs": 1, "unfreeze_epoch": None})
    run = tmp_path / "run"
    first = Torchrun(tmp_path / "logs", "train", config, "--run-dir", run, nproc=nproc)
    out = first.finish()
    assert first.returncode == 0, out + first.rank_log(0, "stderr")
    again = Torchrun(tmp_path / "logs2", "train", "--resume", run, "--set", "train.epochs=2", nproc=nproc)
    out = again.finish()
    assert again.returncode == 0, out + again.rank_log(0, "stderr") + again.rank_log(1, "stderr")
    assert "after epoch 1, step 0" in again.rank_log(0, "stdout")
    assert pd.read_csv(run / "results.csv")["epoch"].tolist() == [1, 2]
