"""MAC and parameter counting: hand-computed layers, published model costs, shared parameters,
multi-input stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdedge.models import create_model
from kdedge.models.flops import Cost, count_cost, count_macs, count_params, stage_costs
from kdedge.models.stages import Stage, StageSpec

# --- hand-computed single layers -------------------------------------------------------------


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, pad, groups, hw",
    [
        (3, 8, 3, 1, 1, 1, 10),  # plain conv
        (8, 16, 3, 1, 1, 2, 10),  # grouped
        (8, 12, 3, 2, 1, 4, 9),  # grouped, strided, odd size
        (16, 16, 3, 1, 1, 16, 7),  # depthwise
        (16, 32, 5, 2, 2, 16, 8),  # depthwise with channel multiplier 2
        (6, 4, 1, 1, 0, 1, 5),  # pointwise
    ],
)
def test_conv_macs_hand_computed(c_in: int, c_out: int, k: int, stride: int, pad: int, groups: int, hw: int) -> None:
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups, bias=True)
    out_hw = (hw + 2 * pad - k) // stride + 1
    expected_macs = out_hw * out_hw * c_out * (c_in // groups) * k * k  # bias not counted
    expected_params = c_out * (c_in // groups) * k * k + c_out
    assert count_cost(conv, torch.zeros(1, c_in, hw, hw)) == Cost(expected_macs, expected_params)


def test_functional_grouped_conv_counts_groups() -> None:
    """A model calling F.conv2d(groups=...) directly, as grouped HNE layers do."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(16, 2, 3, 3))  # 16 out, 8 in, 4 groups

        def forward(self, x: Tensor) -> Tensor:
            return F.conv2d(x, self.w, groups=4, padding="same")

    # 16 out channels * 10*10 positions * 2 inputs per group * 9 taps
    assert count_macs(Functional(), torch.zeros(1, 8, 10, 10)) == 16 * 100 * 2 * 9


