"""Multi-exit architectures: MSDNet and exits on backbones; their stages reproduce every exit."""

from __future__ import annotations

import json

import pytest
import torch

from kdedge.models import UnknownNameError, create_model
from kdedge.models.flops import count_macs, stage_costs
from kdedge.models.msdnet import PRESETS, plan_columns
from kdedge.models.stages import check_stage_list, combine_torch, resolve_binding, run_stages

CASES = [
    ("msdnet", dict(config="tiny", num_classes=5, in_channels=1), (1, 8, 8)),
    ("msdnet", dict(config="tiny", num_classes=5, in_channels=1, prune="max", num_exits=4), (1, 8, 8)),
    ("msdnet", dict(config="tiny", num_classes=5, in_channels=3, prune="none", num_scales=3,
                    scale_channels=[2, 4, 8]), (3, 12, 12)),
    ("msdnet", dict(config="small", num_classes=10, in_channels=1), (1, 28, 28)),
    ("msdnet", dict(config="tiny", num_classes=5, in_channels=3, stem="imagenet"), (3, 32, 32)),
    ("multiexit", dict(num_classes=7, backbone="resnet20", exits=[2, 5, 9], backbone_args={"width": 4}), (3, 16, 16)),
    ("multiexit", dict(num_classes=7, in_channels=1, backbone="small_cnn", exits=[0, 1], head="linear",
                       backbone_args={"width": 4}), (1, 8, 8)),
    ("multiexit", dict(num_classes=7, backbone="mobilenetv2", exits=[2, 8], head_width=16,
                       backbone_args={"width_mult": 0.25}), (3, 16, 16)),
]


def _build(name, kwargs, shape):
    torch.manual_seed(0)
    return create_model(name, input_size=shape[1:], **kwargs)


def _perturb_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so eval-mode equality is not an accident of fresh BN."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_stages_reproduce_every_exit_exactly(name, kwargs, shape):
    model = _build(name, kwargs, shape)
    _perturb_bn(model)
    model.eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        full = model(x)
        stages = model.stages()
        check_stage_list(stages)
        outs = run_stages(stages, x)
    assert isinstance(full, list) and len(full) == len(stages) == model.num_exits
    for k, (z, o, s) in enumerate(zip(full, outs, stages)):
        assert s.spec.members == 1
        assert z.shape == (3, kwargs["num_classes"])
        assert torch.equal(z, o[s.spec.logits]), f"exit {k} differs"
    # the last stage carries nothing; every input is an output of an earlier stage (MSDNet may
    # bind a scale to the stage before the previous one, when the previous one did not advance it)
    assert stages[-1].spec.outputs == ("logits",)
    read = set()
    for k in range(1, len(stages)):
        for b in stages[k].spec.inputs:
            src, _, tensor = b.partition(":")
            j = int(src.removeprefix("stage"))
            assert j < k and tensor in stages[j].spec.outputs, (k, b)
            if name == "multiexit":  # a backbone stage reads the feature map of the one before
                assert j == k - 1
            read.add(f"stage{j}:{tensor}")
    # and every carried output is read by some later stage
    assert read == {f"{s.spec.name}:{o}" for s in stages[:-1] for o in s.spec.outputs if o != s.spec.logits}
    # the anytime combination of the stages equals the mean of the full forward's probabilities
    probs = combine_torch("mean_probs", [o["logits"] for o in outs], [1] * len(outs))
    assert torch.allclose(probs, torch.stack([z.softmax(-1) for z in full]).mean(0))


@pytest.mark.parametrize("name,kwargs,shape", CASES[:1] + CASES[5:6], ids=["msdnet", "resnet"])
def test_stages_share_parameters_and_split_the_cost(name, kwargs, shape):
    model = _build(name, kwargs, shape).eval()
    stages = model.stages()
    model_params = {id(p) for p in model.parameters()}
    stage_params = {id(p) for s in stages for p in s.parameters()}
    assert stage_params == model_params  # shared, none copied, none left out
    costs = stage_costs(stages, shape)
    # stages recompute nothing: their MACs add up to one forward of the whole network
    assert sum(c.macs for c in costs) == count_macs(model, torch.zeros(1, *shape))
    assert sum(c.params for c in costs) == sum(p.numel() for p in model.parameters())
    assert model.combine_rules == ("mean_probs", "last")
    assert model.prefixes() == []
    json.dumps(model.stage_meta())


