"""Every classification family torchvision ships builds, trains a step and evaluates; a weights
file loads into torchvision and timm models alike."""

from __future__ import annotations

import sys

import pytest
import torch

from finetune.config.schema import ModelConfig
from finetune.errors import FinetuneError
from finetune.model.build import architecture, build_model, check_model_config, drop_aux_heads

FAMILIES = {  # one arch per family (builder), at the smallest input it takes
    "alexnet": 64,
    "convnext_tiny": 32,
    "densenet121": 32,
    "efficientnet_b0": 32,
    "efficientnet_v2_s": 32,
    "googlenet": 32,
    "inception_v3": 75,
    "maxvit_t": 224,
    "mnasnet0_5": 32,
    "mobilenet_v2": 32,
    "mobilenet_v3_small": 32,
    "regnet_x_400mf": 32,
    "resnet18": 32,
    "shufflenet_v2_x0_5": 32,
    "swin_t": 32,
    "vgg11": 32,
    "vit_b_32": 224,
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_trains_a_step_and_evaluates_with_plain_logits(arch):
    torch.manual_seed(0)
    built = build_model(ModelConfig(arch=arch, weights="none"), num_classes=3)
    model, size = built.model, FAMILIES[arch]
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    model.train()
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3), "train mode returns plain logits"
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert model.get_submodule(built.head_name).weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize(("arch", "aux"), [("inception_v3", ["AuxLogits"]), ("googlenet", ["aux1", "aux2"])])
def test_aux_heads_are_dropped_and_transform_input_follows_the_weights(arch, aux):
    for pretrained in (True, False):
        model = architecture(arch, torchvision_weights=pretrained)
        assert model.transform_input is pretrained, "torchvision's weights expect transform_input=True"
        drop_aux_heads(model, arch)
        assert not model.aux_logits and not any(k.split(".")[0] in aux for k in model.state_dict())


def test_squeezenet_is_refused_in_the_config_check():
    with pytest.raises(FinetuneError, match="squeezenet1_1 ends in a 1x1 convolution"):
        check_model_config(ModelConfig(arch="squeezenet1_1", weights="none"))


def test_a_weights_file_with_auxiliary_heads_loads_into_the_model_without_them(tmp_path):
    source = architecture("googlenet", torchvision_weights=False)
    path = tmp_path / "googlenet.pth"
    torch.save({"model": source.state_dict()}, path)  # a checkpoint's `model` entry, aux heads included
    built = build_model(ModelConfig(arch="googlenet", weights=str(path)), num_classes=3)
    assert torch.equal(built.model.conv1.conv.weight, source.conv1.conv.weight)


def test_a_timm_model_loads_a_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "convnext.pth"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(arch="timm/convnext_atto", weights=str(path))
    check_model_config(cfg)
    built = build_model(cfg, num_classes=3)
    assert torch.equal(built.model.stem[0].weight, source.stem[0].weight) and built.head_name == "head.fc"


def test_a_timm_arch_without_timm_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(FinetuneError, match=r"timm is not installed; pip install 'finetune\[timm\]'"):
        check_model_config(ModelConfig(arch="timm/convnext_atto", weights="none"))