def test_conv1d_and_transposed_conv() -> None:
    assert count_macs(nn.Conv1d(4, 6, 3, groups=2), torch.zeros(1, 4, 20)) == 6 * 18 * 2 * 3
    # transposed: every input position scatters into k*k outputs of c_out/groups channels
    convt = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2)
    assert count_macs(convt, torch.zeros(1, 8, 5, 5)) == 25 * 8 * (6 // 2) * 9


def test_linear_and_matmul_family() -> None:
    assert count_cost(nn.Linear(7, 3), torch.zeros(1, 7)) == Cost(21, 24)
    assert count_macs(nn.Linear(7, 3, bias=False), torch.zeros(1, 5, 7)) == 5 * 21  # tokens × in × out

    class Products(nn.Module):
        def forward(self, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
            y = torch.bmm(a, b)  # 1*4*5*6 = 120
            y = torch.einsum("bik,bkj->bij", y, b.transpose(1, 2))  # 1*4*6*5 = 120
            y = y @ a.transpose(1, 2)  # 1*4*5*4 = 80
            return y[0] @ v + torch.dot(v, v)  # mv 4*4 = 16, dot 4

    a, b, v = torch.zeros(1, 4, 5), torch.zeros(1, 5, 6), torch.zeros(4)
    assert count_macs(Products(), a, b, v) == 120 + 120 + 80 + 16 + 4


def test_bn_relu_pool_add_not_counted() -> None:
    net = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))

    class Add(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x + x * 2

    x = torch.randn(1, 4, 8, 8)
    assert count_cost(net, x) == Cost(0, 8)  # BN affine weights are parameters, not MACs
    assert count_macs(Add(), x) == 0


def test_shared_parameter_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = self.a  # the same module under two names
            self.c = nn.Linear(6, 2)
            self.c.weight = nn.Parameter(torch.zeros(2, 6))
            self.d = nn.Linear(6, 2, bias=False)
            self.d.weight = self.c.weight  # a tied weight

        def forward(self, x: Tensor) -> Tensor:
            return self.d(self.c.weight.sum() + self.b(self.a(x)))

    # params: a (36 + 6) + c (12 + 2), d adds nothing; MACs: a twice (runs twice) + d
    assert count_cost(Tied(), torch.zeros(1, 6)) == Cost(2 * 36 + 12, 42 + 14)
    assert count_params(Tied()) == 56


def test_training_flags_restored_and_batch_checked() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a frozen BN inside a training model must stay frozen
    before = net[1].running_mean.clone()
    count_macs(net, torch.randn(1, 3, 8, 8))
    assert [m.training for m in net.modules()] == [True, True, False, True]
    assert torch.equal(net[1].running_mean, before)
    with pytest.raises(ValueError, match="batch size 1"):
        count_macs(net, torch.zeros(2, 3, 8, 8))


# --- published model costs -------------------------------------------------------------------


def test_cifar_resnet_matches_hand_count() -> None:
    """CIFAR ResNet-(6n+2) costs, computed layer by layer from the architecture.

    kdedge's BasicBlock uses a 1x1-conv + BN projection shortcut where the shape changes (option
    B), so it differs from the option-A (zero-padding) numbers of He et al. by exactly the two
    projections: +16·32 + 32·64 weights and +2·32 + 2·64 BN parameters (2,752 params), and
    16·32·16² + 32·64·8² = 262,144 MACs.
    """
    for depth in (20, 32, 56, 110):
        n = (depth - 2) // 6
        macs = 3 * 16 * 9 * 32 * 32  # conv1
        params = 3 * 16 * 9 + 2 * 16
        for c_in, c, hw in ((16, 16, 32), (16, 32, 16), (32, 64, 8)):
            macs += hw * hw * c * 9 * (c_in + c + (2 * n - 2) * c)  # 2n 3x3 convs, first reads c_in
            params += 9 * c * (c_in + c + (2 * n - 2) * c) + 2 * n * 2 * c
        option_a = Cost(macs + 64 * 10, params + 64 * 10 + 10)
        projections = Cost(16 * 32 * 16 * 16 + 32 * 64 * 8 * 8, 16 * 32 + 32 * 64 + 2 * 32 + 2 * 64)
        got = count_cost(create_model(f"resnet{depth}"), torch.zeros(1, 3, 32, 32))
        assert got == option_a + projections, depth


def test_cifar_resnet32_near_paper() -> None:
    """He et al. (2016) give ResNet-32 0.46 M parameters; the usual MAC figure is ≈ 69 M."""
    cost = count_cost(create_model("resnet32", num_classes=10), torch.zeros(1, 3, 32, 32))
    # Measured: 466,906 params, 69,124,736 MACs (option A: 464,154 and 68,862,592).
    assert 0.46e6 <= cost.params <= 0.47e6
    assert abs(cost.macs - 69e6) / 69e6 < 0.005


def test_torchvision_costs_match_torchvision_metadata() -> None:
    """torchvision's weight metadata lists parameters exactly and GFLOPS (= GMACs) to 3 decimals."""
    import torchvision

    for name, weights, kwargs in (
        ("tv_resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, {}),
        ("tv_mobilenet_v2", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, {}),
        # kdedge's own MobileNetV2 at ImageNet strides must cost what torchvision's does
        ("mobilenetv2", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, {"cifar": False}),
    ):
        cost = count_cost(create_model(name, num_classes=1000, **kwargs), torch.zeros(1, 3, 224, 224))
        assert cost.params == weights.meta["num_params"], name
        assert abs(cost.macs / 1e9 - weights.meta["_ops"]) <= 0.0005, (name, cost.macs)
    # and the round figures quoted in papers
    r18 = count_cost(create_model("tv_resnet18"), torch.zeros(1, 3, 224, 224))
    assert abs(r18.macs - 1.82e9) / 1.82e9 < 0.005 and abs(r18.params - 11.69e6) < 0.01e6
    mb2 = count_cost(create_model("tv_mobilenet_v2"), torch.zeros(1, 3, 224, 224))
    assert abs(mb2.macs - 300e6) / 300e6 < 0.01 and abs(mb2.params - 3.5e6) < 0.01e6


# --- stages ----------------------------------------------------------------------------------


class _Trunk(Stage):
    """stage0: conv trunk and an exit; carries its feature map."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.spec = StageSpec("stage0", ("input",), ("logits", "feat"))
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.conv(x)
        return self.head(f.mean((2, 3))), f


class _Next(Stage):
    """stage1: reads the input and stage0's feature map; shares the exit classifier."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.spec = StageSpec("stage1", ("stage0:feat", "input"), ("feat", "logits"), members=2)
        self.conv = nn.Conv2d(4 + 3, 4, 3, padding=1, groups=1, bias=False)
        self.head = head

    def forward(self, f: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        g = self.conv(torch.cat([f, x], 1))
        return g, 2 * self.head(g.mean((2, 3)))


def test_stage_costs_multi_input_and_shared_params() -> None:
    head = nn.Linear(4, 5)
    stages = [_Trunk(head), _Next(head)]
    costs = stage_costs(stages, (3, 6, 6))
    head_cost = Cost(4 * 5, 4 * 5 + 5)
    assert costs[0] == Cost(36 * 4 * 3 * 9, 4 * 3 * 9) + head_cost
    # stage1 runs the shared head again (MACs) but does not own its parameters a second time
    assert costs[1] == Cost(36 * 4 * 7 * 9 + 20, 4 * 7 * 9)
    assert sum(c.params for c in costs) == count_params(nn.ModuleList(stages))
    # a multi-input stage on its own
    assert count_cost(stages[1], torch.zeros(1, 4, 6, 6), torch.zeros(1, 3, 6, 6)) == Cost(
        36 * 4 * 7 * 9 + 20, 4 * 7 * 9 + 25
    )


def test_stage_costs_errors() -> None:
    with pytest.raises(ValueError, match="C, H, W"):
        stage_costs([_Trunk(nn.Linear(4, 5))], (6, 6))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a stage"):
        stage_costs([nn.Linear(4, 5)], (3, 6, 6))
