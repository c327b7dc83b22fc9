"""HNE tree: grouped members equal separate reference networks in depth-first order, the
paper's configurations have the shapes of its Tables 2 and 3, impossible configurations fail
at build time, and the stages / prefixes reproduce the sub-ensembles (and export to ONNX)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from kdedge.models import UnknownNameError, create_model, hne_layers
from kdedge.models.flops import count_cost, stage_costs
from kdedge.models.hne import HNE
from kdedge.models.hne_configs import CONFIGS
from kdedge.models.hne_layers import GBottleneck, GConv, GHead, GInvertedResidual, replicate
from kdedge.models.hne_reference import member_path, reference_members
from kdedge.models.stages import check_stage_list, combine_torch, run_stages

CLASSES = 5


def tiny(B: int, size: int = 8, **kw: Any) -> HNE:
    kw.setdefault("config", "tiny")
    return create_model("hne", num_classes=CLASSES, in_channels=1, input_size=(size, size), B=B, **kw)  # type: ignore[return-value]


def image(batch: int = 3, size: int = 8, channels: int = 1) -> Tensor:
    return torch.randn(batch, channels, size, size)


# --- the tree -------------------------------------------------------------------------------


@pytest.mark.parametrize("B", range(6))
def test_forward_returns_every_member_in_one_pass(B: int) -> None:
    torch.manual_seed(B)
    model = tiny(B)
    out = model(image(3))
    assert out.shape == (2 ** B, 3, CLASSES)
    assert model.num_members == 2 ** B
    # block d holds 2^d nodes: its first convolution has 2^d times the groups of one member's
    for d, block in enumerate(model.blocks):
        for layer in block:
            assert layer.nodes == 2 ** d
    assert model.head.nodes == 2 ** B


REFERENCE_CASES: list[tuple[dict[str, Any], int, int]] = [
    ({"config": "tiny", "B": 0}, 8, 1),
    ({"config": "tiny", "B": 1}, 8, 1),
    ({"config": "tiny", "B": 3}, 8, 1),
    ({"config": "tiny", "B": 2, "groups": 2}, 8, 1),
    ({"config": "tiny", "B": 2, "sharing": "independent"}, 8, 1),
    ({"config": "tiny", "B": 3, "sharing": "multibranch"}, 8, 1),
    ({"config": "tiny", "B": 2, "splits": (2, 2)}, 8, 1),
    ({"config": "mobilenetv2", "B": 2, "width": 0.1}, 32, 3),
]


@pytest.mark.parametrize("kw, size, channels", REFERENCE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grouped_tree_equals_separate_members(kw: dict[str, Any], size: int, channels: int, mode: str) -> None:
    """The reference rebuilds every member as its own ungrouped network from the state dict."""
    torch.manual_seed(0)
    model = create_model("hne", num_classes=CLASSES, in_channels=channels, input_size=(size, size), **kw)
    model.train(mode == "train")
    with torch.no_grad():
        _randomise_bn(model)
        x = image(4, size, channels)
        grouped = model(x)
        separate = reference_members(model, x)
    assert grouped.shape == separate.shape
    torch.testing.assert_close(grouped, separate, rtol=1e-4, atol=1e-5)


def _randomise_bn(model: torch.nn.Module) -> None:
    # non-trivial BatchNorm statistics and affine parameters, so eval mode is a real check
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)


def test_depth_first_order_each_node_feeds_exactly_its_leaves() -> None:
    """Perturbing node k of block d changes exactly the members whose path runs through it;
    the sub-ensemble of 2^b members shares blocks 0..B-b with member 0."""
    torch.manual_seed(1)
    B = 3
    model = tiny(B).eval()
    x = image(2)
    with torch.no_grad():
        base = model(x)
        for d in range(B + 1):
            for k in range(2 ** d):
                layer = model.blocks[d][0] if len(model.blocks[d]) else model.head
                saved = {n: p.detach().clone() for n, p in layer.named_parameters()}
                for p in layer.parameters():
                    rows = p.shape[0] // layer.nodes
                    p[k * rows: (k + 1) * rows] += 0.5
                changed = (model(x) - base).abs().amax(dim=(1, 2)) > 1e-6
                for n, p in layer.named_parameters():
                    p.copy_(saved[n])
                expected = [member_path(n, B)[d] == k for n in range(2 ** B)]
                assert changed.tolist() == expected, (d, k)
    for b in range(B + 1):
        for n in range(2 ** b):
            assert member_path(n, B)[: B - b + 1] == member_path(0, B)[: B - b + 1]
        for n in range(2 ** b, 2 ** B):
            assert member_path(n, B)[B - b] != 0


def test_branches_start_different_with_member_scale_init() -> None:
    torch.manual_seed(2)
    model = tiny(2)
    out = model(image(4))
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(out[i], out[j])
    # kaiming fan-out of ONE node's convolution, whatever the number of nodes
    big = create_model("hne", num_classes=10, config="resnet", B=4)
    conv = big.blocks[4][1].reduce.conv  # 16 nodes, 1x1 256 -> 64
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    halves = conv.weight.unflatten(0, (16, -1))
    assert not torch.allclose(halves[0], halves[1])


def test_replicate_sends_each_node_to_its_two_children() -> None:
    x = torch.arange(3 * 2 * 1 * 1, dtype=torch.float32).reshape(1, 6, 1, 1)  # 3 nodes of 2 channels
    y = replicate(x, 3).flatten().tolist()
    assert y == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]


SPLIT_LAYERS = {
    # in place: the first convolutions read the parents' features directly
    "conv": (GConv(4, 6, 8, 3), True),
    "bottleneck, projection": (GBottleneck(4, 6, 8, project=True), True),
    "inverted residual, stride 2": (GInvertedResidual(4, 6, 8, stride=2), True),
    "head": (GHead(4, 6, CLASSES), True),
    "head, hidden layer": (GHead(4, 6, CLASSES, hidden=12), True),
    # these need the replicated copy
    "depth-wise conv": (GConv(4, 6, 6, 3, groups=6), False),
    "bottleneck, identity shortcut": (GBottleneck(4, 8, 8), False),
    "bottleneck, grouped 1x1": (GBottleneck(4, 6, 8, project=True, groups=2), False),
    "inverted residual, residual": (GInvertedResidual(4, 8, 8), False),
    "inverted residual, no expansion": (GInvertedResidual(4, 6, 8, stride=2, expand=1), False),
}


@pytest.mark.parametrize("kind", list(SPLIT_LAYERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_layer_after_a_split_equals_it_on_the_replicated_input(kind: str, mode: str, monkeypatch) -> None:
    torch.manual_seed(6)
    layer, in_place = SPLIT_LAYERS[kind]
    layer.train(mode == "train")
    with torch.no_grad():
        _randomise_bn(layer)
        x = torch.randn(3, 2 * layer.kwargs["cin"], 6, 6)  # the 2 parents of the layer's 4 nodes
        want = layer(replicate(x, 2))
        calls = []
        monkeypatch.setattr(hne_layers, "replicate", lambda *a: calls.append(a) or replicate(*a))
        got = layer.forward_split(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (not calls) == in_place


def test_the_papers_cifar_tree_splits_without_copying_features(monkeypatch) -> None:
    """Every split of the Table 2 tree sits before a projection layer ("ResNet+Branching"), so no
    graph replicates features (a Reshape/Concat that onnxruntime runs outside its NCHWc layout)."""
    calls = []
    monkeypatch.setattr(hne_layers, "replicate", lambda *a: calls.append(a) or replicate(*a))
    torch.manual_seed(7)
    model = create_model("hne", num_classes=CLASSES, config="resnet", B=4, width=0.25).eval()
    x = image(2, 32, 3)
    with torch.no_grad():
        members = model(x)
        outs = run_stages(model.stages(), x)
        (full,) = model.prefixes()[-1](x)
    assert calls == []
    torch.testing.assert_close(sum(o["logits"] for o in outs), full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, members.sum(0), rtol=1e-4, atol=1e-5)
    # consecutive splits without layers in between replicate all but the last time
    independent = tiny(3, sharing="independent").eval()
    with torch.no_grad():
        independent(image(2))
    assert [a[1] for a in calls] == [1, 2]


def _block_outputs(model: HNE, size: int) -> list[tuple[int, int, int]]:
    """(nodes, channels per node, resolution) after every block, on the meta device."""
    x = torch.empty(1, 3, size, size, device="meta")
    shapes = []
    for d, block in enumerate(model.blocks):
        if d:
            x = replicate(x, 2 ** (d - 1))
        for layer in block:
            x = layer(x)
        shapes.append((2 ** d, x.shape[1] // 2 ** d, x.shape[2]))
    return shapes


def test_resnet_config_matches_paper_table_2() -> None:
    with torch.device("meta"):
        model = create_model("hne", num_classes=100, config="resnet", B=4)
        small = create_model("hne", num_classes=100, config="resnet_small", B=4)
    assert _block_outputs(model, 32) == [(1, 64, 32), (2, 64, 32), (4, 128, 16), (8, 256, 8), (16, 256, 8)]
    assert _block_outputs(small, 32) == [(1, 32, 32), (2, 32, 32), (4, 64, 16), (8, 128, 8), (16, 128, 8)]
    # rows of Table 2: 2 convolutions, then 1+2, 1+3, 1+3, 1+4 bottlenecks; each block opens
    # with a "ResNet+Branching" layer (projection shortcut)
    assert [len(b) for b in model.blocks] == [2, 3, 4, 4, 5]
    for block in list(model.blocks)[1:]:
        assert block[0].shortcut is not None
    # 16 bottlenecks x 3 + stem + classifier: the paper's "ResNets of depth 50"
    assert sum(len(b) for b in model.blocks[1:]) == 16
    assert model.head.fc.out_channels == 16 * 100


def test_mobilenet_config_matches_paper_table_3() -> None:
    with torch.device("meta"):
        model = create_model("hne", num_classes=1000, config="mobilenetv2", B=4, input_size=(224, 224))
    assert _block_outputs(model, 224) == [(1, 32, 56), (2, 48, 28), (4, 88, 14), (8, 136, 14), (16, 1344, 7)]
    assert [len(b) for b in model.blocks] == [4, 3, 4, 3, 4]
    assert model.head.hidden is not None and model.head.hidden.out_channels == 16 * 1792
    assert model.head.fc.out_channels == 16 * 1000


def test_baselines_are_split_placements_of_the_same_members() -> None:
    single = sum(p.numel() for p in tiny(0).parameters())
    independent = tiny(2, sharing="independent")
    assert sum(p.numel() for p in independent.parameters()) == 4 * single
    assert [len(b) for b in independent.blocks[:2]] == [0, 0]
    multi = tiny(3, sharing="multibranch")
    cut = CONFIGS["tiny"].candidates[2]
    assert [len(b) for b in multi.blocks] == [cut, 0, 0, len(CONFIGS["tiny"].layers) - cut]
    assert multi.stage_meta()["sharing"] == "multibranch"


@pytest.mark.parametrize(
    "kw, fix",
    [
        ({"B": 6}, "0 to 5"),
        ({"B": -1}, "0 to 5"),
        ({"config": "resnt"}, "did you mean 'resnet'"),
        ({"config": "resnet", "groups": 3}, "use groups in"),
        ({"config": "mobilenetv2", "input_size": (28, 28)}, "data.image_size"),
        ({"config": "resnet", "input_size": (2, 2)}, "at least 4x4"),
        ({"config": "tiny", "B": 3, "splits": (1, 2)}, "give B=2"),
        ({"config": "tiny", "B": 2, "splits": (3, 1)}, "ascending"),
        ({"config": "tiny", "B": 2, "sharing": "independent", "splits": (1, 2)}, "not both"),
        ({"config": "tiny", "sharing": "shared"}, "known"),
        ({"config": "tiny", "width": 0.0}, "width must be positive"),
        ({"config": "tiny", "num_classes": 0}, "at least one class"),
    ],
)
def test_impossible_configurations_fail_at_build_time(kw: dict[str, Any], fix: str) -> None:
    kw = {"num_classes": 10, **kw}
    with pytest.raises(ValueError, match=fix):
        create_model("hne", **kw)


def test_unknown_config_is_a_registry_error() -> None:
    with pytest.raises(UnknownNameError):
        create_model("hne", config="resnet50")


# --- stages ---------------------------------------------------------------------------------


STAGE_CASES = [{"B": b} for b in range(5)] + [{"B": 3, "sharing": "independent"}, {"B": 3, "sharing": "multibranch"}]


@pytest.mark.parametrize("kw", STAGE_CASES, ids=str)
def test_stages_and_prefixes_give_the_sub_ensembles(kw: dict[str, Any]) -> None:
    torch.manual_seed(3)
    model = tiny(**kw).eval()
    B = model.B
    with torch.no_grad():
        _randomise_bn(model)
        x = image(5)
        members = model(x)
        stages = model.stages()
        check_stage_list(stages)
        assert [s.spec.members for s in stages] == [1] + [2 ** (b - 1) for b in range(1, B + 1)]
        outs = run_stages(stages, x)
        for b in range(B + 1):
            got = combine_torch("mean_logits", [o["logits"] for o in outs[: b + 1]],
                                [s.spec.members for s in stages[: b + 1]])
            want = torch.softmax(members[: 2 ** b].mean(0), dim=-1)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            # stage b's logits are the SUM of exactly members 2^(b-1) .. 2^b - 1
            lo, hi = (0, 1) if b == 0 else (2 ** (b - 1), 2 ** b)
            torch.testing.assert_close(outs[b]["logits"], members[lo:hi].sum(0), rtol=1e-4, atol=1e-5)
        prefixes = model.prefixes()
        for k, prefix in enumerate(prefixes):
            assert prefix.spec.name == f"prefix{k}" and prefix.spec.inputs == ("input",)
            assert prefix.spec.members == 2 ** k
            (logits,) = prefix(x)
            torch.testing.assert_close(logits, members[: 2 ** k].sum(0), rtol=1e-4, atol=1e-5)


def test_stages_share_the_model_storage() -> None:
    torch.manual_seed(4)
    model = tiny(2).eval()
    x = image(2)
    stages = model.stages()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for stage in stages:
        for p in stage.parameters():
            assert p.untyped_storage().data_ptr() in params
    with torch.no_grad():
        before = run_stages(stages, x)[2]["logits"].clone()
        model.head.fc.bias += 1.0  # an in-place update, as an optimiser step does
        after = run_stages(stages, x)[2]["logits"]
    # stage 2 sums 2 members: each gains +1 on every class
    torch.testing.assert_close(after, before + 2.0)


def test_stage_costs_add_up_to_the_tree() -> None:
    """Every node is computed by exactly one stage: MACs and parameters add up to the model's."""
    model = tiny(3)
    costs = stage_costs(model.stages(), (1, 8, 8))
    total = count_cost(model, torch.zeros(1, 1, 8, 8))
    assert sum(c.macs for c in costs) == total.macs
    assert sum(c.params for c in costs) == total.params
    assert costs[0] == count_cost(tiny(0), torch.zeros(1, 1, 8, 8))  # stage 0 = one member


@pytest.mark.slow
def test_stages_export_to_onnx_with_dynamic_batch(tmp_path: Any) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(5)
    model = tiny(1).eval()
    x = image(3)
    stages = model.stages()
    with torch.no_grad():
        outs = run_stages(stages, x)
        small = run_stages(stages, x[:2])
    for k, stage in enumerate(stages):
        args = tuple(x if b == "input" else outs[int(b[5:].split(":")[0])][b.split(":")[1]] for b in stage.spec.inputs)
        path = tmp_path / f"stage{k}.onnx"
        batch = torch.export.Dim("batch")
        torch.onnx.export(stage, args, str(path), dynamo=True, input_names=[f"in{i}" for i in range(len(args))],
                          output_names=list(stage.spec.outputs), dynamic_shapes=tuple({0: batch} for _ in args))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {f"in{i}": (x[:2] if b == "input" else small[0][b.split(":")[1]]).numpy()
                 for i, b in enumerate(stage.spec.inputs)}
        got = session.run(None, feeds)
        for name, value in zip(stage.spec.outputs, got):
            torch.testing.assert_close(torch.from_numpy(value), small[k][name], rtol=1e-4, atol=1e-5)
