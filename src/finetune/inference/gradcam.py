"""Where the network looked: Grad-CAM (pytorch-grad-cam, the `inspect` extra) at the layer a
user would pick for the architecture, or the one `--layer` names.

The default is found by running the model once on a blank image and taking the last module
whose output is still a feature map larger than one pixel, before any pooling: resnet's
`layer4`, mobilenet's and efficientnet's `features`, a timm CNN's last stage. Transformers
emit tokens, not maps: a ViT's is the last block's first norm (the class token reads the
patches only through that block's attention), reshaped from tokens to a grid; maps that come
channels-last (Swin's) are permuted.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError

Reshape = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CamLayer:
    name: str
    module: nn.Module
    reshape: Reshape | None  # tokens or channels-last maps to (N, C, H, W); None when already so


def require_gradcam() -> None:
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise FinetuneError("inspect: Grad-CAM needs the grad-cam package; pip install 'finetune[inspect]'") from None


def cam_layer(model: nn.Module, image_size: int, name: str | None = None) -> CamLayer:
    """The layer Grad-CAM reads: `name`, or the architecture's usual choice."""
    shapes = output_shapes(model, image_size)
    if name is None:
        name = _default_name(model, shapes)
    elif name not in dict(model.named_modules()) or not name:
        raise FinetuneError(f"inspect --layer {name!r}: the model has no such module; {_near(model, name)}")
    shape = shapes.get(name)
    if shape is None or len(shape) not in (3, 4):
        what = tuple(shape) if shape else "not a tensor"
        raise FinetuneError(
            f"inspect --layer {name}: its output is {what}, not a feature map or tokens; pick a convolutional "
            f"block or a transformer block's norm (the default: {_default_name(model, shapes)})"
        )
    return CamLayer(name, model.get_submodule(name), _reshape(shape))


def output_shapes(model: nn.Module, image_size: int) -> dict[str, torch.Size]:
    """Each named module's output shape on one blank image, in the order the modules finish."""
    shapes: dict[str, torch.Size] = {}
    names = {module: name for name, module in model.named_modules() if name}

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and module in names:
            shapes.pop(names[module], None)  # a module called twice finishes last at its last call
            shapes[names[module]] = output.shape

    hooks = [m.register_forward_hook(record) for m in names]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _default_name(model: nn.Module, shapes: dict[str, torch.Size]) -> str:
    tokens = _vit_norm(model)
    if tokens is not None:
        return tokens
    maps = [
        name
        for name, shape in shapes.items()
        if len(shape) == 4 and _spatial(shape) > 1 and "Pool" not in type(model.get_submodule(name)).__name__
    ]
    if not maps:
        raise FinetuneError("inspect: this model has no feature map to take Grad-CAM from; name one with --layer")
    return maps[-1]


def _vit_norm(model: nn.Module) -> str | None:
    """A ViT's last block's first norm: timm's `blocks.N.norm1`, torchvision's `encoder.layers.*.ln_1`."""
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return f"blocks.{len(model.blocks) - 1}.norm1"
    if type(model).__name__ == "VisionTransformer" and hasattr(model, "encoder"):
        last = list(model.encoder.layers.named_children())[-1][0]
        return f"encoder.layers.{last}.ln_1"
    return None


def _channels_last(shape: torch.Size) -> bool:
    """Whether a map of a square image is (N, H, W, C), as Swin passes them between stages:
    its two middle sizes are equal and the last is not."""
    return shape[1] == shape[2] != shape[3]


def _spatial(shape: torch.Size) -> int:
    return shape[1] * shape[2] if _channels_last(shape) else shape[2] * shape[3]


def _reshape(shape: torch.Size) -> Reshape | None:
    if len(shape) == 3:
        side = math.isqrt(shape[1])
        return lambda tokens: _tokens_to_grid(tokens, side)
    if _channels_last(shape):
        return lambda maps: maps.permute(0, 3, 1, 2)
    return None


def _tokens_to_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(N, prefix + side², C) -> (N, C, side, side): the class (and register) tokens dropped."""
    patches = tokens[:, tokens.shape[1] - side * side :, :]
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def _near(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = sorted(difflib.get_close_matches(name, names, n=6, cutoff=0.5))
    if close:
        return f"near names: {', '.join(close)}"
    return f"its top-level modules: {', '.join(n for n, _ in model.named_children())}"


def grad_cams(model: nn.Module, layer: CamLayer, inputs: torch.Tensor, classes: list[int]) -> np.ndarray:
    """(N, H, W) maps in [0, 1] at the input's size: where evidence for each image's class lies."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if not classes:
        return np.zeros((0, *inputs.shape[-2:]), dtype=np.float32)
    targets = [ClassifierOutputTarget(c) for c in classes]
    with GradCAM(model=model, target_layers=[layer.module], reshape_transform=layer.reshape) as cam:
        return cam(input_tensor=inputs.float(), targets=targets)
