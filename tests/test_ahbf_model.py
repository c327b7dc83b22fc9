"""AHBF-OKD model: hierarchical branches, fusion, and the extracted student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdedge.models import create_model
from kdedge.models.ahbf import AHBFNet, AHBFStudent
from kdedge.models.ahbf_branches import branch_blocks
from kdedge.models.backbones import CifarResNet
from kdedge.models.stages import check_stage_list, combine_torch, run_stages


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny(**kw) -> AHBFNet:
    args = dict(num_classes=10, in_channels=1, input_size=(16, 16), backbone="resnet8", width=4, branches=3, aux=1)
    args.update(kw)
    return create_model("ahbf", **args)


def settle_bn(model: nn.Module, in_channels: int = 1, size: int = 16) -> None:
    """A few train-mode passes so BatchNorm statistics are not the identity."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, in_channels, size, size) * 2 + 0.5)
    model.eval()


# --- branch depths ------------------------------------------------------------------------


def test_branch_blocks_hierarchical_cifar_adds_aux_per_level() -> None:
    # ResNet-32: branch m owns layer3 with 5 + (m-1)·a blocks
    assert branch_blocks([5], branches=4, aux=4) == [(5,), (9,), (13,), (17,)]


def test_branch_blocks_distribute_lower_stage_first() -> None:
    assert branch_blocks([2, 2], branches=4, aux=2) == [(2, 2), (4, 2), (4, 4), (6, 4)]
    assert branch_blocks([3, 3, 1], branches=5, aux=2) == [(3, 3, 1), (5, 3, 1), (5, 5, 1), (5, 5, 3), (7, 5, 3)]


def test_branch_blocks_compression_removes_top_stage_first_and_keeps_target_full() -> None:
    assert branch_blocks([5, 5], branches=4, aux=2, compression=True) == [(3, 1), (3, 3), (5, 3), (5, 5)]
    # single-block stages (MobileNetV2's 320-channel stage) are never reduced
    assert branch_blocks([3, 3, 1], branches=3, aux=1, compression=True) == [(2, 2, 1), (3, 2, 1), (3, 3, 1)]


def test_branch_blocks_compression_too_many_branches_names_the_limit() -> None:
    with pytest.raises(ValueError, match="at most 3 branches"):
        branch_blocks([5, 5], branches=5, aux=3, compression=True, stage_names=["layer2", "layer3"])


@pytest.mark.parametrize("backbone,blocks", [("resnet32", [(5,), (9,), (13,), (17,)]),
                                             ("resnet110", [(18,), (22,), (26,), (30,)])])
def test_cifar_resnet_branches_match_the_paper(backbone: str, blocks: list) -> None:
    m = create_model("ahbf", num_classes=100, input_size=(32, 32), backbone=backbone)
    assert m.blocks == blocks and m.stage_names == ("layer3",)
    assert [len(b[0]) for b in m.branches] == [b[0] for b in blocks]
    assert len(m.fusions) == 3 and m.target == 0


# --- forward and fusion -------------------------------------------------------------------


def test_forward_returns_every_branch_and_teacher_assistant() -> None:
    m = tiny(branches=4)
    out = m(torch.randn(4, 1, 16, 16))
    assert len(out.branches) == 4 and len(out.tas) == 3 and len(out.scores) == 3
    assert all(t.shape == (4, 10) for t in out.branches + out.tas)
    assert out.logits is out.branches[0] and out.ensemble is None


def test_teacher_assistants_follow_eq8_recursively() -> None:
    m = tiny(branches=4)
    settle_bn(m)
    out = m(torch.randn(5, 1, 16, 16))
    prev = out.branches[0]  # ta(1) = branch 1
    for k, (ta, s) in enumerate(zip(out.tas, out.scores)):
        assert s.shape == (5, 2)
        torch.testing.assert_close(s.sum(1), torch.ones(5))
        torch.testing.assert_close(ta, s[:, :1] * out.branches[k + 1] + s[:, 1:] * prev)
        prev = ta


def test_one_gate_is_a_convex_combination_of_branches() -> None:
    m = tiny(fusion="one", branches=3)
    settle_bn(m)
    out = m(torch.randn(5, 1, 16, 16))
    (gate,) = out.scores
    assert gate.shape == (5, 3) and not out.tas and len(m.fusions) == 0
    torch.testing.assert_close(out.ensemble, sum(gate[:, k:k + 1] * out.branches[k] for k in range(3)))


def test_fusion_none_has_no_fusion_parameters() -> None:
    m = tiny(fusion="none")
    assert m.gate is None and len(m.fusions) == 0
    out = m(torch.randn(2, 1, 16, 16))
    assert out.tas == [] and out.ensemble is None


# --- the student --------------------------------------------------------------------------


def test_student_is_identical_to_target_branch_in_eval_mode() -> None:
    m = tiny(branches=3)
    settle_bn(m)
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        ref = m(x).branches[0]
        got = m.student()(x)
    assert isinstance(m.student(), AHBFStudent)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_every_branch_extracts_exactly(branch: int) -> None:
    m = tiny(branches=3)
    settle_bn(m)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(m.student(branch).eval()(x), m(x).branches[branch])


def test_student_owns_no_auxiliary_or_fusion_parameter_and_shares_nothing() -> None:
    m = tiny(branches=3)
    vanilla = CifarResNet(8, num_classes=10, in_channels=1, width=4)
    s = m.deploy()
    assert not s.training
    assert n_params(s) == n_params(vanilla) < n_params(m)
    assert sum(b.numel() for b in s.buffers()) == sum(b.numel() for b in vanilla.buffers())
    assert not any(k.startswith(("fusions", "gate")) for k in s.state_dict())
    model_ptrs = {p.data_ptr() for p in m.parameters()} | {b.data_ptr() for b in m.buffers()}
    assert not any(p.data_ptr() in model_ptrs for p in list(s.parameters()) + list(s.buffers()))


