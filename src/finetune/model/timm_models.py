"""timm backbones, `model.arch: timm/<name>`: built by timm, the head and normalization from
timm's own API (`reset_classifier`, `pretrained_cfg`). timm is an optional extra."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from finetune.config.schema import ModelConfig
from finetune.errors import FinetuneError
from finetune.model.weights import is_none, load_weights_file

PREFIX = "timm/"


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise FinetuneError("model.arch timm/...: timm is not installed; pip install 'finetune[timm]'") from None
    return timm


def _pretrained_or_none(weights: str | None) -> bool:
    """DEFAULT (timm's pretrained weights) or none; any other value names a state_dict file."""
    return weights == "DEFAULT" or is_none(weights)


def check(cfg: ModelConfig) -> None:
    """An unknown timm name (with close names) or weights that are neither DEFAULT, none nor a file."""
    timm, name = _timm(), cfg.arch.removeprefix(PREFIX)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean timm/{close[0]}?)" if close else "; see timm.list_models()"
        raise FinetuneError(f"model.arch: unknown timm model {name!r}{hint}")
    if not _pretrained_or_none(cfg.weights) and not Path(cfg.weights).is_file():
        raise FinetuneError(
            f"model.weights: {cfg.weights!r} for a timm model must be DEFAULT (timm's pretrained weights), "
            "none, or an existing state_dict file"
        )


def build(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, str, tuple, tuple]:
    """(model with a fresh `num_classes` head, head name, mean, std)."""
    timm, name = _timm(), cfg.arch.removeprefix(PREFIX)
    pretrained = cfg.weights == "DEFAULT"
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except OSError as exc:  # huggingface_hub's offline and not-found errors are OSErrors
        raise FinetuneError(
            f"model.weights DEFAULT: could not get timm's pretrained {name} ({str(exc).splitlines()[0][:80]}); "
            "put it in the Hugging Face cache (HF_HOME), set model.weights to a local file, or use model.weights=none"
        ) from None
    if not _pretrained_or_none(cfg.weights):
        load_weights_file(model, Path(cfg.weights), cfg.arch)
    model.reset_classifier(num_classes)
    return model, head_name(model, cfg.arch), tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])


def rebuild(arch: str, num_classes: int) -> nn.Module:
    """The model with a `num_classes` head and no weights read, to load a checkpoint into."""
    return _timm().create_model(arch.removeprefix(PREFIX), pretrained=False, num_classes=num_classes)


def head_name(model: nn.Module, arch: str) -> str:
    name = model.pretrained_cfg.get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if not name or not isinstance(model.get_submodule(name), nn.Linear):
        raise FinetuneError(f"model.arch: {arch} has no Linear classifier that finetune can train as the head")
    return name
