"""HNETask: options, model check, training steps of every loss, temperature annealing and its
resume state, the evaluation record (anytime accuracy, members, diversity, MACs, the paper's
complexity check), and the recipes in configs/."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kdedge.models import create_model
from kdedge.models.flops import count_cost, stage_costs
from kdedge.train.losses.hne import hne_loss
from kdedge.train.tasks.hne import HNEConfig, HNETask, complexity, summarize

CLASSES = 4
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def task(**kw: Any) -> HNETask:
    return HNETask(HNEConfig(**kw), num_classes=CLASSES, epochs=1, steps_per_epoch=1)


def tiny(B: int = 2) -> torch.nn.Module:
    return create_model("hne", num_classes=CLASSES, in_channels=1, input_size=(8, 8), config="tiny", B=B)


@pytest.mark.parametrize(
    "kw, match",
    [({"loss": "kd"}, "loss.loss"), ({"T": 0.0}, "loss.T"), ({"alpha": -0.1}, "loss.alpha"),
     ({"mu": 1.0}, "loss.mu"), ({"anneal_factor": 1.0}, "anneal_factor")],
)
def test_bad_options_fail_with_the_key_named(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HNEConfig(**kw)


def test_refuses_models_that_are_not_an_hne() -> None:
    with pytest.raises(ValueError, match="model.name: hne"):
        task().check_model(create_model("small_cnn", num_classes=CLASSES))
    with pytest.raises(ValueError, match="classes"):
        task().check_model(create_model("hne", num_classes=7, in_channels=1, config="tiny", B=1))
    task().check_model(tiny())


@pytest.mark.parametrize("loss", ["i", "s", "d", "hd"])
def test_training_step_returns_the_loss_and_its_parts(loss: str) -> None:
    torch.manual_seed(0)
    model = tiny(2)
    t = task(loss=loss, T=3.0, alpha=0.3)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, -100, -100])
    out = t.training_step(model, x, y, 0.0)
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert not out["ce"].requires_grad and not out["kd"].requires_grad
    with torch.no_grad():
        total, ce, kd = hne_loss(model(x), y, loss, 3.0, 0.3)
    torch.testing.assert_close(out["loss"].detach(), total)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kd"], kd)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)  # type: ignore[union-attr]
    assert ("teacher_conf" in out) == (loss in ("d", "hd"))


def test_annealing_raises_the_temperature_and_survives_resume() -> None:
    torch.manual_seed(1)
    model = tiny(1)
    t = task(anneal=True, mu=0.01, T=2.0)  # any teacher is more confident than 1 %
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    t.training_step(model, x, y, 0.0)
    t.training_step(model, x, y, 0.1)
    assert t.temperature == pytest.approx(2.0 * 1.05 ** 2)
    assert t.log_values() == {"temperature": t.temperature}
    state = json.loads(json.dumps(t.state_dict()))
    fresh = task(anneal=True, mu=0.01, T=2.0)
    fresh.load_state_dict(state)
    assert fresh.temperature == t.temperature
    with pytest.raises(ValueError, match="temperature"):
        fresh.load_state_dict({"temperature": -1.0})
    fixed = task(anneal=False, mu=0.01, T=2.0)
    fixed.training_step(model, x, y, 0.0)
    assert fixed.temperature == 2.0
    assert task(loss="i").log_values() == {}


def test_evaluate_reports_ensembles_members_diversity_and_cost() -> None:
    torch.manual_seed(2)
    B = 2
    model = tiny(B)
    xs = torch.randn(20, 1, 8, 8)
    ys = torch.randint(0, CLASSES, (20,))
    ys[3] = -100  # unlabelled samples are skipped
    loader = [(xs[:8], ys[:8]), (xs[8:], ys[8:])]
    res = task().evaluate(model, loader, torch.device("cpu"))
    json.dumps(res)  # JSON-able
    keep = ys != -100
    with torch.no_grad():
        model.eval()
        z = model(xs[keep])
    labels = ys[keep]
    assert res["n"] == int(keep.sum())
    want = [float((z[: 2 ** b].mean(0).argmax(-1) == labels).float().mean()) for b in range(B + 1)]
    assert res["ensemble_accuracy"] == pytest.approx(want)
    assert res["accuracy"] == pytest.approx(want[-1])
    assert res["member_accuracy"] == pytest.approx([float((z[n].argmax(-1) == labels).float().mean()) for n in range(4)])
    assert res["diversity"][0] == 0.0
    assert res["diversity"][2] == pytest.approx(float(z.std(0).mean()), rel=1e-5)
    macs = [c.macs for c in stage_costs(model.stages(), (1, 8, 8))]
    assert res["ensemble_macs"] == [sum(macs[: b + 1]) for b in range(B + 1)]
    assert [s["members"] for s in res["stages"]] == [1, 2, 4]
    assert res["curves"]["hne"] == [[m, a] for m, a in zip(res["ensemble_macs"], res["ensemble_accuracy"])]
    cx = res["complexity"]
    assert cx["tree_macs"] == count_cost(model, torch.zeros(1, 1, 8, 8)).macs
    assert cx["member_macs"] == count_cost(tiny(0), torch.zeros(1, 1, 8, 8)).macs
    assert cx["speedup_eq2"] == pytest.approx(3 / 1.75)


def test_complexity_matches_the_paper_for_equal_blocks() -> None:
    # B = 3, every block costs C: stage 0 = 4C, stage 1 = C, stage 2 = 3C, stage 3 = 7C
    C = 10
    cx = complexity([4 * C, C, 3 * C, 7 * C], 3)
    assert cx["block_macs"] == [C] * 4
    assert cx["tree_macs"] == cx["tree_macs_equal_blocks"] == (2 ** 4 - 1) * C
    assert cx["independent_macs"] == (3 + 1) * 8 * C
    assert cx["speedup"] == pytest.approx(cx["speedup_eq2"]) and cx["speedup_eq2"] == pytest.approx(4 / (2 - 2 ** -3))


def test_summarize_top5_and_shape_errors() -> None:
    z = torch.randn(2, 10, 8)
    res = summarize(z, torch.randint(0, 8, (10,)), [5, 3], 1)
    assert len(res["ensemble_top5"]) == 2
    with pytest.raises(ValueError, match="do not fit"):
        summarize(z, torch.zeros(10, dtype=torch.long), [5, 3, 1], 2)


# --- recipes --------------------------------------------------------------------------------

RECIPES = sorted(CONFIGS_DIR.glob("hne_*.yaml"))


def test_every_paper_recipe_exists() -> None:
    names = {p.stem for p in RECIPES}
    assert {"hne_cifar", "hne_small_cifar", "hne_mobilenetv2_imagenet", "hne_mnist_demo", "hne_independent_cifar",
            "hne_multibranch_cifar"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate_and_build(path: Path) -> None:
    from kdedge.train.config import load_config

    cfg = load_config(path)
    assert cfg.method == "hne" and cfg.model.name == "hne"
    assert isinstance(cfg.loss, HNEConfig)
    size = cfg.data.image_size or {"mnist5k": 28, "digits": 8}.get(cfg.data.name, 32)
    channels = 1 if cfg.data.name in ("mnist5k", "digits") else 3
    with torch.device("meta"):  # shapes only: the ImageNet tree has 10^8 parameters
        model = create_model("hne", num_classes=10, in_channels=channels, input_size=(size, size), **cfg.model.args)
    HNETask(cfg.loss, num_classes=10, epochs=cfg.train.epochs, steps_per_epoch=1).check_model(model)


def test_cifar_recipe_has_the_paper_hyper_parameters() -> None:
    from kdedge.train.config import load_config

    cfg = load_config(CONFIGS_DIR / "hne_cifar.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.schedule) == (0.1, 0.9, 5e-4, "cosine")
    assert (cfg.train.epochs, cfg.data.batch_size) == (200, 128)
    assert (cfg.loss.loss, cfg.loss.T, cfg.loss.alpha) == ("hd", 2.0, 0.5)
    assert cfg.model.args["config"] == "resnet" and cfg.model.args["B"] == 4
    assert math.isclose(cfg.loss.T, 2.0)
