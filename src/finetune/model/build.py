"""Build a classifier, load its weights, replace its head: torchvision's here, timm's
(`timm/<name>`) in timm_models.py, a weights file read by weights.py for both.

A torchvision model's head is its last `nn.Linear` (resnet `fc`, mobilenet `classifier.1`,
vit `heads.head` ...); everything else is the backbone.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.config.schema import ModelConfig
from finetune.errors import FinetuneError
from finetune.model import timm_models
from finetune.model.weights import is_none, load_weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


CONV_HEADS = {"squeezenet1_0", "squeezenet1_1"}  # the only torchvision classifiers without a final Linear
AUX_HEADS = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}


@dataclass
class BuiltModel:
    model: nn.Module
    head_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_weights: bool = False  # built as for torchvision's pretrained weights


def architecture(arch: str, torchvision_weights: bool) -> nn.Module:
    """The arch as torchvision's builder makes it for these weights, with auxiliary heads.

    inception_v3 and googlenet take `transform_input=True` with torchvision's weights (their
    inputs are re-normalized inside); `drop_aux_heads` then removes the auxiliary classifiers,
    without which they return plain logits in train mode too.
    """
    if arch not in AUX_HEADS:
        return torchvision.models.get_model(arch, weights=None)
    kwargs = {"aux_logits": True, "transform_input": torchvision_weights, "init_weights": not torchvision_weights}
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def drop_aux_heads(model: nn.Module, arch: str) -> None:
    if arch in AUX_HEADS:
        model.aux_logits = False
        for name in AUX_HEADS[arch]:
            setattr(model, name, None)


def available_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_model_config(cfg: ModelConfig) -> None:
    """Fail on an unknown arch, weights name or missing weights file before any data loads."""
    if timm_models.is_timm(cfg.arch):
        timm_models.check(cfg)
        return
    archs = available_archs()
    if cfg.arch not in archs:
        close = difflib.get_close_matches(cfg.arch, archs, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else "; see torchvision.models.list_models()"
        raise FinetuneError(f"model.arch: unknown torchvision classifier {cfg.arch!r}{hint}")
    if cfg.arch in CONV_HEADS:
        raise FinetuneError(
            f"model.arch: {cfg.arch} ends in a 1x1 convolution, not a Linear head that finetune can replace; "
            "pick another arch (e.g. mobilenet_v3_small for a small model)"
        )
    _resolve_weights(cfg)


def _resolve_weights(cfg: ModelConfig) -> WeightsEnum | Path | None:
    if is_none(cfg.weights):
        return None
    enum = torchvision.models.get_model_weights(cfg.arch)
    if cfg.weights == "DEFAULT":
        return _default_or_cached(enum)
    if cfg.weights in enum.__members__:
        return enum[cfg.weights]
    path = Path(cfg.weights)
    if path.suffix in (".pt", ".pth", ".bin") or "/" in cfg.weights:
        if not path.is_file():
            raise FinetuneError(f"model.weights: file {path} not found; give an existing state_dict file")
        return path
    names = ", ".join(["DEFAULT", *enum.__members__, "none"])
    raise FinetuneError(f"model.weights: {cfg.weights!r} is not a weights name for {cfg.arch}; use one of {names}")


def _cached(weights: WeightsEnum) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file()


def _default_or_cached(enum: type[WeightsEnum]) -> WeightsEnum:
    """torchvision's DEFAULT, unless only another ImageNet file of this arch is on disk.

    Offline, an older weights file already in the hub cache beats a failed download.
    """
    if _cached(enum.DEFAULT):
        return enum.DEFAULT
    return next((w for w in enum if _cached(w)), enum.DEFAULT)


def build_model(cfg: ModelConfig, num_classes: int) -> BuiltModel:
    """The arch with pretrained weights loaded and a fresh head for `num_classes`."""
    if timm_models.is_timm(cfg.arch):
        return BuiltModel(*timm_models.build(cfg, num_classes))
    weights = _resolve_weights(cfg)
    model = architecture(cfg.arch, isinstance(weights, WeightsEnum))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if isinstance(weights, WeightsEnum):
        if cfg.weights == "DEFAULT" and weights != weights.__class__.DEFAULT:
            print(f"model.weights DEFAULT: using {weights}, found in the torch hub cache")
        model.load_state_dict(_download_state_dict(weights, cfg.arch))
        preset = weights.transforms()
        mean, std = tuple(preset.mean), tuple(preset.std)
    drop_aux_heads(model, cfg.arch)
    if isinstance(weights, Path):
        load_weights_file(model, weights, cfg.arch, dropped=AUX_HEADS.get(cfg.arch, ()))
    head_name = replace_head(model, num_classes)
    return BuiltModel(model, head_name, mean, std, isinstance(weights, WeightsEnum))


def skeleton(cfg: ModelConfig, num_classes: int) -> BuiltModel:
    """The arch with its new head and no weights read: enough to name modules and count parameters."""
    return build_model(dataclasses.replace(cfg, weights="none"), num_classes)


@functools.lru_cache(maxsize=4)
def _download_state_dict(weights: WeightsEnum, arch: str) -> dict[str, torch.Tensor]:
    """torchvision's own path: the hub cache first, then the download. Kept for the process,
    so the runs of a sweep read a weights file once (load_state_dict copies, never aliases)."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise FinetuneError(
            f"model.weights: could not get {arch} {weights} ({str(exc).splitlines()[0][:80]}); "
            f"put {cache.name} at {cache}, set model.weights to a local file, or use model.weights=none"
        ) from None


def rebuild(arch: str, num_classes: int, torchvision_weights: bool) -> nn.Module:
    """The model a checkpoint was trained as, with its head and no weights read."""
    if timm_models.is_timm(arch):
        return timm_models.rebuild(arch, num_classes)
    model = architecture(arch, torchvision_weights)
    drop_aux_heads(model, arch)
    replace_head(model, num_classes)
    return model


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the last Linear for a new one with `num_classes` outputs; return its dotted name."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FinetuneError("model.arch: this model has no Linear classification head to replace")
    name = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return name
