"""The runner on bundles of all three families (HNE, the AHBF student, multi-exit), against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdedge.models import create_model
from kdedge.models.stages import combine_torch, run_stages
from kdedge.runtime import Confidence, Deadline, Fixed, Runner

INFO = {"name": "digits", "num_classes": 10, "in_channels": 1, "input_size": [8, 8], "mean": [0.3], "std": [0.4],
        "scale": 1 / 16, "channel_order": "L", "class_names": [str(i) for i in range(10)], "resize": None}

FAMILIES = {
    "hne": dict(name="hne", config="tiny", B=2),
    "ahbf": dict(name="ahbf", backbone="resnet8", width=4, branches=2, aux=1),
    "multiexit": dict(name="multiexit", backbone="small_cnn"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_runner_matches_torch_on_every_family(family: str, tmp_path: Path) -> None:
    from kdedge.export import export

    torch.manual_seed(0)
    kw = dict(FAMILIES[family])
    model = create_model(kw.pop("name"), num_classes=10, in_channels=1, input_size=(8, 8), **kw).eval()
    x = np.random.default_rng(0).standard_normal((24, 1, 8, 8)).astype(np.float32)
    y = np.arange(24) % 10
    path = export(model, tmp_path / f"{family}.kdedge", info=INFO, val_data=(x, y), exporter="legacy")
    deployed = model.deploy() if hasattr(model, "deploy") else model
    stages = deployed.stages()
    with torch.no_grad():
        outs = run_stages(stages, torch.from_numpy(x))
    logits = [o[s.spec.logits] for o, s in zip(outs, stages)]
    members = [s.spec.members for s in stages]
    with Runner(path, threads=1) as r:
        for rule in r.bundle.combine_supported:
            with Runner(path, threads=1, combine=rule) as rr:
                res = rr.run(x)
            ref = combine_torch(rule, logits, members).double().numpy()
            np.testing.assert_allclose(res.probs, ref, atol=5e-5, err_msg=f"{family} {rule}")
            assert res.stage.tolist() == [len(stages) - 1] * 24
        # every policy runs on every family
        for k in range(1, r.num_stages + 1):
            res = r.run(x, Fixed(k))
            assert set(res.stage.tolist()) == {k - 1}
        assert r.run(x, Deadline(1e-6, latencies_ms=[1.0] * r.num_stages)).stage.tolist() == [0] * 24
        res = r.run(x, Confidence(0.0))
        assert res.stage.tolist() == [0] * 24
