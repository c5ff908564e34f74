"""The config schema: sections as dataclasses with their defaults, and how a config is written.

Reading a file and `--set` overrides live in load.py, value checks in check.py.
Each key's comment (on its line, or the comment lines right above it) is its meaning in the
generated docs/reference/config.md: `scripts/gen_reference.py` rewrites that page.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


@dataclass
class CropConfig:
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # area share of the image a crop keeps, [low, high]
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # aspect ratio range of a crop, [low, high]


@dataclass
class JitterConfig:
    brightness: float = 0.0  # as torchvision's ColorJitter: 0 = off
    contrast: float = 0.0  # 0 = off
    saturation: float = 0.0  # 0 = off
    hue: float = 0.0  # 0 = off


@dataclass
class AugmentConfig:
    """Training-time augmentation of whole batches, per-sample (augment.py); eval never augments."""

    random_resized_crop: CropConfig | None = None  # e.g. {scale: [0.35, 1], ratio: [0.75, 1.333]}; null = off
    # e.g. {brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.05}; null = off
    color_jitter: JitterConfig | None = None
    trivial_augment: bool = False  # TrivialAugment, one op drawn per image
    rand_augment: bool = False  # RandAugment: 2 distinct ops per image at magnitude 10
    random_erasing: float = 0.0  # probability per image
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0  # Beta alpha; 0 = off

    @property
    def active(self) -> bool:
        return any(v not in (None, False, 0.0) for v in dataclasses.asdict(self).values())


@dataclass
class DataConfig:
    # where images come from: torchvision's CIFAR-10, an image folder, sklearn's digits, a CSV
    dataset: Literal["cifar10", "imagefolder", "digits", "csv"] = "cifar10"
    # cifar10: download/cache dir; imagefolder: dir with train/ and val/ (or test/); csv: paths' base
    root: str = "data"
    csv: str | None = None  # dataset csv: a CSV of image paths (relative to root) and labels
    file_col: str = "file"  # csv: column of image paths, relative to root (absolute paths work too)
    label_col: str = "label"  # csv: column of labels, names or integers (read as text)
    label_sep: str = " "  # csv with task multilabel: what joins an image's labels in label_col; an empty cell: no label
    # csv: the class list, fixing its order; null = every label seen in training, sorted
    classes: list[str] | None = None
    split_col: str | None = None  # values train / val; null = a stratified split by val_fraction
    val_fraction: float = 0.2  # csv without split_col: share of each class that validates, drawn by split_seed
    folds: int | None = None  # k-fold: validate on fold `fold` of the training images
    fold: int = 0  # with folds: the fold that validates, 0 .. folds-1
    download: bool = True  # cifar10: download into root when it is not there
    train_size: int | None = 3000  # training images drawn per `subset`, seeded by split_seed; null = all
    val_size: int | None = 800  # validation images, drawn as train_size; null = all
    subset: Literal["stratified", "random", "first"] = "stratified"  # how train_size / val_size images are drawn
    # restrict TRAINING to these classes (names or indices); validation keeps all
    train_classes: list[str | int] | None = None
    image_size: int = 224  # images are resized to this square size
    batch_size: int = 32  # images per batch (per process under torchrun)
    # decoding threads in memory, DataLoader worker processes when streaming: auto = one per core;
    # 0 = none, as in PyTorch: images load in the main process
    num_workers: int | Literal["auto"] = "auto"
    hflip: bool = True  # random horizontal flip in training
    # shuffle: each image once per epoch; balanced: as many draws with replacement, classes
    # equally likely (1 / class count per image), for imbalanced data; train.class_weights auto then stays off
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    memory_budget_mb: int = 4096  # image data decoded larger than this is streamed from disk instead of held
    split_seed: int = 42  # draws subsets and the digits split; the run's `seed` draws the training
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # any torchvision classification model name, or timm/<name>
    # DEFAULT | a torchvision weights name | none (random init) | path/to/state_dict.pth
    weights: str | None = "DEFAULT"


@dataclass
class StageConfig:
    """One step of gradual unfreezing: `modules` train from epoch `epoch + 1` at `lr` or, with
    `after: plateau`, once the stage before has settled: `checkpoint.monitor` has not improved
    by more than `min_delta` for `patience` of its epochs (after at least `min_epochs` of
    them), or it has run `max_epochs`. `restore_best` first puts back the weights of the stage
    before's best epoch."""

    epoch: int | None = None  # with `after: epoch`; null = 0
    # dotted names from model.named_modules() (layer4, features.17), or backbone: the rest
    modules: list[str] = field(default_factory=list)
    lr: float | None = None  # the stage's LR; null = the stage before's times train.layer_lr_decay
    name: str | None = None  # its parameter group's name; null = its modules joined by '+'
    # epoch: start after `epoch`; plateau: once the stage before has settled
    after: Literal["epoch", "plateau"] = "epoch"
    patience: int = 1  # plateau: epochs without improvement of checkpoint.monitor
    min_delta: float = 0.0  # plateau: an improvement must exceed this
    min_epochs: int = 1  # plateau: the stage before runs at least this many epochs
    max_epochs: int | None = None  # plateau: ... and at most this many; null = no cap
    restore_best: bool = False  # first put back the weights of the stage before's best epoch

    @property
    def on_plateau(self) -> bool:
        return self.after == "plateau"


