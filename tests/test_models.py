"""Every classification family torchvision ships builds, trains a step and evaluates."""

from __future__ import annotations

import pytest
import torch

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models import architecture, build_model, check_model_config, drop_aux_heads

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
