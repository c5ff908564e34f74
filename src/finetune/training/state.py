"""Training progress and the checkpoints that carry it: best.pt (portable) and last.pt (resumable).

Every random draw of an epoch (order, flips, augmentation) is a function of (seed, epoch,
step), and the torch RNG (dropout) is saved with last.pt, so a resumed run continues
bit-identically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.model.build import BuiltModel
from finetune.model.freezing import load_optimizer_state
from finetune.runtime.distributed import Ranks
from finetune.training.ema import WeightAverage


@dataclass
class Progress:
    """Where training stands: completed epochs and, mid-epoch, the steps done so far."""

    epoch: int = 0
    step: int = 0
    losses: list = field(default_factory=list)  # per step of this rank; in last.pt one list per rank under DDP
    corrects: list = field(default_factory=list)
    seconds: float = 0.0
    world: int = 1  # processes that trained the steps of a part-done epoch

    @classmethod
    def restored(cls, saved: dict[str, Any], ranks: Ranks) -> Progress:
        """This rank's progress from last.pt. Between epochs nothing is per rank; inside an
        epoch trained by another number of processes the epoch starts over."""
        progress = cls(**saved)
        if not progress.step:
            return cls(epoch=progress.epoch, world=ranks.world)
        if progress.world != ranks.world:
            print(
                f"the run stopped inside epoch {progress.epoch + 1} with {progress.world} process(es), "
                f"now {ranks.world}: that epoch starts over (its first steps stay in the weights)"
            )
            return cls(epoch=progress.epoch, world=ranks.world)
        if ranks.many:
            progress.losses, progress.corrects = progress.losses[ranks.rank], progress.corrects[ranks.rank]
        return progress


def portable_state(
    cfg: Config,
    built: BuiltModel,
    class_names: list[str],
    epoch: int,
    metrics: dict[str, float],
    weights: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """What best.pt holds: enough to rebuild and use the model with no config at hand.

    `weights`: the model's, or in best.pt the ones validation scored (the EMA when it is on).
    """
    return {
        "format": 1,
        "task": cfg.task,
        "arch": cfg.model.arch,
        "torchvision_weights": built.torchvision_weights,
        "head_name": built.head_name,
        "class_names": list(class_names),
        "image_size": cfg.data.image_size,
        "mean": list(built.mean),
        "std": list(built.std),
        "epoch": epoch,
        "metrics": metrics,
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in weights.items()},
    }


def resume_state(
    portable: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    book: dict[str, Any],
    runtime: dict[str, Any],
    device: torch.device,
    ema: WeightAverage | None,
) -> dict[str, Any]:
    """What last.pt holds: best.pt's content (the live weights) plus everything an exact
    resume restores, the weight average and its update count included."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        **portable,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
        "progress": asdict(progress),
        "runtime": runtime,
        "ema": ema.state_dict() if ema is not None else None,
        **book,
    }


def restore_training(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: WeightAverage | None,
) -> None:
    """Weights, optimizer (by parameter name), loss scale, the RNG and the weight average, as
    last.pt saved them; an average first asked for on resume starts from the weights."""
    model.load_state_dict(state["model"])
    load_optimizer_state(optimizer, state["optimizer"], [n for n, _ in model.named_parameters()])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    elif ema is not None:
        ema.restart()
    torch.set_rng_state(state["rng"]["cpu"])
    device = next(model.parameters()).device
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