@dataclass
class SchedulerConfig:
    # the LR curve, stepped per optimizer step; every group follows it from its own base LR
    name: Literal["constant", "cosine", "linear", "step", "onecycle"] = "constant"
    warmup_epochs: float = 0.0  # the warmup at the run's start; fractions allowed; onecycle with 0: 30% of the run
    min_lr_ratio: float = 0.0  # cosine / linear / onecycle end at base LR x this
    step_epochs: float = 1.0  # step: multiply by gamma every step_epochs
    gamma: float = 0.1  # step: the factor


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # epochs without improvement of checkpoint.monitor, in the last stage; null = off
    min_delta: float = 0.0  # an improvement must exceed this


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, which validation and best.pt use (ema.py)."""

    decay: float = 0.999  # the average's decay per optimizer step
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) at update n, so early weights fade fast


@dataclass
class TrainConfig:
    epochs: int = 3  # the whole run's length (a cap with plateau stages)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # fused kernels on CPU and CUDA
    lr_head: float = 1.0e-3  # the new head's LR
    lr_backbone: float = 1.0e-4  # the backbone's LR once it unfreezes (the first stage's with train.unfreeze)
    weight_decay: float = 0.0  # skips norm layers and biases unless decay_norm_and_bias
    decay_norm_and_bias: bool = False  # weight_decay on norm layers and biases too (off, as timm and HF)
    freeze_backbone: bool = True  # shorthand for one `backbone` stage (leave out with `unfreeze`)
    unfreeze_epoch: int | None = None  # the backbone trains from epoch unfreeze_epoch + 1; null = never unfreeze
    freeze_bn: bool = True  # BatchNorm (and dropout) of a frozen module stay in eval mode until its stage
    # auto = inverse class frequency of the training split (multilabel: each label's positive weight,
    # negatives / positives clipped to [1, 100]); or [w0, ...] or {class: w}
    class_weights: Literal["none", "auto"] | list[float] | dict[str | int, float] = "auto"
    label_smoothing: float = 0.0  # cross-entropy label smoothing (multilabel: each target moves eps/2 toward 0.5)
    # cross_entropy (multilabel: binary cross-entropy on each label); focal: its focal form (focal_gamma)
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = 2.0  # loss focal: (1 - p_t)^gamma scales each term; 0 = the plain loss
    grad_clip_norm: float | None = None  # clip the trainable parameters' global grad norm; null = off
    accumulate_steps: int = 1  # batches whose gradients make one optimizer step
    ema: EmaConfig | None = None  # e.g. {decay: 0.999}: validation and best.pt use the weight average; null = off
    # auto: frozen epochs train on cached activations of the frozen bottom
    feature_cache: Literal["auto", "off"] = "auto"
    # auto: measured with precision: auto; else pinned
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the train step; auto: where measured to pay back
    scale_lr: Literal["none", "linear"] = "none"  # under torchrun: linear multiplies every LR by the world size
    # stages, instead of freeze_backbone / unfreeze_epoch; null = the shorthand
    unfreeze: list[StageConfig] | None = None
    layer_lr_decay: float = 1.0  # a stage without `lr` gets the stage before's LR times this
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    unfreeze_warmup_epochs: float = 0.0  # a group that joins at an unfreeze warms up over this many epochs
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


Monitor = Literal["auto", "val_acc", "val_loss", "val_balanced_acc", "val_map", "val_f1_micro", "val_f1_macro"]


@dataclass
class CheckpointConfig:
    """`monitor` picks best.pt's epoch (val_loss: lowest wins). `judge` says what a run is judged
    by in tune and compare: `last_stage`, the best monitored epoch among those in which every
    stage trains (the last stage the run reached), since head-only epochs are the same whatever
    the schedule and a plateau run's best epoch may be one of them; `best`, its best epoch; or
    `final`, its last. Equal judged values are ordered by the final epoch's value. `keep` says
    what a run keeps once it ends: `all`; `best` drops last.pt (resume can no longer extend the
    run); `results` drops best.pt too, keeping config.yaml, results.csv and summary.json (what
    compare and tune's report read); `auto` is `best` where nothing could continue the run (a
    tune trial, a pruned or early-stopped run), else `all`."""

    # what picks best.pt (lowest val_loss, else highest); auto: val_acc, multilabel val_map;
    # val_map / val_f1_micro / val_f1_macro: multilabel only
    monitor: Monitor = "auto"
    # what tune and compare judge a run by: last_stage (its best epoch where every stage trains), best, final
    judge: Literal["last_stage", "best", "final"] = "last_stage"
    # what a run keeps once it ends: auto, all, best (drops last.pt), results (drops best.pt too)
    keep: Literal["auto", "all", "best", "results"] = "auto"


@dataclass
class LogConfig:
    tensorboard: bool = False  # scalars per step and epoch, stage changes, confusion matrix: <run>/tensorboard


@dataclass
class MlflowConfig:
    """An MLflow tracking server that each run (and a sweep or tune study, as a parent run) logs to."""

    uri: str | None = None  # the tracking server, e.g. http://mlflow:5000; null = $MLFLOW_TRACKING_URI
    # null = $MLFLOW_EXPERIMENT_NAME, else the config's name (a sweep: its dir's name; tune: the study's)
    experiment: str | None = None
    log_model: bool = False  # also log best.pt exported as ONNX (finetune export) with the run's files


@dataclass
class TrackingConfig:
    mlflow: MlflowConfig | None = None  # e.g. {uri: http://mlflow:5000} (or {} to read the env); null = off


@dataclass
class Config:
    # multiclass: one label per image (softmax); multilabel: any number (sigmoid per label, data.dataset csv)
    task: Literal["multiclass", "multilabel"] = "multiclass"
    name: str = "run"  # the run's name: its folder is <out_dir>/<name> (-2, -3 ... if taken)
    seed: int = 42  # draws the head's init, shuffling, flips, dropout, augmentation
    out_dir: str = "runs"  # where run dirs (and the feature cache) go
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: measured on this machine, model and size; else pinned
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        """`checkpoint.monitor: auto` becomes the task's metric, so config.yaml says what picked best.pt."""
        if self.checkpoint.monitor == "auto":
            self.checkpoint.monitor = default_monitor(self.task)

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
MULTILABEL_MONITORS = ("val_map", "val_f1_micro", "val_f1_macro")  # metrics only a multilabel run has


def default_monitor(task: str) -> str:
    """`checkpoint.monitor: auto` for the task."""
    return "val_map" if task == "multilabel" else "val_acc"


def stage_name(stage: StageConfig) -> str:
    """A stage's parameter-group name: its `name`, else its modules joined by '+'."""
    return stage.name or "+".join(stage.modules)


def flatten(raw: dict[str, Any], deep: bool = False) -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; values inside a section stay whole, unless
    `deep` (MLflow params): every non-empty dict down, {"a": {"b": {"c": 1}}} -> {"a.b.c": 1}."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and (value or not deep):
            inner = flatten(value, deep) if deep else value
            flat.update({f"{key}.{k}": v for k, v in inner.items()})
        else:
            flat[key] = value
    return flat


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