@pytest.mark.parametrize("backbone,vanilla,kwargs,size", [
    ("resnet32", "resnet32", {}, 32),
    ("resnet110", "resnet110", {}, 32),
    ("mobilenetv2", "mobilenetv2", {"width_mult": 0.5}, 32),
    ("tv_resnet18", "tv_resnet18", {}, 64),
])
def test_student_parameter_count_equals_vanilla_backbone(backbone: str, vanilla: str, kwargs: dict, size: int) -> None:
    branches = 2 if backbone.startswith("tv_") else 4  # two torchvision ResNets keep the test fast
    m = create_model("ahbf", num_classes=100, input_size=(size, size), backbone=backbone, branches=branches)
    v = create_model(vanilla, num_classes=100, input_size=(size, size), **kwargs)
    assert n_params(m.student()) == n_params(v)
    assert sum(b.numel() for b in m.student().buffers()) == sum(b.numel() for b in v.buffers())


def test_compression_target_is_the_deepest_branch_and_equals_the_backbone() -> None:
    m = create_model("ahbf", num_classes=100, input_size=(32, 32), backbone="resnet32", branches=4, aux=2,
                     compression=True)
    assert m.target == 3 and m.stage_names == ("layer2", "layer3")
    assert m.blocks == [(3, 1), (3, 3), (5, 3), (5, 5)]
    v = create_model("resnet32", num_classes=100)
    assert n_params(m.student()) == n_params(v)
    smaller = [n_params(m.student(b)) for b in range(4)]
    assert smaller == sorted(smaller) and smaller[0] < smaller[3]
    assert m.student(1).meta["blocks"] == {"layer2": 3, "layer3": 3} and m.student().meta["target"]


def test_compression_branches_extract_exactly() -> None:
    m = tiny(backbone="resnet14", branches=3, aux=1, compression=True)  # layer2/layer3 of 2 blocks
    assert m.blocks == [(1, 1), (2, 1), (2, 2)] and m.target == 2
    settle_bn(m)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = m(x)
        assert torch.equal(m.student()(x), out.logits)
        for b in range(3):
            assert torch.equal(m.student(b).eval()(x), out.branches[b])


def test_student_is_a_one_stage_anytime_model() -> None:
    m = tiny()
    settle_bn(m)
    s = m.deploy()
    stages = s.stages()
    check_stage_list(stages)
    (stage,) = stages
    assert stage.spec.name == "stage0" and stage.spec.inputs == ("input",)
    assert stage.spec.outputs == ("logits",) and stage.spec.members == 1
    assert s.combine_rules == ("last",) and s.prefixes() == []
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        (outs,) = run_stages(stages, x)
        assert torch.equal(outs["logits"], s(x))
        torch.testing.assert_close(combine_torch("last", [outs["logits"]], [1]), torch.softmax(s(x), 1))
    assert s.stage_meta()["family"] == "ahbf" and s.stage_meta()["branch"] == 0


def test_student_exports_to_onnx_with_dynamic_batch_and_no_auxiliary_weights(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = tiny(branches=3)
    settle_bn(m)
    s = m.deploy()
    path = tmp_path / "student.onnx"
    batch = torch.export.Dim("batch", min=1)
    # optimize=False keeps BatchNormalization as its own node, so initializers map 1:1 to tensors
    torch.onnx.export(s, (torch.randn(2, 1, 16, 16),), str(path), dynamo=True, optimize=False,
                      dynamic_shapes={"x": {0: batch}}, input_names=["input"], output_names=["logits"])
    model = onnx.load(str(path))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    exported = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)
    needed = n_params(s) + sum(b.numel() for name, b in s.named_buffers() if not name.endswith("num_batches_tracked"))
    assert exported == needed
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 1, 16, 16)
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, m(x).branches[0].numpy(), rtol=1e-4, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"branches": 0}, "branches must be"),
    ({"aux": -1}, "aux"),
    ({"branches": 1}, "fusion 'ahbf' needs branches >= 2"),
    ({"fusion": "gated"}, "unknown fusion"),
    ({"backbone": "resnet18"}, "tv_resnet18"),
    ({"backbone": "vgg16"}, "unknown ahbf backbone"),
    ({"backbone": "tv_vgg16", "width": None}, "not a torchvision ResNet"),
    ({"width_mult": 0.5}, "mobilenetv2 backbone only"),
    ({"backbone": "resnet14", "branches": 4, "aux": 1, "compression": True}, "at most 3 branches"),
    ({"compression": True, "aux": 0}, "compression mode needs aux >= 1"),
    ({"compression": True, "branches": 2}, "single block"),
    ({"input_size": (4, 4)}, "at least 8x8"),
])
def test_bad_configurations_fail_at_build_time(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize("branch", [3, -1, 1.0, True])
def test_extracting_a_missing_branch_fails_clearly(branch) -> None:
    m = tiny(branches=3)
    with pytest.raises(ValueError, match="no branch"):
        m.student(branch)


def test_single_branch_without_fusion_is_the_vanilla_network() -> None:
    m = tiny(branches=1, fusion="none")
    vanilla = CifarResNet(8, num_classes=10, in_channels=1, width=4)
    assert n_params(m) == n_params(vanilla)