def test_training_forward_in_train_mode_gives_gradients_to_every_exit():
    model = _build(*CASES[0])
    out = model(torch.randn(4, 1, 8, 8))
    sum(z.sum() for z in out).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_msdnet_cifar_is_the_papers_configuration():
    cfg = PRESETS["cifar"]
    assert (cfg.num_scales, cfg.num_exits, cfg.layers_to_first_exit, cfg.layers_between_exits) == (3, 11, 4, 2)
    columns, exit_cols = plan_columns(cfg)
    layers = [c for c in columns if c.kind == "layer"]
    assert len(layers) == 24 == cfg.num_layers  # 3 x 24 blocks
    # exits after layers 4, 6, ..., 24: count the layers up to each exit column
    layers_before = [sum(1 for c in columns[: e + 1] if c.kind == "layer") for e in exit_cols]
    assert layers_before == list(range(4, 25, 2))
    assert columns[0].channels == (6, 12, 24)
    assert columns[1].channels == (12, 24, 48)  # growth 6 / 12 / 24 per layer
    assert [i for i, c in enumerate(columns) if c.kind == "transition"] == [9, 18]  # after layers 8 and 16
    assert columns[9].channels == (24, 48, 96)  # floor(9 * 0.5) = 4 units
    assert columns[-2].channels[0] == 0 and columns[-1].channels[:2] == (0, 0)  # "min" pruning at the end
    model = create_model("msdnet", num_classes=100, in_channels=3, input_size=(32, 32), config="cifar").eval()
    assert model.num_exits == 11
    head = model.exits[0]
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(128, (3, 3), (2, 2))] * 2
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert len(out) == 11 and all(z.shape == (2, 100) for z in out)


def test_default_exits_sit_at_the_end_of_each_resolution():
    model = create_model("multiexit", num_classes=10, input_size=(32, 32), backbone="resnet20",
                         backbone_args={"width": 4})
    # resnet20 blocks: stem, 3 x layer1, 3 x layer2, 3 x layer3 -> ends of resolutions at 3, 6, last 9
    assert model.exit_blocks == (3, 6, 9)


def test_backbone_multiexit_state_dict_has_unique_keys_and_saves(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _build(*CASES[5])
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    again = _build(*CASES[5])
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), again.eval()(x)))


@pytest.mark.parametrize("exits,match", [
    ([3, 99], r"no exit position 99; valid positions are 0\.\.9"),
    ([-1], r"no exit position -1"),
    ([5, 3], "strictly increasing"),
    ([2, 2], "strictly increasing"),
])
def test_bad_exit_positions_fail_at_build_time_listing_valid_ones(exits, match):
    with pytest.raises(ValueError, match=match) as info:
        create_model("multiexit", num_classes=10, input_size=(32, 32), backbone="resnet20", exits=exits)
    if "valid" in match:
        assert "0: 16x32x32" in str(info.value)  # the message lists block output shapes


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="resnet20", head="mlp"), "unknown head 'mlp'"),
    (dict(backbone="msdnet"), "not a backbone"),
    (dict(backbone="resnet20", head_width=0), "head_width"),
    (dict(backbone="resnet21"), "did you mean"),
])
def test_bad_backbone_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("multiexit", num_classes=10, input_size=(32, 32), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(config="huge"), "unknown config 'huge'"),
    (dict(config="tiny", scale_channels=[2, 3]), "make scale_channels\\[1\\] even"),
    (dict(config="tiny", scale_channels=[2, 4, 8]), "3 entries for num_scales=2"),
    (dict(config="tiny", prune="most"), "prune must be"),
    (dict(config="tiny", num_exits=0), "num_exits must be an integer >= 1"),
    (dict(config="tiny", num_scales=9, scale_channels=[2] * 9), "num_scales must be at most 8"),
    (dict(config="cifar", input_size=(2, 2)), "need inputs of at least 4x4"),
])
def test_bad_msdnet_options(kwargs, match):
    kwargs = {"input_size": (8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        create_model("msdnet", num_classes=10, in_channels=1, **kwargs)


def test_unknown_builder_option_is_suggested():
    with pytest.raises(UnknownNameError, match="did you mean 'num_exits'"):
        create_model("msdnet", num_classes=10, num_exit=3)


@pytest.mark.slow
def test_tiny_msdnet_stages_export_to_onnx_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = create_model("msdnet", config="tiny", num_exits=2, num_classes=5, in_channels=1, input_size=(8, 8))
    _perturb_bn(model)
    model.eval()
    stages = model.stages()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        outs = run_stages(stages, x)
        x5 = torch.randn(5, 1, 8, 8)
        outs5 = run_stages(stages, x5)
    for k, stage in enumerate(stages):
        args = tuple(resolve_binding(b, x, outs) for b in stage.spec.inputs)
        names = [f"in{i}" for i in range(len(args))]
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(stage, args, input_names=names, output_names=list(stage.spec.outputs),
                                    dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args), verbose=False)
        path = tmp_path / f"stage{k}.onnx"
        program.save(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # a batch size other than the export's: the batch dimension is symbolic
        feeds5 = tuple(resolve_binding(b, x5, outs5) for b in stage.spec.inputs)
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, feeds5)})
        for name, value in zip(stage.spec.outputs, got):
            ref = outs5[k][name].numpy()
            assert value.shape == ref.shape
            assert abs(value - ref).max() < 1e-4, (k, name)
