"""AHBFTask: config validation, variant/model checks, training steps, evaluation, recipes, fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdedge.models import create_model
from kdedge.train.config import load_config
from kdedge.train.fields import ConfigError
from kdedge.train.losses.ahbf import ahbf_loss, rampup
from kdedge.train.task import get_task_class
from kdedge.train.tasks.ahbf import AHBFConfig, AHBFTask

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw):
    args = dict(num_classes=4, in_channels=1, input_size=(8, 8), backbone="resnet8", width=4, branches=3, aux=1)
    args.update(kw)
    return create_model("ahbf", **args)


def task(epochs: int = 10, **cfg) -> AHBFTask:
    return AHBFTask(AHBFConfig(**cfg), num_classes=4, epochs=epochs, steps_per_epoch=5)


def batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[:, 0, :4, :4] += (y == 0).float().view(-1, 1, 1) * 2  # one bright quadrant per class
    x[:, 0, :4, 4:] += (y == 1).float().view(-1, 1, 1) * 2
    x[:, 0, 4:, :4] += (y == 2).float().view(-1, 1, 1) * 2
    x[:, 0, 4:, 4:] += (y == 3).float().view(-1, 1, 1) * 2
    return x, y


# --- config -------------------------------------------------------------------------------


def test_registered_under_ahbf() -> None:
    assert get_task_class("ahbf") is AHBFTask
    assert AHBFTask.default_model["name"] == "ahbf"


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "okddip"}, "loss.variant"),
    ({"lambda1": -1.0}, "lambda1"),
    ({"tau": 0.0}, "tau"),
    ({"rampup_epochs": -5}, "rampup_epochs"),
    ({"variant": "one", "lambda1": 1.0}, "does not use them"),
    ({"variant": "ahbf", "kd_weight": 2.0}, "kd_weight"),
    ({"objective": "author"}, "loss.objective must be paper or authors, got 'author'"),
    ({"variant": "one", "objective": "authors"}, "loss.objective picks AHBF's distillation terms"),
])
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AHBFConfig(**kwargs)


def test_default_model_trains_on_8x8_digits() -> None:
    m = create_model("ahbf", num_classes=10, in_channels=1, input_size=(8, 8), **AHBFTask.default_model["args"])
    task().check_model(m)
    assert m(torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)


# --- model checks -------------------------------------------------------------------------


@pytest.mark.parametrize("variant,model_kw", [
    ("ahbf", {}), ("one", {"fusion": "one"}), ("cl", {"fusion": "none"}), ("dml", {"fusion": "none", "aux": 0}),
    ("vanilla", {"branches": 1, "fusion": "none"}),
])
def test_matching_variant_and_model_are_accepted(variant: str, model_kw: dict) -> None:
    task(variant=variant).check_model(tiny(**model_kw))


@pytest.mark.parametrize("variant,model_kw,match", [
    ("ahbf", {"fusion": "one"}, "fusion: ahbf"),
    ("one", {}, "fusion: one"),
    ("cl", {}, "fusion: none"),
    ("vanilla", {"fusion": "none"}, "branches: 1"),
    ("dml", {"branches": 1, "fusion": "none"}, "branches >= 2"),
])
def test_illegal_combinations_fail_clearly(variant: str, model_kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        task(variant=variant).check_model(tiny(**model_kw))


def test_other_models_are_refused() -> None:
    with pytest.raises(ValueError, match="model.name: ahbf"):
        task().check_model(create_model("small_cnn", num_classes=4))


# --- training steps -----------------------------------------------------------------------


def test_ahbf_step_returns_named_parts_and_trains_the_fusion() -> None:
    m, t = tiny(), task(epochs=10)
    x, y = batch()
    out = t.training_step(m, x, y, epoch=2.5)
    assert set(out) >= {"loss", "ce_branches", "ce_tas", "takl", "btkl", "omega", "s_branch2", "s_branch3"}
    assert out["loss"].requires_grad and not out["takl"].requires_grad
    assert t.omega == pytest.approx(rampup(2.5, 10)) == pytest.approx(float(out["omega"]))
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    assert float(m.fusions[1].fc.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("objective,lambda3,scale", [("paper", 0.0, 1.0), ("authors", 4.0, 0.75)])
def test_objective_picks_the_distillation_terms(objective: str, lambda3: float, scale: float) -> None:
    assert AHBFConfig().objective == "paper"  # the default is the paper's Eq. 11
    m, t = tiny(), task(epochs=10, objective=objective)
    x, y = batch()
    out = t.training_step(m, x, y, epoch=4.0)
    with torch.no_grad():  # the same forward (train mode: batch statistics), the loss by its formula
        fwd = m(x)
        expected = ahbf_loss(fwd.branches, fwd.tas, y, lambda1=4.0, lambda2=2.0, lambda3=lambda3, tau=3.0,
                             omega=rampup(4.0, 10), kd_scale=scale)
    assert torch.equal(out["loss"].detach(), expected["loss"])
    assert ("tbkl" in out) == (objective == "authors")
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_rampup_epochs_override_and_zero_disables_it() -> None:
    x, y = batch()
    t = task(epochs=300, rampup_epochs=30)
    t.training_step(tiny(), x, y, epoch=15.0)
    assert t.omega == pytest.approx(rampup(15, 30))
    t0 = task(rampup_epochs=0)
    t0.training_step(tiny(), x, y, epoch=0.0)
    assert t0.omega == 1.0


@pytest.mark.parametrize("variant,model_kw,keys", [
    ("one", {"fusion": "one"}, {"ce_ensemble", "kd"}),
    ("cl", {"fusion": "none"}, {"kd"}),
    ("dml", {"fusion": "none"}, {"kd"}),
    ("vanilla", {"branches": 1, "fusion": "none"}, {"ce_branches"}),
])
def test_baseline_steps_backpropagate(variant: str, model_kw: dict, keys: set) -> None:
    m, t = tiny(**model_kw), task(variant=variant)
    x, y = batch()
    out = t.training_step(m, x, y, epoch=5.0)
    assert keys <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_unlabelled_batch_still_distils() -> None:
    m, t = tiny(), task(rampup_epochs=0)
    x, _ = batch()
    out = t.training_step(m, x, torch.full((16,), -100), epoch=1.0)
    assert float(out["ce_branches"]) == 0.0 and float(out["loss"].detach()) > 0


@pytest.mark.parametrize("variant,model_kw", [("ahbf", {}), ("vanilla", {"branches": 1, "fusion": "none"})])
def test_a_few_steps_learn_an_easy_task(variant: str, model_kw: dict) -> None:
    torch.manual_seed(0)
    m, t = tiny(**model_kw), task(variant=variant, rampup_epochs=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    x, y = batch(32)
    first = None
    for _ in range(40):
        out = t.training_step(m, x, y, epoch=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = float(out["ce_branches"]) if first is None else first
    # the KL terms may grow while branches drift apart; the label fit must not
    assert float(out["ce_branches"]) < 0.2 * first
    with torch.no_grad():  # batch statistics: 40 steps are too few for settled running averages
        assert float((m(x).logits.argmax(1) == y).float().mean()) >= 0.9


# --- evaluation ---------------------------------------------------------------------------


def loader(n: int = 24, unlabelled: int = 0):
    x, y = batch(n, seed=3)
    y = y.clone()
    if unlabelled:
        y[:unlabelled] = -100
    return [(x[:10], y[:10]), (x[10:], y[10:])]


def test_evaluate_reports_target_branches_and_assistants() -> None:
    m, t = tiny(), task()
    res = t.evaluate(m, loader(), "cpu")
    keys = {"accuracy", "loss", "n", "target_branch", "accuracy_branch1", "accuracy_branch2", "accuracy_branch3",
            "accuracy_ta2", "accuracy_ta3", "accuracy_branch_mean", "macs", "params", "train_macs", "train_params"}
    assert keys <= set(res)
    assert res["accuracy"] == res["accuracy_branch1"] and res["target_branch"] == 1 and res["n"] == 24
    assert res["params"] == sum(p.numel() for p in m.student().parameters())
    assert res["macs"] < res["train_macs"] and res["params"] < res["train_params"]
    assert m.training  # the mode is restored
    json.dumps(res)


def test_evaluate_matches_the_deployed_student_and_skips_unlabelled() -> None:
    m, t = tiny(backbone="resnet14", branches=3, aux=1, compression=True), task()
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(8, 1, 8, 8))
    data = loader(unlabelled=5)
    res = t.evaluate(m, data, "cpu")
    assert res["target_branch"] == 3 and res["accuracy"] == res["accuracy_branch3"] and res["n"] == 19
    student = m.deploy()
    with torch.no_grad():
        correct = sum(int((student(x)[y != -100].argmax(1) == y[y != -100]).sum()) for x, y in data)
    assert res["accuracy"] == pytest.approx(correct / 19)
    assert t.evaluate(student, data, "cpu")["accuracy"] == pytest.approx(res["accuracy"])


def test_one_evaluation_reports_the_ensemble() -> None:
    res = task(variant="one").evaluate(tiny(fusion="one"), loader(), "cpu")
    assert "accuracy_ensemble" in res and "accuracy_ta2" not in res


# --- recipes and the fit loop -------------------------------------------------------------

RECIPES = sorted(p.name for p in (ROOT / "configs").glob("ahbf_*.yaml"))


def test_all_recipes_are_present() -> None:
    assert set(RECIPES) >= {"ahbf_resnet32_cifar100.yaml", "ahbf_resnet110_cifar100.yaml",
                            "ahbf_mobilenetv2_cifar100.yaml", "ahbf_resnet18_imagenet.yaml",
                            "ahbf_compression_cifar100.yaml", "ahbf_mnist_demo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_and_builds_its_model(recipe: str, tmp_path: Path) -> None:
    overrides = [f"data.root={tmp_path}"] if "mnist" not in recipe else []
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    assert cfg.method == "ahbf" and cfg.model.name == "ahbf"
    imagenet = cfg.data.name == "imagefolder"
    classes = 1000 if imagenet else (10 if "mnist" in recipe else 100)
    size = (cfg.data.image_size,) * 2 if imagenet else ((28, 28) if "mnist" in recipe else (32, 32))
    if imagenet:
        cfg.model.args["branches"] = 2  # four torchvision ResNets take a while to build; the split is the same
    model = create_model("ahbf", num_classes=classes, in_channels=1 if "mnist" in recipe else 3, input_size=size,
                         **cfg.model.args)
    AHBFTask(cfg.loss, num_classes=classes, epochs=cfg.train.epochs, steps_per_epoch=10).check_model(model)


def test_unknown_loss_key_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="lambda1"):
        load_config(ROOT / "configs" / "ahbf_mnist_demo.yaml", ["loss.lamda1=2"])


def test_the_authors_objective_is_a_recipe_option() -> None:
    cfg = load_config(ROOT / "configs" / "ahbf_mnist_demo.yaml", ["loss.objective=authors"])
    assert cfg.loss.objective == "authors"
    with pytest.raises(ConfigError, match="loss.objective must be paper or authors"):
        load_config(ROOT / "configs" / "ahbf_mnist_demo.yaml", ["loss.objective=author"])


def test_fit_trains_and_evaluates_every_branch(tmp_path: Path) -> None:
    from kdedge.train.engine import fit

    cfg = load_config(base={
        "method": "ahbf", "seed": 0,
        "data": {"name": "synthetic", "batch_size": 32, "augment": False},
        "model": {"name": "ahbf", "args": {"backbone": "resnet8", "width": 4, "branches": 3, "aux": 1}},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 2, "threads": 2},
        "loss": {"variant": "ahbf"},
    })
    res = fit(cfg, tmp_path / "run")
    assert res["status"] == "finished"
    assert {"accuracy_branch3", "accuracy_ta3"} <= set(res["test"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"takl", "btkl", "omega"} <= set(first["train"]) and "accuracy_ta2" in first["val"]
