"""The multiexit training method: config, model checks, training step, annealing state, evaluation,
recipes, and a short run through the fit loop with an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdedge.models import create_model
from kdedge.train.config import load_config
from kdedge.train.evaluate import evaluate_model
from kdedge.train.fields import ConfigError, build_dataclass
from kdedge.train.losses.multiexit import exitwise_loss, multiexit_loss, teacher_sets
from kdedge.train.task import get_task_class
from kdedge.train.tasks.multiexit import MultiExitConfig, MultiExitTask

REPO = Path(__file__).resolve().parents[1]


def _task(**loss):
    cls = get_task_class("multiexit")
    assert cls is MultiExitTask
    return cls(build_dataclass(cls.Config, loss, "loss"), num_classes=4, epochs=1, steps_per_epoch=1)


def _tiny(num_exits=3):
    torch.manual_seed(0)
    return create_model("msdnet", config="tiny", num_exits=num_exits, num_classes=4, in_channels=1, input_size=(8, 8))


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("values,match", [
    ({"loss": "kd"}, "loss.loss must be one of exitwise, distill"),
    ({"C": 1.5}, r"loss.C must be a number in \[0, 1\]"),
    ({"T": 0.0}, "loss.T must be a positive temperature"),
    ({"mu": 1.0}, r"loss.mu must be a confidence bound in \(0, 1\)"),
    ({"tau_factor": 1.0}, "loss.tau_factor must be > 1"),
    ({"teachers": "all"}, "loss.teachers must be 'last', 'later'"),
    ({"tau_factr": 1.05}, "did you mean 'tau_factor'"),
])
def test_bad_loss_config(values, match):
    with pytest.raises(ConfigError, match=match):
        build_dataclass(MultiExitConfig, values, "loss")


def test_explicit_teacher_lists_parse_and_are_checked_against_the_model():
    task = _task(teachers=[[2], [2], []])
    task.check_model(_tiny())
    assert task.teachers == [(2,), (2,), ()]
    task = _task(teachers=[[3], [3], []])  # exit 3 does not exist in a 3-exit network
    with pytest.raises(ValueError, match=r"names exit 3, but the network has exits 0\.\.2"):
        task.check_model(_tiny())


def test_check_model_rejects_single_exit_models():
    with pytest.raises(ValueError, match="not a multi-exit network"):
        _task().check_model(create_model("small_cnn", num_classes=4, in_channels=1, input_size=(8, 8)))


def test_exitwise_step_is_eq7():
    task, model = _task(loss="exitwise"), _tiny().eval()
    task.check_model(model)
    x, y = _batch()
    out = task.training_step(model, x, y, 0.0)
    with torch.no_grad():
        assert torch.allclose(out["loss"], exitwise_loss(model(x), y))
    assert out["loss"].requires_grad and "temperature" not in out
    assert task.log_values() == {}


def test_distillation_step_and_annealing_after_every_batch():
    task, model = _task(mu=0.01), _tiny().eval()  # μ tiny: every batch is "too confident"
    task.check_model(model)
    x, y = _batch()
    out = task.training_step(model, x, y, 0.0)
    with torch.no_grad():
        expected, _, _ = multiexit_loss(model(x), y, teacher_sets("last", 3), T=1.0, C=0.5)
    assert torch.allclose(out["loss"], expected)
    assert float(out["temperature"]) == 1.0       # this batch used T = 1 ...
    assert task.temperature == pytest.approx(1.05)  # ... and the next one uses T·τ*
    out = task.training_step(model, x, y, 0.0)
    assert float(out["temperature"]) == pytest.approx(1.05)
    assert task.log_values() == {"temperature": pytest.approx(1.05 ** 2)}
    assert 0.0 < float(out["teacher_conf"]) <= 1.0
    # state for --resume
    state = json.loads(json.dumps(task.state_dict()))
    fresh = _task(mu=0.01)
    fresh.load_state_dict(state)
    assert fresh.temperature == task.temperature
    with pytest.raises(ValueError, match="invalid temperature"):
        fresh.load_state_dict({"temperature": -1})


def test_constant_temperature_and_high_mu_never_anneal():
    x, y = _batch()
    for task in (_task(anneal=False, mu=0.01, T=4.0), _task(mu=0.99)):
        model = _tiny()
        task.check_model(model)
        start = task.temperature
        for _ in range(3):
            task.training_step(model, x, y, 0.0)
        assert task.temperature == start


def test_semi_supervised_batches_train():
    task, model = _task(), _tiny()
    task.check_model(model)
    x, _ = _batch()
    out = task.training_step(model, x, torch.full((16,), -100), 0.0)  # no label at all
    out["loss"].backward()
    assert float(out["ce"]) == 0.0 and float(out["dist"]) > 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.exits[0].parameters())


def _loader(n, seed, bs=8):
    x, y = _batch(n, seed)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def test_evaluate_reports_exits_ensembles_macs_and_curves():
    task, model = _task(), _tiny()
    task.check_model(model)
    loader = _loader(24, 1)
    loader[1][1][:3] = -100  # unlabelled samples are not scored
    res = task.evaluate(model, loader, "cpu")
    json.dumps(res)
    assert res["n"] == 21 and len(res["per_exit"]) == len(res["anytime"]) == len(res["macs"]) == 3
    assert res["accuracy"] == res["anytime"][-1] and res["combine"] == "mean_probs"
    assert res["per_exit"][0] == res["anytime"][0]
    assert all(a < b for a, b in zip(res["macs"], res["macs"][1:]))  # cumulative
    assert res["curves"]["anytime"] == [[m, a] for m, a in zip(res["macs"], res["anytime"])]
    assert res["curves"]["per_exit"] == [[m, a] for m, a in zip(res["macs"], res["per_exit"])]
    # the same numbers as the generic anytime evaluation of kdedge.train.evaluate
    generic = evaluate_model(model, loader, "cpu")
    assert [s["accuracy_mean_probs"] for s in generic["stages"]] == pytest.approx(res["anytime"])
    assert [s["accuracy_last"] for s in generic["stages"]] == pytest.approx(res["per_exit"])
    assert model.training  # the model's mode is restored


def test_evaluate_modes_choose_on_validation_and_score_on_test():
    task, model = _task(), _tiny()
    task.check_model(model)
    val, test = _loader(32, 2), _loader(40, 3)
    res = task.evaluate_modes(model, val, test, "cpu", target_costs=[1e12])
    json.dumps(res)
    macs = res["test"]["macs"]
    for k, b in enumerate(res["budget"]):
        affordable = res["val_per_exit"][: k + 1]
        assert b["exit"] == affordable.index(max(affordable))  # chosen by validation accuracy
        assert b["accuracy"] == res["test"]["per_exit"][b["exit"]] and b["cost"] == macs[b["exit"]]
    assert len(res["early_exit"]) == 40 and len(res["targets"]) == 1
    assert res["targets"][0]["macs"] <= macs[-1]
    assert res["test"]["curves"]["budget"] == [[b["cost"], b["accuracy"]] for b in res["budget"]]


@pytest.mark.parametrize("name", ["multiexit_msdnet_cifar100", "multiexit_msdnet_cifar100_semi",
                                  "multiexit_resnet_cifar", "multiexit_mnist_demo"])
def test_recipes_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.root=/data/cifar"] if "cifar" in name else [])
    assert cfg.method == "multiexit" and isinstance(cfg.loss, MultiExitConfig)
    if "msdnet_cifar100" in name:  # the paper's Sec. 4.1 settings
        o = cfg.optim
        assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.milestones, cfg.train.epochs, cfg.data.batch_size) \
            == (0.5, 0.9, True, 1e-4, [150, 225], 300, 64)
        assert (cfg.loss.loss, cfg.loss.mu, cfg.loss.tau_factor, cfg.loss.teachers) == ("distill", 0.5, 1.05, "last")
    if name.endswith("semi"):
        assert cfg.data.unlabelled and cfg.data.per_class == 100
    shape = (3, 32, 32) if "cifar" in name else (1, 28, 28)
    model = create_model(cfg.model.name, num_classes=100 if "cifar" in name else 10, in_channels=shape[0],
                         input_size=shape[1:], **cfg.model.args)
    MultiExitTask(cfg.loss, num_classes=10, epochs=1, steps_per_epoch=1).check_model(model)


TINY_RUN = ["method=multiexit", "data.name=synthetic", "data.batch_size=32", "model.name=msdnet",
            "model.args.config=tiny", "train.epochs=2", "optim.lr=0.1", "train.device=cpu", "loss.mu=0.3"]


@pytest.mark.slow
def test_fit_trains_and_resumes_with_the_temperature(tmp_path: Path):
    from kdedge.train.engine import fit

    full = fit(load_config(None, TINY_RUN), tmp_path / "full")
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["temperature"] > 1.0  # annealing happened, so resume must restore it
    assert {"loss", "ce", "dist", "temperature", "teacher_conf"} <= set(records[0]["train"])
    assert len(full["test"]["per_exit"]) == 3 and "curves" in full["test"]
    assert fit(load_config(None, TINY_RUN), tmp_path / "part", stop_after_epochs=1)["status"] == "stopped"
    resumed = fit(load_config(None, TINY_RUN), tmp_path / "part", resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == full["test"]


def _rank_mean(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from kdedge.train.distributed import mean_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        value = mean_over_ranks(torch.tensor(0.2 + 0.6 * rank))  # ranks see 0.2 and 0.8
        Path(out, f"rank{rank}.txt").write_text(repr(float(value)))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_teacher_confidence_is_averaged_over_ranks(tmp_path: Path):
    """Every rank anneals from the same confidence, so the temperatures never drift apart."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_mean, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    values = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert values == pytest.approx([0.5, 0.5])
