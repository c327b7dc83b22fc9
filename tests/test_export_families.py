"""Every model family exports, verifies and evaluates through the same stage contract.

Tiny configurations, untrained weights (parity does not need training), 8x8 digits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers_anytime import digits
from onnx import numpy_helper
from torch.utils.data import DataLoader, TensorDataset

from kdedge.export import evaluate_bundle, export
from kdedge.export.graphs import deployed
from kdedge.models import create_model
from kdedge.targets import open_bundle

FAMILIES: dict[str, dict[str, Any]] = {
    "hne": dict(config="tiny", B=2),
    "ahbf": dict(backbone="resnet8", width=4, branches=3, aux=1),
    "msdnet": dict(config="tiny"),
    "multiexit": dict(backbone="resnet20", backbone_args={"width": 4}),
}


def _elements(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_verifies_and_evaluates(name: str, tmp_path: Path) -> None:
    from kdedge.train.evaluate import evaluate_model

    _, _, xv, yv, info = digits()
    x, y = xv[:64], yv[:64]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1, input_size=(8, 8), **FAMILIES[name]).eval()
    b = open_bundle(export(model, tmp_path / f"{name}.kdedge", info=info, val_data=(x, y)))
    assert b.manifest["verification"]["passed"]
    target = deployed(model)
    stages = target.stages()
    assert [s.name for s in b.stages] == [s.spec.name for s in stages]
    assert b.combine_supported == tuple(target.combine_rules)
    assert len(b.prefixes) == len(target.prefixes())

    # each stage file holds at most its own stage's weights
    modules = {m.spec.name: m for m in [*stages, *target.prefixes()]}
    for s in [*b.stages, *b.prefixes]:
        init = onnx.load(str(b.file(s, "onnx"))).graph.initializer
        count = sum(int(np.prod(numpy_helper.to_array(t).shape)) for t in init)
        assert count <= _elements(modules[s.name]) + 64, f"{name} {s.name}: {count} initializer elements"

    # the bundle evaluates as the torch model does
    ref = evaluate_model(target, DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32),
                         torch.device("cpu"))
    got = evaluate_bundle(b.path, x, y)
    for g, r in zip(got["stages"], ref["stages"]):
        for rule in b.combine_supported:
            assert g[f"accuracy_{rule}"] == pytest.approx(r[f"accuracy_{rule}"], abs=1.01 / len(y))


@pytest.mark.slow
def test_ahbf_bundle_holds_no_auxiliary_branch_or_fusion(tmp_path: Path) -> None:
    _, _, xv, yv, info = digits()
    torch.manual_seed(0)
    net = create_model("ahbf", num_classes=10, in_channels=1, input_size=(8, 8), **FAMILIES["ahbf"]).eval()
    b = open_bundle(export(net, tmp_path / "ahbf.kdedge", info=info, val_data=(xv[:32], yv[:32])))
    assert len(b.stages) == 1 and b.combine_supported == ("last",)
    init = onnx.load(str(b.file(b.stages[0], "onnx"))).graph.initializer
    count = sum(int(np.prod(numpy_helper.to_array(t).shape)) for t in init)
    student = net.deploy()
    # BatchNorm folds into the convolutions, so the file holds at most the student's parameters
    assert count <= _elements(student) + 64
    assert count < _elements(net) / 2, "the auxiliary branches and fusion modules must not reach the file"
    names = [t.name for t in init]
    assert not any("fusion" in n or "branches.1" in n or "branches.2" in n for n in names), names
