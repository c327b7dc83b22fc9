"""AHBF-OKD losses: each term against its formula, the ramp-up, detaching, unlabelled samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdedge.train.losses.ahbf import (
    ahbf_loss,
    btkl_loss,
    cl_loss,
    dml_loss,
    labelled_ce,
    one_loss,
    rampup,
    soft_kl,
    takl_loss,
)

K = 5


def logits(n: int = 6, seed: int = 0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, K, generator=g) * 2).requires_grad_(grad)


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    pt = torch.softmax(teacher / tau, 1)
    ps = torch.softmax(student / tau, 1)
    return tau**2 * (pt * (pt.log() - ps.log())).sum(1).mean()


def test_soft_kl_matches_eq4_and_vanishes_on_equal_inputs() -> None:
    s, t = logits(seed=1), logits(seed=2)
    torch.testing.assert_close(soft_kl(s, t, 3.0), kl_by_hand(s, t, 3.0))
    assert float(soft_kl(s, s, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_kl(s, t, 3.0)) > 0


def test_soft_kl_detach_switch_controls_teacher_gradient() -> None:
    s, t = logits(seed=1, grad=True), logits(seed=2, grad=True)
    soft_kl(s, t, 3.0, detach_teacher=True).backward()
    assert t.grad is None and s.grad is not None
    s2, t2 = logits(seed=1, grad=True), logits(seed=2, grad=True)
    soft_kl(s2, t2, 3.0, detach_teacher=False).backward()
    assert t2.grad is not None and float(t2.grad.abs().sum()) > 0


def test_labelled_ce_ignores_unlabelled_samples() -> None:
    a, b = logits(seed=1), logits(seed=2)
    y = torch.tensor([0, -100, 2, 3, -100, 1])
    keep = y != -100
    expected = F.cross_entropy(a[keep], y[keep]) + F.cross_entropy(b[keep], y[keep])
    torch.testing.assert_close(labelled_ce([a, b], y), expected)


def test_labelled_ce_of_an_unlabelled_batch_is_zero_and_backpropagates() -> None:
    a = logits(grad=True)
    loss = labelled_ce([a], torch.full((6,), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) == 0.0


def test_rampup_follows_eq13() -> None:
    assert rampup(0, 300) == pytest.approx(math.exp(-5))
    assert rampup(150, 300) == pytest.approx(math.exp(-5 * 0.25))
    assert rampup(300, 300) == 1.0 and rampup(450, 300) == 1.0
    values = [rampup(e, 10) for e in (0, 2.5, 5, 7.5, 10)]
    assert values == sorted(values)
    assert rampup(0, 0) == 1.0


def three_branches(grad: bool = False):
    branches = [logits(seed=s, grad=grad) for s in (10, 11, 12)]
    tas = [logits(seed=s, grad=grad) for s in (20, 21)]
    return branches, tas


def test_takl_is_each_assistant_teaching_the_previous_one() -> None:
    (z1, z2, z3), (t2, t3) = three_branches()
    expected = kl_by_hand(z1, t2, 3.0) + kl_by_hand(t2, t3, 3.0)  # ta(1) = z^1
    torch.testing.assert_close(takl_loss([z1, z2, z3], [t2, t3], 3.0), expected)


def test_btkl_is_each_branch_teaching_the_previous_assistant() -> None:
    (z1, z2, z3), (t2, t3) = three_branches()
    expected = kl_by_hand(z1, z2, 2.0) + kl_by_hand(t2, z3, 2.0)
    torch.testing.assert_close(btkl_loss([z1, z2, z3], [t2, t3], 2.0), expected)


def test_ahbf_loss_combines_as_eq14() -> None:
    branches, tas = three_branches()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = ahbf_loss(branches, tas, y, lambda1=4.0, lambda2=2.0, tau=3.0, omega=0.3)
    ce = sum(F.cross_entropy(z, y) for z in branches)
    ce_ta = sum(F.cross_entropy(z, y) for z in tas)
    fkl = 4.0 * takl_loss(branches, tas, 3.0) + 2.0 * btkl_loss(branches, tas, 3.0)
    torch.testing.assert_close(out["loss"], ce + ce_ta + 0.3 * fkl)
    torch.testing.assert_close(out["ce_branches"], ce)
    torch.testing.assert_close(out["ce_tas"], ce_ta)
    no_kd = ahbf_loss(branches, tas, y, omega=0.0)
    torch.testing.assert_close(no_kd["loss"], ce + ce_ta)


def test_ahbf_distillation_uses_unlabelled_samples() -> None:
    branches, tas = three_branches()
    out = ahbf_loss(branches, tas, torch.full((6,), -100))
    assert float(out["ce_branches"]) == 0.0 and float(out["ce_tas"]) == 0.0
    assert float(out["loss"]) > 0 and float(out["loss"]) == pytest.approx(float(4 * out["takl"] + 2 * out["btkl"]))


def test_ahbf_detach_teacher_keeps_the_deepest_branch_out_of_distillation() -> None:
    # without labels only the KL terms act; the deepest branch and the last TA are teachers only
    for detach, expect_grad in ((True, False), (False, True)):
        branches, tas = three_branches(grad=True)
        ahbf_loss(branches, tas, torch.full((6,), -100), detach_teacher=detach)["loss"].backward()
        # (the zero CE of an unlabelled batch still touches every tensor, with zero gradient)
        assert (float(branches[2].grad.abs().sum()) > 0) == expect_grad
        assert (float(tas[1].grad.abs().sum()) > 0) == expect_grad
        assert branches[0].grad is not None and float(branches[0].grad.abs().sum()) > 0


def test_ahbf_loss_rejects_a_model_without_assistants() -> None:
    branches, _ = three_branches()
    with pytest.raises(ValueError, match="fusion 'ahbf'"):
        ahbf_loss(branches, [], torch.zeros(6, dtype=torch.long))


def test_one_loss_teaches_every_branch_from_the_ensemble() -> None:
    branches, (ens, _) = three_branches()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = one_loss(branches, ens, y, tau=3.0, weight=0.5, omega=0.8)
    kd = sum(kl_by_hand(z, ens, 3.0) for z in branches)
    ce = sum(F.cross_entropy(z, y) for z in branches) + F.cross_entropy(ens, y)
    torch.testing.assert_close(out["loss"], ce + 0.8 * 0.5 * kd)


def test_cl_teacher_is_the_mean_of_the_other_branches() -> None:
    branches, _ = three_branches()
    y = torch.full((6,), -100)
    z1, z2, z3 = branches
    expected = kl_by_hand(z1, (z2 + z3) / 2, 3.0) + kl_by_hand(z2, (z1 + z3) / 2, 3.0) + kl_by_hand(z3, (z1 + z2) / 2, 3.0)
    torch.testing.assert_close(cl_loss(branches, y, tau=3.0)["loss"], expected)


def test_dml_averages_over_peers_and_equals_cl_for_two_branches() -> None:
    branches, _ = three_branches()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    z1, z2, z3 = branches
    kd = (kl_by_hand(z1, z2, 1.0) + kl_by_hand(z1, z3, 1.0) + kl_by_hand(z2, z1, 1.0) + kl_by_hand(z2, z3, 1.0)
          + kl_by_hand(z3, z1, 1.0) + kl_by_hand(z3, z2, 1.0)) / 2
    torch.testing.assert_close(dml_loss(branches, y, tau=1.0)["kd"], kd)
    two = branches[:2]
    torch.testing.assert_close(dml_loss(two, y)["loss"], cl_loss(two, y)["loss"])
