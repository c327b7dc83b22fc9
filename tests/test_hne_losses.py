"""HNE losses: hand-computed values, gradients (the teacher gets none), unlabelled samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kdedge.train.losses.hne import (anneal_temperature, codistillation_loss, ensemble_confidence,
                                     hierarchical_distillation_loss, hne_loss, independent_loss, nested_loss,
                                     sub_ensembles)

# Two members, two classes, one sample of class 0: z_1 = (0, 0), z_2 = (2, 0).
Z = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
Y = torch.tensor([0])


def ce0(a: float, b: float) -> float:
    """Cross-entropy of softmax((a, b)) against class 0."""
    return math.log(1 + math.exp(b - a))


def softmax2(a: float, b: float) -> tuple[float, float]:
    p = 1 / (1 + math.exp(b - a))
    return p, 1 - p


def soft_ce(student: tuple[float, float], target: tuple[float, float]) -> float:
    log_q = [a - math.log(math.exp(student[0]) + math.exp(student[1])) for a in student]
    return -(target[0] * log_q[0] + target[1] * log_q[1])


def test_sub_ensembles_are_nested_means() -> None:
    z = torch.arange(4.0).reshape(4, 1, 1)
    assert sub_ensembles(z).flatten().tolist() == [0.0, 0.5, 1.5]


def test_hand_computed_values() -> None:
    T = 2.0
    # L_I (Eq. 3): CE(z_1) + CE(z_2)
    assert independent_loss(Z, Y).item() == pytest.approx(ce0(0, 0) + ce0(2, 0), rel=1e-6)
    # L_S (Eq. 4): CE(y_0 = z_1) + CE(y_1 = (1, 0))
    assert nested_loss(Z, Y).item() == pytest.approx(ce0(0, 0) + ce0(1, 0), rel=1e-6)
    teacher = softmax2(1 / T, 0)  # softmax(y_E / T), y_E = (1, 0)
    # L_HD (Eq. 6), B = 1: only b = 0, T² · ℓ(z_1 / T, teacher)
    assert hierarchical_distillation_loss(Z, T).item() == pytest.approx(T * T * soft_ce((0, 0), teacher), rel=1e-6)
    # L_D (Eq. 5): both members towards the ensemble
    want_d = T * T * (soft_ce((0, 0), teacher) + soft_ce((2 / T, 0), teacher))
    assert codistillation_loss(Z, T).item() == pytest.approx(want_d, rel=1e-6)
    total, ce, kd = hne_loss(Z, Y, "hd", T=T, alpha=0.25)
    assert total.item() == pytest.approx(0.75 * ce.item() + 0.25 * kd.item(), rel=1e-6)
    assert kd.item() == pytest.approx(T * T * soft_ce((0, 0), teacher), rel=1e-6)
    total, ce, kd = hne_loss(Z, Y, "s")
    assert total.item() == pytest.approx(ce0(0, 0) + ce0(1, 0), rel=1e-6) and kd.item() == 0.0


def _grad(fn, z: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    z = z.clone().requires_grad_(True)
    fn(z).backward()
    assert z.grad is not None
    return z.grad


def test_hierarchical_distillation_gradient_treats_the_teacher_as_constant() -> None:
    torch.manual_seed(0)
    T = 2.0
    z = torch.randn(4, 3, 5, dtype=torch.float64)
    g = _grad(lambda v: hierarchical_distillation_loss(v, T), z)
    # analytic: d/dz_n Σ_{b<B} T²·ℓ(y_b, p) = Σ_{b<B, n<2^b} T/2^b (softmax(y_b/T) − p) / batch
    ys = sub_ensembles(z)
    p = torch.softmax(ys[-1] / T, -1)
    want = torch.zeros_like(z)
    for b in range(2):  # B = 2
        for n in range(2 ** b):
            want[n] += T / 2 ** b * (torch.softmax(ys[b] / T, -1) - p) / z.shape[1]
    torch.testing.assert_close(g.to(want.dtype), want, rtol=1e-5, atol=1e-7)
    # the second half of the members is only in the teacher: no gradient at all
    assert torch.all(g[2:] == 0)


def test_codistillation_gradient_treats_the_teacher_as_constant() -> None:
    torch.manual_seed(1)
    T = 3.0
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    g = _grad(lambda v: codistillation_loss(v, T), z)
    p = torch.softmax(z.mean(0) / T, -1)
    want = T * (torch.softmax(z / T, -1) - p) / z.shape[1]
    torch.testing.assert_close(g.to(want.dtype), want, rtol=1e-5, atol=1e-7)


def test_independent_loss_gradient_is_each_members_own_ce() -> None:
    torch.manual_seed(2)
    z = torch.randn(4, 6, 3)
    y = torch.randint(0, 3, (6,))
    g = _grad(lambda v: independent_loss(v, y), z)
    want = (torch.softmax(z, -1) - torch.nn.functional.one_hot(y, 3)) / 6
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


def test_unlabelled_samples_only_enter_the_distillation_term() -> None:
    torch.manual_seed(3)
    z = torch.randn(4, 6, 3)
    y = torch.tensor([0, 1, 2, -100, -100, -100])
    total, ce, kd = hne_loss(z, y, "hd", T=2.0, alpha=0.5)
    # CE averaged over the three labelled samples only
    torch.testing.assert_close(ce, independent_loss(z[:, :3], y[:3]))
    # distillation over all six
    torch.testing.assert_close(kd, hierarchical_distillation_loss(z, 2.0))
    assert not torch.allclose(kd, hierarchical_distillation_loss(z[:, :3], 2.0))
    # a batch with no label at all: CE is zero but still connected, distillation still trains
    zz = z.clone().requires_grad_(True)
    total, ce, kd = hne_loss(zz, torch.full((6,), -100), "hd")
    assert ce.item() == 0.0 and kd.item() > 0.0
    total.backward()
    assert zz.grad is not None and zz.grad[:2].abs().sum() > 0


def test_single_member_has_no_hierarchical_term() -> None:
    z = torch.randn(1, 2, 3, requires_grad=True)
    kd = hierarchical_distillation_loss(z, 2.0)
    assert kd.item() == 0.0
    kd.backward()  # connected graph, zero gradient
    assert z.grad is not None and torch.all(z.grad == 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2\\^B members"):
        independent_loss(torch.zeros(3, 1, 2), Y)
    with pytest.raises(ValueError, match="members, batch, classes"):
        nested_loss(torch.zeros(2, 2), Y)
    with pytest.raises(ValueError, match="use one of"):
        hne_loss(Z, Y, "kd")
    with pytest.raises(ValueError, match="alpha"):
        hne_loss(Z, Y, "hd", alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        hne_loss(Z, Y, "d", T=0.0)


def test_temperature_annealing() -> None:
    # confident teacher (logits far apart): mean max-probability above mu -> T grows by 5 %
    z = torch.tensor([[[10.0, 0.0]], [[10.0, 0.0]]])
    conf = ensemble_confidence(z, 2.0).item()
    assert conf == pytest.approx(softmax2(5.0, 0.0)[0])
    assert anneal_temperature(2.0, conf, mu=0.5) == pytest.approx(2.1)
    assert anneal_temperature(2.0, conf, mu=0.999) == 2.0
    with pytest.raises(ValueError):
        anneal_temperature(2.0, conf, mu=0.5, factor=1.0)
