"""MSDNet stages defer scales: stage k computes only what exits 0..k need, checked against an
independent trace of what each exit's logits depend on (torch's autograd graph), and the
stages still give every exit bit for bit and export and run through the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdedge.models import create_model
from kdedge.models.flops import stage_costs
from kdedge.models.msdnet import IMAGE, PRESETS, node_reads, plan_columns, plan_stages
from kdedge.models.stages import check_stage_list, combine_torch, run_stages

CONFIGS: list[tuple[dict[str, Any], tuple[int, int, int]]] = [
    (dict(config="tiny"), (1, 8, 8)),
    (dict(config="tiny", prune="max", num_exits=4), (1, 8, 8)),
    # one layer between exits: a stage that does not advance scale 0 leaves it to a later stage,
    # which then reads it from the stage before the previous one
    (dict(config="tiny", prune="none", num_scales=3, scale_channels=[2, 4, 8], num_exits=4), (3, 12, 12)),
    (dict(config="tiny", prune="max", num_scales=3, scale_channels=[2, 4, 8], num_exits=5), (3, 12, 12)),
    (dict(config="small"), (1, 28, 28)),
    (dict(config="tiny", stem="imagenet"), (3, 32, 32)),
    (dict(config="small", layers_to_first_exit=1, layers_between_exits=3, reduction=0.0), (1, 28, 28)),
]


def _model(kwargs: dict[str, Any], shape: tuple[int, int, int], classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("msdnet", num_classes=classes, in_channels=shape[0], input_size=shape[1:], **kwargs)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BN statistics, so equality is not an accident of fresh BN
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _traced_macs(model: nn.Module, shape: tuple[int, int, int]) -> list[int]:
    """MACs of the convolutions and linear layers that exits 0..k depend on, for every k: the
    union of the autograd ancestors of the logits of exits 0..k (one sample)."""
    cost: dict[Any, int] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            macs = out[0].numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs = mod.in_features * mod.out_features
        cost[out.grad_fn] = macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        logits = model(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    seen: set[Any] = set()
    out = []
    for z in logits:
        todo = [z.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
        out.append(sum(c for fn, c in cost.items() if fn in seen))
    return out


@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_stages_compute_exactly_what_the_exits_so_far_depend_on(kwargs, shape):
    model = _model(kwargs, shape)
    costs = [c.macs for c in stage_costs(model.stages(), shape)]
    assert np.cumsum(costs).tolist() == _traced_macs(model, shape)


@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_stages_give_every_exit_bit_for_bit(kwargs, shape):
    model = _model(kwargs, shape)
    x = torch.randn(3, *shape)
    stages = model.stages()
    check_stage_list(stages)
    with torch.no_grad():
        full = model(x)
        outs = run_stages(stages, x)
    for k, (z, o) in enumerate(zip(full, outs)):
        assert torch.equal(z, o["logits"]), f"exit {k}"
    # each stage holds the weights it uses, and no other stage holds them
    owned = [{id(p) for p in s.parameters()} for s in stages]
    for j in range(len(owned)):
        for k in range(j + 1, len(owned)):
            assert not owned[j] & owned[k], (j, k)


@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_plan_computes_each_node_once_after_what_it_reads(kwargs, shape):
    cfg = _model(kwargs, shape).cfg
    columns, exit_cols = plan_columns(cfg)
    plans = plan_stages(columns, exit_cols)
    where: dict[tuple[int, int], int] = {}
    for m, plan in enumerate(plans):
        assert plan.exit_node == (cfg.num_scales - 1, exit_cols[m]) and plan.exit_node in plan.nodes
        for node in plan.nodes:
            assert node not in where, f"{node} computed twice"
            for read in node_reads(columns, node):
                if read is None or read == IMAGE:
                    continue
                # read earlier in this stage, or carried from the stage that computed it
                assert read in where, (m, node, read)
                if where[read] != m:
                    assert (*read, where[read]) in plan.inputs and read in plans[where[read]].carry
            where[node] = m
        assert len({s for s, _, _ in plan.inputs}) == len(plan.inputs) <= cfg.num_scales
    assert plans[-1].carry == ()


def test_cifar_first_exit_costs_its_cone_only():
    model = create_model("msdnet", num_classes=100, in_channels=3, input_size=(32, 32), config="cifar").eval()
    costs = stage_costs(model.stages(), (3, 32, 32))
    # exit 1 used to be charged 15.33 M MACs, 4.8 M of them for scales only later exits read
    assert costs[0].macs <= 11e6
    assert sum(c.macs for c in costs) == pytest.approx(209.66e6, rel=1e-3)  # nothing added, nothing lost
    meta = model.stage_meta()
    # stage 0 computes scale 0 up to layer 2, scale 1 up to 3, scale 2 up to the exit at 4
    assert meta["stage_columns"][0] == [[0, 2], [0, 3], [0, 4]]
    assert plan_stages(*plan_columns(PRESETS["cifar"]))[0].carry == ((0, 2), (1, 3), (2, 4))


@pytest.mark.slow
@pytest.mark.parametrize("bind", [True, False])
def test_deferred_stages_export_and_run_in_the_runner(tmp_path: Path, bind: bool) -> None:
    from kdedge.export import export
    from kdedge.runtime import Confidence, Fixed, Runner

    kwargs, shape = CONFIGS[2]  # stage 2 reads scale 0 from stage 0
    model = _model(kwargs, shape, classes=10)
    stages = model.stages()
    assert "stage0:s0" in stages[2].spec.inputs
    info = {"name": "synthetic", "num_classes": 10, "in_channels": 3, "input_size": list(shape[1:]),
            "mean": [0.5] * 3, "std": [0.25] * 3, "scale": 1 / 255, "channel_order": "RGB",
            "class_names": [str(i) for i in range(10)], "resize": None}
    x = np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)
    path = export(model, tmp_path / "msdnet.kdedge", info=info, val_data=(x, np.arange(16) % 10))
    with torch.no_grad():
        outs = run_stages(stages, torch.from_numpy(x))
    logits = [o["logits"] for o in outs]
    with Runner(path, threads=1, bind=bind) as r:
        assert r.bundle.manifest["stages"][0]["macs"] == stage_costs(stages, shape)[0].macs
        for rule in r.bundle.combine_supported:
            with Runner(path, threads=1, combine=rule, bind=bind) as rr:
                res = rr.run(x)
            ref = combine_torch(rule, logits, [1] * len(logits)).double().numpy()
            np.testing.assert_allclose(res.probs, ref, atol=5e-5, err_msg=rule)
        for k in range(1, r.num_stages + 1):
            assert set(r.run(x, Fixed(k)).stage.tolist()) == {k - 1}
        # samples leave after different stages: the carried scales of the others are gathered
        probs = combine_torch("mean_probs", logits[:2], [1, 1]).max(-1).values.numpy()
        threshold = float(np.median(probs))
        res = r.run(x, Confidence([threshold, threshold, 1.0, 1.0]))
        assert 0 < int((res.stage == 1).sum()) < 16
        ref = combine_torch("mean_probs", logits, [1] * 4).double().numpy()
        deep = res.stage == 3
        np.testing.assert_allclose(res.probs[deep], ref[deep], atol=5e-5)
