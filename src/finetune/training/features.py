"""Feature cache: the activation entering the lowest training module, computed once per image
and flip variant.

While everything below a module is frozen and in eval mode, that module's input depends only
on the image and the flip, so the part above can train on stored activations. Since each
epoch's flips are a function of (seed, epoch), the variants a stage will use are known up
front: exactly those are computed, in the stage's first epoch, and its later epochs skip the
frozen bottom. The cut is the head while only the head trains (any classifier whose head is
its last Linear), or a backbone module during gradual unfreezing, for models whose forward
runs their children as a chain (torchvision's ResNet, MobileNet, EfficientNet, RegNet,
ConvNeXt, VGG ...): `CutModel.exact` checks that on a random batch, and where it fails the
full forward runs. Head-input caches are also kept on disk, keyed by everything that
determines them, so later runs and other configs reuse them; each keeps a ledger of what its
activations cost, so a run that reuses them is charged their cost (compare's cold cost).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data.batching import epoch_plan
from finetune.errors import FinetuneError
from finetune.model.schedule import Schedule
from finetune.runs.checkpoint import load_checkpoint, save_checkpoint
from finetune.runtime.distributed import SINGLE, Ranks, shard
from finetune.runtime.resolve import Runtime

CACHE_FORMAT = 5  # part of the disk key: a new layout or batch transform never reads an old file


@dataclass
class FeatureCost:
    """What the cached activations an epoch uses for the first time cost: this run (`paid`, part
    of its epoch's time unless a resume found them done) and the runs that computed the rest
    (`reused`: time as run plus those is the cold cost)."""

    paid: float = 0.0
    reused: float = 0.0


@dataclass
class Ledger:
    """Which run computed each cached activation and in how many seconds: a run that reuses
    another's activations is charged their cost, a resumed run never its own."""

    payers: list[str] = field(default_factory=list)  # the run dirs that computed rows
    payer: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (K,) into payers
    seconds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))  # (K,) per row
    val_payer: int = -1
    val_seconds: float = 0.0

    def index(self, payer: str) -> int:
        """`payer`'s number, given it on its first payment."""
        if payer not in self.payers:
            self.payers.append(payer)
        return self.payers.index(payer)

    def add(self, payer: str, rows: int, seconds: float) -> None:
        """`rows` new train rows computed by `payer` in `seconds`, each charged an equal share."""
        self.payer = torch.cat([self.payer, torch.full((rows,), self.index(payer))])
        self.seconds = torch.cat([self.seconds, torch.full((rows,), seconds / rows, dtype=torch.float64)])

    def charged(self, rows: torch.Tensor, payer: str, val: bool) -> FeatureCost:
        """What these train rows (and the validation activations) cost `payer` itself and the
        other runs that computed them: read from the ledger, not timed now, so a run resumed
        after its features were computed is charged as the uninterrupted run was."""
        mine = self.payers.index(payer) if payer in self.payers else -1
        own = self.payer[rows] == mine
        val_cost = self.val_seconds if val else 0.0
        own_val, other_val = (val_cost, 0.0) if self.val_payer == mine else (0.0, val_cost)
        return FeatureCost(
            float(self.seconds[rows][own].sum()) + own_val, float(self.seconds[rows][~own].sum()) + other_val
        )

    def state(self) -> dict[str, Any]:
        return {**vars(self), "payers": list(self.payers)}


