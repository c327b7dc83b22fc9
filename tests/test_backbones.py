"""One contract over every backbone in the registry: build, forward shape, feature blocks,
argument errors, state_dict round trip through safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from kdedge.models import MODELS, UnknownNameError, create_model
from kdedge.models.backbones import feature_shapes

BACKBONES = sorted(name for name, target in MODELS.items() if target.startswith("kdedge.models.backbones:"))

# name -> (build kwargs, test input (C, H, W), smallest input the builder accepts)
CASES: dict[str, tuple[dict[str, Any], tuple[int, int, int], int]] = {
    "resnet20": ({}, (3, 32, 32), 8),
    "resnet32": ({}, (3, 32, 32), 8),
    "resnet56": ({}, (3, 32, 32), 8),
    "resnet110": ({}, (3, 32, 32), 8),
    "mobilenetv2": ({"width_mult": 0.5}, (3, 32, 32), 8),  # input_size < 64 selects CIFAR strides
    "tv_resnet18": ({}, (3, 64, 64), 32),
    "tv_resnet34": ({}, (3, 64, 64), 32),
    "tv_resnet50": ({}, (3, 64, 64), 32),
    "tv_mobilenet_v2": ({"width_mult": 0.5}, (3, 64, 64), 32),
    "small_cnn": ({"width": 8}, (1, 8, 8), 4),
}
NUM_CLASSES = 7


def test_every_backbone_has_a_case() -> None:
    # a backbone added to the registry without a case here would otherwise go untested
    assert sorted(CASES) == BACKBONES


def build(name: str, shape: tuple[int, int, int] | None = None, **extra: Any) -> nn.Module:
    kwargs, default_shape, _ = CASES[name]
    c, h, w = shape or default_shape
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=c, input_size=(h, w), **{**kwargs, **extra})


def images(shape: tuple[int, int, int], batch: int = 2) -> Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_shape_and_feature_blocks(name: str) -> None:
    shape = CASES[name][1]
    model = build(name).eval()
    x = images(shape)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, NUM_CLASSES)
        assert torch.isfinite(y).all()
        f = x
        for block in model.feature_blocks():
            f = block(f)
        assert f.shape[1] == model.num_features
        assert torch.equal(f, model.forward_features(x))
        assert torch.equal(model.forward_head(f), y)
    assert feature_shapes(model, shape)[-1] == tuple(f.shape[1:])
    # blocks use the model's own parameters, not copies
    model_params = {id(p) for p in model.parameters()}
    for block in model.feature_blocks():
        assert all(id(p) in model_params for p in block.parameters())


@pytest.mark.parametrize("name", BACKBONES)
def test_smallest_input_builds_and_runs(name: str) -> None:
    c, _, _ = CASES[name][1]
    smallest = CASES[name][2]
    model = build(name, (c, smallest, smallest)).eval()
    with torch.no_grad():
        assert model(images((c, smallest, smallest), batch=1)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", BACKBONES)
def test_other_channel_counts(name: str) -> None:
    c, h, w = CASES[name][1]
    other = 1 if c == 3 else 3  # grayscale for RGB nets, RGB for the digit net
    model = build(name, (other, h, w)).eval()
    with torch.no_grad():
        assert model(images((other, h, w))).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", BACKBONES)
def test_too_small_input_is_a_clear_error(name: str) -> None:
    c, _, _ = CASES[name][1]
    smallest = CASES[name][2]
    with pytest.raises(ValueError, match=rf"at least {smallest}x{smallest}.*resize"):
        build(name, (c, smallest - 1, smallest + 10))


@pytest.mark.parametrize("name", BACKBONES)
def test_unknown_option_is_a_clear_error(name: str) -> None:
    with pytest.raises(UnknownNameError, match=rf"model {name!r} has no option 'num_clases'.*'num_classes'"):
        create_model(name, num_clases=10)
    assert issubclass(UnknownNameError, ValueError)


@pytest.mark.parametrize("name", BACKBONES)
def test_state_dict_safetensors_round_trip(name: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    shape = CASES[name][1]
    model = build(name).eval()
    # train one step so BN statistics and weights differ from a fresh model's
    model.train()
    model(images(shape)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.grad.sign())  # type: ignore[union-attr]
    model.eval()
    state = model.state_dict()
    # one tensor per key: safetensors refuses tensors shared under two names
    ptrs = [t.data_ptr() for t in state.values() if t.numel() > 0]
    assert len(ptrs) == len(set(ptrs))
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    torch.manual_seed(123)
    fresh = create_model(name, num_classes=NUM_CLASSES, in_channels=shape[0], input_size=shape[1:], **CASES[name][0])
    fresh.load_state_dict(load_file(str(path)), strict=True)
    fresh.eval()
    x = images(shape)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", [n for n in BACKBONES if n.startswith("tv_")])
def test_torchvision_wrapper_matches_torchvision_forward(name: str) -> None:
    model = build(name).eval()
    x = images(CASES[name][1])
    with torch.no_grad():
        assert torch.equal(model(x), model.model(x))


def test_cifar_resnet_depths_and_mobilenet_strides() -> None:
    for depth in (20, 32, 56, 110):
        model = create_model(f"resnet{depth}")
        assert len(model.feature_blocks()) == 1 + 3 * (depth - 2) // 6  # stem + 3 layers of n blocks
        assert feature_shapes(model, (3, 32, 32))[-1] == (64, 8, 8)
    cifar = create_model("mobilenetv2", input_size=(32, 32), width_mult=0.5)
    imagenet = create_model("mobilenetv2", input_size=(224, 224), width_mult=0.5)
    assert feature_shapes(cifar, (3, 32, 32))[-1] == (1280, 4, 4)  # /8 on CIFAR
    assert feature_shapes(imagenet, (3, 64, 64))[-1] == (1280, 2, 2)  # /32 on ImageNet


def test_bad_backbone_options() -> None:
    with pytest.raises(ValueError, match="width must be >= 1"):
        create_model("small_cnn", width=0)
    from kdedge.models.backbones import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(33)
