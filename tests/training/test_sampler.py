"""data.sampler balanced in training: exact resume after kill -9 and SIGTERM, streamed like in
memory, cached like uncached, two torchrun ranks like one process. Units: tests/data/test_balanced_sampler.py."""

from __future__ import annotations

import json
import signal

import pandas as pd
import torch
from conftest import make_imagefolder, write_config
from processes import Finetune, Torchrun, assert_same_as_reference, csv_rows, reference_run, resume, stop_when

from finetune.cli import main
from finetune.runs.results import TIMING

IMBALANCED = [40, 16, 8]  # train images per class of the generated folders: 64, whole batches of 4 and 8


def imbalanced_config(tmp_path, **sections):
    data = make_imagefolder(tmp_path / "data", train_per_class=IMBALANCED, val_per_class=4)
    sections["data"] = {"batch_size": 4, "sampler": "balanced", **sections.get("data", {})}
    return write_config(tmp_path / "config.yaml", data, tmp_path / "runs", **sections)


def test_a_balanced_run_says_which_balances_and_streams_as_it_trains_in_memory(tmp_path, capsys):
    """Epoch 1 on cached head inputs, epoch 2 on images: in memory and streamed alike (at the
    images' own 24 px, which both keep as they are)."""
    config = imbalanced_config(tmp_path, data={"image_size": 24}, train={"epochs": 2, "unfreeze_epoch": 1})
    for run, budget in (("memory", 4096), ("streamed", 0)):
        sets = [f"data.memory_budget_mb={budget}", "data.num_workers=1"]
        assert main(["train", str(config), "--run-dir", str(tmp_path / run), "--set", *sets]) == 0
        assert "train.class_weights auto is off (the sampler balances classes)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "memory" / "summary.json").read_text())
    assert summary["sampler"] == "balanced" and summary["class_weights"] is None
    assert "class_weights auto is off" in summary["balance"]
    a, b = (pd.read_csv(tmp_path / run / "results.csv").drop(columns=list(TIMING)) for run in ("memory", "streamed"))
    pd.testing.assert_frame_equal(a, b)


def test_sigkill_and_sigterm_mid_epoch_then_resume_are_bit_identical(tmp_path):
    """Epoch 1 trains the head on cached inputs, epochs 2-3 the whole model on images."""
    config = imbalanced_config(tmp_path, train={"epochs": 3, "unfreeze_epoch": 1})
    reference = reference_run(config, tmp_path / "reference")
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), signal.SIGKILL)
    assert csv_rows(run) == 1, "the kill should land inside epoch 2"
    proc = Finetune("train", "--resume", run)
    assert stop_when(proc, lambda: proc.bar_at("epoch 3", steps=2), signal.SIGTERM) == 143
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] > 0, "stopped mid-epoch 3"
    resume(run)
    assert_same_as_reference(run, reference)


def test_two_processes_of_batch_4_draw_the_one_process_batches_of_8(tmp_path):
    """As with shuffling (test_distributed): the ranks' shares of each epoch's draw make the
    one-process batches (64 images: whole batches either way), so head-only training (frozen
    BatchNorm, cached inputs) matches it."""
    data = make_imagefolder(tmp_path / "data", train_per_class=IMBALANCED, val_per_class=4)
    train = {"epochs": 2, "unfreeze_epoch": None}
    sampler = {"sampler": "balanced"}
    one = write_config(tmp_path / "one.yaml", data, tmp_path / "runs", data={"batch_size": 8, **sampler}, train=train)
    two = write_config(tmp_path / "two.yaml", data, tmp_path / "runs", data={"batch_size": 4, **sampler}, train=train)
    assert main(["train", str(one), "--run-dir", str(tmp_path / "one")]) == 0
    proc = Torchrun(tmp_path / "logs", "train", two, "--run-dir", tmp_path / "two")
    assert proc.finish() is not None and proc.returncode == 0, proc.rank_log(0, "stderr")
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("one", "two"))
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-5, msg=key)
