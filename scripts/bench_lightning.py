"""The Lightning peer of issue 24's speed check: the script a competent Lightning user writes for
the job `configs/bench_mobilenet_v2_128.yaml` gives `finetune`.

MobileNetV2 with ImageNet weights (the offline file, ../shared/weights/README.md) and a new
10-class head; `BackboneFinetuning` trains the head alone, then adds the backbone at its own LR
from the unfreeze epoch on (kept constant, as the config's is); bf16-mixed autocast, channels_last
model and inputs; the same stratified CIFAR-10 subsets `finetune` draws (its `choose_subset`, on
the same image folder), decoded and augmented per sample by DataLoader workers. Prints each
epoch's wall time (training and its validation, as finetune's `epoch_seconds` counts) and the
validation's own, and writes them as JSON to --out.

Needs Lightning, which pulls no torch beside the installed one (`pip install -e ".[peer]"`,
or with no resolver at all: `pip install --no-deps lightning lightning-utilities torchmetrics`).

    .venv/bin/python scripts/bench_lightning.py                     # 1000 / 500 images, 128 px, 3 epochs
    .venv/bin/python scripts/bench_lightning.py --train 64 --val 64 --size 32 --epochs 2   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from finetune.data.sources import choose_subset

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as the weights expect
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default=str(SHARED / "data" / "cifar10"), help="image folder with train/ and val/ or test/"
    )
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2-b0353104.pth"))
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unfreeze-epoch", type=int, default=1, help="head-only epochs before the backbone joins")
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument("--lr-backbone", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split-seed", type=int, default=42, help="draws the subsets, as finetune's data.split_seed")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out", default="bench_results/lightning.json")
    return p.parse_args(argv)


class Classifier(L.LightningModule):
    """MobileNetV2's ImageNet features as `backbone` (what BackboneFinetuning freezes), a new head."""

    def __init__(self, args: argparse.Namespace, classes: int):
        super().__init__()
        net = torchvision.models.mobilenet_v2()
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        self.backbone = net.features
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(net.last_channel, classes))
        self.args = args
        if args.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.backbone(x), 1).flatten(1))

    def on_after_batch_transfer(self, batch: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        x, y = batch
        return [x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x, y]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]  # the head: the callback adds the backbone
        return OPTIMIZERS[self.args.optimizer](trainable, lr=self.args.lr_head, weight_decay=self.args.weight_decay)


class FrozenBNFinetuning(BackboneFinetuning):
    """BackboneFinetuning whose frozen backbone keeps its BatchNorm frozen too (the config's
    `freeze_bn`): by default Lightning trains it, which backpropagates through the whole backbone."""

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)


def constant(epoch: int) -> float:
    """The backbone LR's factor per epoch: 1, as the config's constant schedule (Lightning's is 1.5)."""
    return 1.0


class EpochTimer(Callback):
    """Wall seconds of each epoch (its training and validation) and of its validation alone."""

    def __init__(self, unfreeze_epoch: int):
        self.unfreeze_epoch = unfreeze_epoch
        self.epochs: list[dict] = []
        self.started = self.val_started = 0.0
        self.val_seconds: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.val_seconds = time.perf_counter(), None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_seconds = time.perf_counter() - self.val_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.val_seconds is None:
            raise RuntimeError("validation did not run inside the training epoch: the epoch time would leave it out")
        epoch = trainer.current_epoch + 1
        record = {
            "epoch": epoch,
            "stage": "head" if epoch <= self.unfreeze_epoch else "backbone",
            "epoch_seconds": time.perf_counter() - self.started,
            "val_seconds": self.val_seconds,
            "val_acc": float(trainer.callback_metrics["val_acc"]),
        }
        self.epochs.append(record)
        print(
            f"lightning epoch {epoch} ({record['stage']}): {record['epoch_seconds']:.2f} s "
            f"(validation {record['val_seconds']:.2f} s), val_acc {record['val_acc']:.4f}",
            flush=True,
        )


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int]:
    """Train and val loaders over finetune's subsets of the image folder, and the class count."""
    root = Path(args.data)
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    resize, norm = transforms.Resize((args.size, args.size)), transforms.Normalize(MEAN, STD)
    train = datasets.ImageFolder(
        root / "train", transforms.Compose([resize, transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    )
    val = datasets.ImageFolder(val_dir, transforms.Compose([resize, transforms.ToTensor(), norm]))
    train_idx = choose_subset(np.array(train.targets), args.train, "stratified", args.split_seed)
    val_idx = choose_subset(np.array(val.targets), args.val, "stratified", args.split_seed + 1)
    kw = {"batch_size": args.batch_size, "num_workers": args.workers, "persistent_workers": args.workers > 0}
    train_loader = DataLoader(Subset(train, train_idx.tolist()), shuffle=True, **kw)
    return train_loader, DataLoader(Subset(val, val_idx.tolist()), **kw), len(train.classes)


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    train_loader, val_loader, classes = loaders(args)
    timer = EpochTimer(args.unfreeze_epoch)
    finetuning = FrozenBNFinetuning(
        unfreeze_backbone_at_epoch=args.unfreeze_epoch, lambda_func=constant, backbone_initial_lr=args.lr_backbone
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[timer, finetuning],
    )
    fit_started = time.perf_counter()
    trainer.fit(Classifier(args, classes), train_loader, val_loader)
    result = {
        "lightning": L.__version__,
        "choice": f"{args.precision} {'channels_last' if args.channels_last else 'contiguous'}, {args.workers} workers",
        "epochs": timer.epochs,
        "fit_seconds": time.perf_counter() - fit_started,
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
