"""The training loop's units alone: the replicas' collectives, progress across resume, the
cache fill, TensorBoard's purge. DDP cases run real gloo process groups of two processes."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_imagefolder, tiny_config

from finetune.runtime.distributed import Ranks
from finetune.training.features import FeatureCache, empty_cache
from finetune.training.replicas import VOTE_EVERY, Replicas
from finetune.training.state import Progress
from finetune.training.stop import StopRequested


def _join(rank: int, world: int, init: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)


def _record_all_reduce(calls: list[str]) -> None:
    """Every tensor the loop all-reduces, by device; the real collective still runs."""
    real = dist.all_reduce

    def spy(tensor: torch.Tensor, *args, **kwargs):
        calls.append(str(tensor.device))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = spy


def _train_worker(rank: int, world: int, init: Path, root: Path, results: dict, interrupt: bool) -> None:
    from finetune.config.load import from_dict
    from finetune.data.sources import load_data
    from finetune.errors import Interrupted
    from finetune.model.build import build_model
    from finetune.runtime.resolve import resolve_runtime
    from finetune.training.loop import Trainer

    _join(rank, world, init)
    calls: list[str] = []
    _record_all_reduce(calls)
    raw = tiny_config(root / "data", root / "runs")
    raw["data"]["batch_size"] = 2
    raw["train"] = {"epochs": 2, "unfreeze_epoch": None, "feature_cache": "off"}
    cfg = from_dict(raw)
    torch.manual_seed(0)
    data = load_data(cfg.data)
    trainer = Trainer(
        cfg, data, build_model(cfg.model, 3), resolve_runtime(cfg), root / "run", ranks=Ranks(rank, world)
    )
    if interrupt and rank == 0:  # a real SIGTERM on rank 0 only, landing in its first evaluation
        evaluate = trainer.evaluate
        trainer.evaluate = lambda *a: (signal.raise_signal(signal.SIGTERM), evaluate(*a))[1]
    try:
        trainer.fit()
        outcome = "finished"
    except Interrupted:
        outcome = "interrupted"
    results[rank] = (outcome, calls, len(trainer.book.log.rows), trainer.schedule.steps_per_epoch)
    dist.destroy_process_group()


def _run_two(tmp_path: Path, interrupt: bool) -> dict:
    make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=2)
    results = mp.Manager().dict()
    mp.spawn(_train_worker, args=(2, tmp_path / "init", tmp_path, results, interrupt), nprocs=2, join=True)
    return dict(results)


def test_collectives_use_the_training_device_and_the_stop_vote_is_not_per_step(tmp_path):
    results = _run_two(tmp_path, interrupt=False)
    for rank in (0, 1):
        outcome, calls, epochs, steps = results[rank]
        assert outcome == "finished" and epochs == 2
        assert set(calls) == {"cpu"}, "every collective's tensor on the training device"
        votes = math.ceil(steps / VOTE_EVERY)
        per_epoch = 2 * votes + 2  # stop votes, finiteness checks (same steps), train sums, the epoch end
        assert steps == 30 and len(calls) == 2 * per_epoch, "a collective every 10 steps, not every step"


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_epoch(tmp_path):
    """Rank 0 alone gets SIGTERM during its evaluation: both ranks agree at the epoch's end
    and stop there, none waits in a collective the other never joins."""
    results = _run_two(tmp_path, interrupt=True)
    assert [results[r][:3:2] for r in (0, 1)] == [("interrupted", 1), ("interrupted", 1)]


def _vote_worker(rank: int, world: int, init: Path, results: dict) -> None:
    _join(rank, world, init)
    replicas = Replicas(Ranks(rank, world), torch.device("cpu"))
    stops = [replicas.stop_after(step, step == 24, requested=rank == 1 and step >= 3) for step in range(25)]
    results[rank] = stops.index(True)
    dist.destroy_process_group()


def test_ranks_agree_on_the_step_to_stop_at(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_vote_worker, args=(2, tmp_path / "init", results), nprocs=2, join=True)
    assert dict(results) == {0: VOTE_EVERY - 1, 1: VOTE_EVERY - 1}, "the first vote after rank 1's signal"


def _identical_worker(rank: int, world: int, init: Path, results: dict) -> None:
    """Three checks in turn: all alike; rank 1's BatchNorm mean off in two elements that cancel
    in a float sum; rank 1's average off by one ulp in one element. Then rank 1's BatchNorm
    statistics (float and int64) drift as a last forward leaves them, and rank 0's are shared."""
    _join(rank, world, init)
    replicas = Replicas(Ranks(rank, world), torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    outcomes = []
    for case in ("alike", "1.running_mean", "ema.0.weight"):
        tensors = {**model.state_dict(), **{f"ema.{k}": v for k, v in model.state_dict().items()}}
        tensors = {k: v.clone() for k, v in tensors.items()}
        if rank == 1 and case == "1.running_mean":
            tensors[case][:2] += torch.tensor([2**-10, -(2**-10)])
            assert tensors[case].sum() == 0, "the float sum cannot tell"
        if rank == 1 and case == "ema.0.weight":
            tensors[case][0, 0] = torch.nextafter(tensors[case][0, 0], torch.tensor(1.0))
        try:
            replicas.check_identical(tensors)
            outcomes.append("alike")
        except RuntimeError as exc:
            outcomes.append(str(exc))
    if rank == 1:
        model[1].running_var.add_(1.0)
        model[1].num_batches_tracked.add_(1)
    replicas.share_buffers(list(model.buffers()))
    replicas.check_identical(model.state_dict())
    results[rank] = outcomes
    dist.destroy_process_group()


def test_replicas_compare_every_parameter_buffer_and_average_bit_for_bit_and_share_buffers(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_identical_worker, args=(2, tmp_path / "init", results), nprocs=2, join=True)
    expected = ["alike"] + [
        f"weights differ between ranks: {name} on rank 1 is not rank 0's" for name in ("1.running_mean", "ema.0.weight")
    ]
    assert dict(results) == {0: expected, 1: expected}, "every rank raises, none waits in a collective"


def test_one_process_stops_at_the_step_the_signal_lands():
    replicas = Replicas(Ranks(), torch.device("cpu"))
    assert [replicas.stop_after(s, False, requested=s >= 3) for s in range(5)] == [False] * 3 + [True] * 2


@pytest.mark.parametrize("ranks", [Ranks(1, 2), Ranks()], ids=["two processes", "one process"])
def test_progress_saved_between_epochs_resumes_on_any_rank(ranks):
    saved = {"epoch": 1, "step": 0, "losses": [], "corrects": [], "seconds": 0.0, "world": 2}
    assert Progress.restored(saved, ranks) == Progress(epoch=1, world=ranks.world)


def test_progress_inside_an_epoch_gives_each_rank_its_own_steps():
    saved = {"epoch": 1, "step": 2, "losses": [[1.0, 2.0], [3.0, 4.0]], "corrects": [[1, 0], [0, 1]], "world": 2}
    progress = Progress.restored(saved, Ranks(1, 2))
    assert (progress.losses, progress.corrects, progress.step) == ([3.0, 4.0], [0, 1], 2)


def test_a_fill_stopped_midway_leaves_no_slot_pointing_at_a_missing_row():
    cache = empty_cache("fc", 6, torch.zeros(2, 4), "run", 0.0)
    needed = torch.ones(2, 6, dtype=torch.bool)

    def compute(index: torch.Tensor, flip: bool) -> torch.Tensor:
        if flip:
            raise StopRequested  # Ctrl-C during the flipped variants
        return torch.ones(len(index), 4)

    with pytest.raises(StopRequested):
        cache.fill(needed, compute, "run")
    assert isinstance(cache, FeatureCache)
    assert int(cache.slot.max()) < len(cache.train) and (cache.slot[1] < 0).all()
    assert len(cache.ledger.seconds) == len(cache.train), "the ledger prices the rows that exist"
    assert cache.fill(needed, lambda index, flip: torch.full((len(index), 4), float(flip)), "run") > 0
    assert torch.equal(cache.train_inputs(torch.arange(6), torch.ones(6, dtype=torch.bool)), torch.ones(6, 4))


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.config.load import from_dict
    from finetune.runs.writer import RunWriter

    cfg = from_dict({"log": {"tensorboard": True}})
    for attempt in range(2):  # the first attempt is killed before last.pt: resume starts at step 0
        writer = RunWriter(tmp_path / "run")
        writer.start(cfg, steps_done=0)
        for step in (1, 2, 3):
            writer.step(step, loss=float(attempt), lrs={})
        writer.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Scalars("train/step_loss")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 1.0), (3, 1.0)]