@dataclass
class FeatureCache:
    cut: str
    slot: torch.Tensor  # (2, N) long: row of `train` holding (flip variant, image), -1 if not computed
    train: torch.Tensor  # (K, ...) activations, on the training device like `slot`
    val: torch.Tensor  # (M, ...)
    ledger: Ledger

    def train_inputs(self, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        return self.train[self.slot[flips.long(), index]]

    def fill(self, needed: torch.Tensor, compute: Callable[[torch.Tensor, bool], torch.Tensor], payer: str) -> float:
        """Compute the needed variants not yet held; return the seconds that took (0 if none).

        Slots point at rows only once the rows exist: a fill stopped by Ctrl-C leaves the
        cache as it was (a sweep keeps caches across runs, so a dangling slot would poison
        every later run). `compute` returns only once the device has finished, so the time is its.
        """
        missing = needed.to(self.slot.device) & (self.slot < 0)
        paid = 0.0
        for variant in (0, 1):
            index = missing[variant].nonzero().flatten()
            if len(index):
                started = time.perf_counter()
                rows = compute(index, bool(variant))
                seconds = time.perf_counter() - started
                self.slot[variant, index] = torch.arange(len(index), device=self.slot.device) + len(self.train)
                self.train = torch.cat([self.train, rows])
                self.ledger.add(payer, len(index), seconds)
                paid += seconds
        return paid


def empty_cache(cut: str, n: int, val: torch.Tensor, payer: str, seconds: float) -> FeatureCache:
    """A cache holding only the validation activations, which `payer` computed in `seconds`."""
    ledger = Ledger()
    ledger.val_payer, ledger.val_seconds = ledger.index(payer), seconds
    return FeatureCache(cut, torch.full((2, n), -1, dtype=torch.long, device=val.device), val[:0], val, ledger)


@dataclass
class CacheDecision:
    """Whether (and where) a stage's epochs train on cached activations, and why."""

    cut: CutModel | None
    epochs: range  # the stage's epochs from the one asked about
    note: str


def decide_cache(
    cfg: Config, schedule: Schedule, model: nn.Module, epoch: int, n_train: int, n_val: int, runtime: Runtime
) -> CacheDecision:
    """The one rule `train` and `plan` share: the schedule's cut, if the model is a chain
    there and the stage's activations fit in `data.memory_budget_mb`."""
    epochs = schedule.stage_epochs(epoch)
    if cfg.data.augment.active:
        return CacheDecision(None, epochs, "off: data.augment changes images per sample, which no cache can key")
    name = schedule.cache_cut(epoch)
    if name is None:
        why = "train.feature_cache off" if cfg.train.feature_cache == "off" else "the whole backbone trains"
        why = why if cfg.train.freeze_bn else "freeze_bn is false, so frozen BatchNorm is in train mode"
        return CacheDecision(None, epochs, f"off: {why}")
    cut = CutModel(model, name, schedule.head_name)
    if name == schedule.head_name:
        return CacheDecision(cut, epochs, "head input")
    device = next(model.parameters()).device
    shape = cut.exact(cfg.data.image_size, device)
    if shape is None:
        return CacheDecision(None, epochs, f"off: the model's forward is not a chain of modules at {name}")
    # the stage's draws, for the budget: shuffled ones bound a balanced sampler's too (epoch_plan)
    needed = needed_variants(n_train, cfg.seed, epochs, cfg.data.hflip)
    megabytes = (int(needed.sum()) + n_val) * shape.numel() * (4 if runtime.infer_dtype is None else 2) / 2**20
    if megabytes > cfg.data.memory_budget_mb:
        note = f"off: {name} input needs {megabytes:.0f} MB, over data.memory_budget_mb={cfg.data.memory_budget_mb}"
        return CacheDecision(None, epochs, note)
    return CacheDecision(cut, epochs, f"{name} input, {megabytes:.0f} MB")


class CachePlanner:
    """`decide_cache` once per stage, for `train` and `plan` alike: a stage's cut and budget
    are decided at its first epoch and hold for the rest of it."""

    def __init__(self, cfg: Config, schedule: Schedule, model: nn.Module, n_train: int, n_val: int, runtime: Runtime):
        self.cfg, self.schedule, self.model, self.runtime = cfg, schedule, model, runtime
        self.sizes = n_train, n_val
        self.current: CacheDecision | None = None
        self.stage = ""

    def decide(self, epoch: int) -> CacheDecision:
        """Decided as at the stage's first epoch, whichever epoch asks (a resumed run decides as
        the uninterrupted one did); a plateau stage may start before the decided range ends, so
        a new stage decides anew."""
        stage = self.schedule.stage(epoch)
        if self.current is None or epoch not in self.current.epochs or stage != self.stage:
            first = max(g.epoch for g in self.schedule.active(epoch)) + 1
            self.current = decide_cache(self.cfg, self.schedule, self.model, first, *self.sizes, self.runtime)
            self.stage = stage
        return self.current


def needed_variants(
    n: int, seed: int, epochs: Iterable[int], hflip: bool, ranks: Ranks = SINGLE, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(2, N) mask of the (flip, image) pairs that these epochs will draw (on this rank);
    `weights`: the balanced sampler's (epoch_plan)."""
    needed = torch.zeros(2, n, dtype=torch.bool)
    for epoch in epochs:
        order, flips = epoch_plan(n, seed, epoch, hflip, weights)
        mine = shard(order, ranks)
        needed[flips[mine].long(), mine] = True
    return needed


class _Reached(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


class CutModel(nn.Module):
    """A model split at module `cut`: `bottom(x)` is the activation entering it, `top(a)` (the
    forward, so DDP can wrap it) the logits computed from there on."""

    def __init__(self, model: nn.Module, cut: str, head_name: str):
        super().__init__()
        self.model, self.cut, self.head_name = model, cut, head_name
        self.stubs = [] if cut == head_name else _bottom_modules(model, cut)

    @property
    def module(self) -> nn.Module:
        return self.model.get_submodule(self.cut)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """The training step's call: activations were stored at the inference precision, which
        may be 16-bit while training runs in fp32 (autocast lowers them again where it runs)."""
        return self.top(a.float())

    def bottom(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, args: tuple) -> None:
            captured.append(args[0].detach())
            raise _Reached

        hook = self.module.register_forward_pre_hook(capture)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            hook.remove()
        return captured[0]

    def top(self, a: torch.Tensor) -> torch.Tensor:
        if not self.stubs:
            return self.module(a)
        with _replaced(self.model, self.stubs, a):
            return self.model(a)

    def exact(self, size: int, device: torch.device) -> torch.Size | None:
        """The activation's per-image shape if bottom-then-top equals the full forward on a
        random batch (eval mode, fp32), else None: then the model is no chain at the cut."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # global RNG untouched
                x = x.to(device).contiguous(memory_format=torch.channels_last)
                a = self.bottom(x)
                same = torch.allclose(self.top(a), self.model(x), rtol=1e-4, atol=1e-5)
        except (RuntimeError, TypeError, ValueError, AssertionError, IndexError):
            same = False
        finally:
            self.model.train(training)
        return a.shape[1:] if same else None


def _bottom_modules(model: nn.Module, cut: str) -> list[str]:
    """The largest modules registered before `cut` and not holding it, in order."""
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == cut:
                return True
            if cut.startswith(full + "."):
                return walk(child, full + ".")
            found.append(full)
        return False

    walk(model, "")
    return found


class _Replay(nn.Module):
    def __init__(self, activation: torch.Tensor):
        super().__init__()
        self.activation = activation

    def forward(self, *_args: object) -> torch.Tensor:
        return self.activation


@contextlib.contextmanager
def _replaced(model: nn.Module, names: list[str], activation: torch.Tensor) -> Iterator[None]:
    """The first bottom module returns `activation`, the others pass it through."""
    originals = {}
    for i, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals[name] = (parent, attr, parent._modules[attr])
        parent._modules[attr] = _Replay(activation) if i == 0 else nn.Identity()
    try:
        yield
    finally:
        for parent, attr, module in originals.values():
            parent._modules[attr] = module


def extract(cut: CutModel, runtime: Runtime, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """`cut.bottom` for every batch, in eval mode without gradients."""
    cut.model.eval()
    with torch.no_grad(), runtime.autocast(inference=True):
        return torch.cat([cut.bottom(x) for x in batches])


def cache_key(model: nn.Module, head_name: str, data_fingerprints: list[str], settings: str) -> str:
    """Digest of the backbone weights, the images and the transform/precision settings."""
    digest = hashlib.sha256("|".join([f"format{CACHE_FORMAT}", settings, *data_fingerprints]).encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith(head_name + "."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureStore:
    """Feature caches on disk, one file per key, shared by every run under `folder`; those a
    process has loaded or saved stay in memory for its later runs (a sweep)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.held: dict[str, FeatureCache] = {}

    def load(self, key: str, device: torch.device) -> FeatureCache | None:
        if key in self.held:
            return self.held[key]
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            state = load_checkpoint(path, required="slot")
        except FinetuneError:
            return None  # an unreadable cache is recomputed, never fatal
        tensors = (state[k].to(device) for k in ("slot", "train", "val"))
        return FeatureCache(state["cut"], *tensors, Ledger(**state["ledger"]))

    def save(self, key: str, cache: FeatureCache) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"cut": cache.cut, "slot": cache.slot.cpu(), "train": cache.train.cpu(), "val": cache.val.cpu()}
        state["ledger"] = cache.ledger.state()
        save_checkpoint(self.folder / f"{key}.pt", state)
        self.held[key] = cache
