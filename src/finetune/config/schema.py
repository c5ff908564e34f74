"""The config schema: sections as dataclasses with their defaults, and how a config is written.

Reading a file and `--set` overrides live in load.py, value checks in check.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


@dataclass
class CropConfig:
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])


@dataclass
class JitterConfig:
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class AugmentConfig:
    """Training-time augmentation of whole batches, per-sample (augment.py); eval never augments."""

    random_resized_crop: CropConfig | None = None
    color_jitter: JitterConfig | None = None
    trivial_augment: bool = False
    rand_augment: bool = False
    random_erasing: float = 0.0  # probability per image
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0

    @property
    def active(self) -> bool:
        return any(v not in (None, False, 0.0) for v in dataclasses.asdict(self).values())


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "imagefolder", "digits", "csv"] = "cifar10"
    root: str = "data"
    csv: str | None = None  # dataset csv: a CSV of image paths (relative to root) and labels
    file_col: str = "file"
    label_col: str = "label"
    split_col: str | None = None  # values train / val; null = a stratified split by val_fraction
    val_fraction: float = 0.2
    folds: int | None = None  # k-fold: validate on fold `fold` of the training images
    fold: int = 0
    download: bool = True
    train_size: int | None = 3000
    val_size: int | None = 800
    subset: Literal["stratified", "random", "first"] = "stratified"
    train_classes: list[str | int] | None = None
    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 0
    hflip: bool = True
    memory_budget_mb: int = 4096
    split_seed: int = 42  # draws subsets and the digits split; the run's `seed` draws the training
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    weights: str | None = "DEFAULT"


@dataclass
class StageConfig:
    """One step of gradual unfreezing: `modules` train from epoch `epoch + 1` at `lr` or, with
    `after: plateau`, once the stage before has settled: `checkpoint.monitor` has not improved
    by more than `min_delta` for `patience` of its epochs (after at least `min_epochs` of
    them), or it has run `max_epochs`. `restore_best` first puts back the weights of the stage
    before's best epoch."""

    epoch: int | None = None  # with `after: epoch`; null = 0
    modules: list[str] = field(default_factory=list)
    lr: float | None = None
    name: str | None = None
    after: Literal["epoch", "plateau"] = "epoch"
    patience: int = 1
    min_delta: float = 0.0
    min_epochs: int = 1
    max_epochs: int | None = None
    restore_best: bool = False

    @property
    def on_plateau(self) -> bool:
        return self.after == "plateau"


@dataclass
class SchedulerConfig:
    name: Literal["constant", "cosine", "linear", "step", "onecycle"] = "constant"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: float = 1.0
    gamma: float = 0.1


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # null = off
    min_delta: float = 0.0


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, which validation and best.pt use (ema.py)."""

    decay: float = 0.999
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) at update n, so early weights fade fast


@dataclass
class TrainConfig:
    epochs: int = 3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_head: float = 1.0e-3
    lr_backbone: float = 1.0e-4
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # weight_decay on norm layers and biases too (off, as timm and HF)
    freeze_backbone: bool = True
    unfreeze_epoch: int | None = 1
    freeze_bn: bool = True
    class_weights: Literal["none", "auto"] | list[float] | dict[str | int, float] = "auto"
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None  # clip the trainable parameters' global grad norm; null = off
    accumulate_steps: int = 1  # batches whose gradients make one optimizer step
    ema: EmaConfig | None = None  # null = off
    feature_cache: Literal["auto", "off"] = "auto"
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the train step; auto: where measured to pay back
    scale_lr: Literal["none", "linear"] = "none"  # under torchrun: linear multiplies every LR by the world size
    unfreeze: list[StageConfig] | None = None
    layer_lr_decay: float = 1.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    unfreeze_warmup_epochs: float = 0.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class CheckpointConfig:
    """`monitor` picks best.pt's epoch (val_loss: lowest wins). `judge` says what a run is judged
    by in tune and compare: `last_stage`, the best monitored epoch among those in which every
    stage trains (the last stage the run reached), since head-only epochs are the same whatever
    the schedule and a plateau run's best epoch may be one of them; `best`, its best epoch; or
    `final`, its last. Equal judged values are ordered by the final epoch's value."""

    monitor: Literal["val_acc", "val_loss", "val_balanced_acc"] = "val_acc"
    judge: Literal["last_stage", "best", "final"] = "last_stage"


@dataclass
class LogConfig:
    tensorboard: bool = False  # scalars per step and epoch, stage changes, confusion matrix: <run>/tensorboard


@dataclass
class Config:
    name: str = "run"
    seed: int = 42
    out_dir: str = "runs"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; with `train.unfreeze` the shorthand keys it replaces are left out."""
        raw = dataclasses.asdict(self)
        if self.train.unfreeze is not None:
            for key in SHORTHAND_KEYS:
                del raw["train"][key]
        else:
            del raw["train"]["unfreeze"]
        return raw


SHORTHAND_KEYS = ("freeze_backbone", "unfreeze_epoch")


def stage_name(stage: StageConfig) -> str:
    """A stage's parameter-group name: its `name`, else its modules joined by '+'."""
    return stage.name or "+".join(stage.modules)


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; values inside a section stay whole."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
