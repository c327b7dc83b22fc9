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
    tbkl_loss,
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


# --- the authors' objective: a third KL family (TBKL) and 0.75 on the distillation ----------------

LN3, LN4 = math.log(3.0), math.log(4.0)


def two_branches_by_hand() -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """M = 2, two classes, τ = 1, logits whose softmaxes are simple fractions, and each KL term
    written out from those fractions: z^1 → (1/2, 1/2), z^2 → (3/4, 1/4), z^ta(2) → (1/5, 4/5)."""
    z1, z2, ta2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, LN4]])
    kl = {
        "takl": 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5),    # KL(ta(2) ‖ ta(1) = z^1)
        "btkl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),  # KL(z^2 ‖ ta(1) = z^1)
        "tbkl": 0.2 * math.log(0.2 / 0.75) + 0.8 * math.log(0.8 / 0.25),   # KL(ta(2) ‖ z^2)
    }
    return [z1, z2], [ta2], kl


def test_tbkl_by_hand_on_two_classes() -> None:
    branches, tas, kl = two_branches_by_hand()
    assert float(tbkl_loss(branches, tas, 1.0)) == pytest.approx(kl["tbkl"], rel=1e-5)
    assert float(takl_loss(branches, tas, 1.0)) == pytest.approx(kl["takl"], rel=1e-5)
    assert float(btkl_loss(branches, tas, 1.0)) == pytest.approx(kl["btkl"], rel=1e-5)


def test_tbkl_is_each_assistant_teaching_its_own_branch() -> None:
    (z1, z2, z3), (t2, t3) = three_branches()
    expected = kl_by_hand(z2, t2, 3.0) + kl_by_hand(z3, t3, 3.0)  # KL(ta(m) ‖ m), m = 2, 3; z^1 takes no part
    torch.testing.assert_close(tbkl_loss([z1, z2, z3], [t2, t3], 3.0), expected)


def test_authors_objective_by_hand_and_the_paper_default() -> None:
    branches, tas, kl = two_branches_by_hand()
    unlabelled = torch.full((1,), -100)  # no CE: the loss is the distillation alone
    paper = ahbf_loss(branches, tas, unlabelled, lambda1=4.0, lambda2=2.0, tau=1.0, omega=0.5)
    assert float(paper["loss"]) == pytest.approx(0.5 * (4 * kl["takl"] + 2 * kl["btkl"]), rel=1e-5)
    assert "tbkl" not in paper
    authors = ahbf_loss(branches, tas, unlabelled, lambda1=4.0, lambda2=2.0, lambda3=4.0, tau=1.0, omega=0.5,
                        kd_scale=0.75)
    expected = 0.75 * 0.5 * (4 * (kl["takl"] + kl["tbkl"]) + 2 * kl["btkl"])
    assert float(authors["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(authors["tbkl"]) == pytest.approx(kl["tbkl"], rel=1e-5)


def authors_training_loop(logitlist: list[torch.Tensor], ensem_logits: list[torch.Tensor], y: torch.Tensor, *,
                          kd_weight: float, rampup_weight: float, lambda1: float, lambda2: float,
                          tau: float) -> torch.Tensor:
    """The loss of the authors' ``train_ahbf.py`` as its loop builds it: ``criterion_T(s, t)`` is
    τ²·KL(t ‖ s), ``ensem_logits[i]`` the (i+2)-th assistant, ``rampup_weight`` already × 0.5."""
    def criterion_t(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kl_by_hand(student, teacher, tau)

    loss = sum(F.cross_entropy(z, y) for z in logitlist) + sum(F.cross_entropy(z, y) for z in ensem_logits)
    w = kd_weight * rampup_weight
    for i in range(len(logitlist) - 1):
        if i == 0:
            loss = loss + criterion_t(logitlist[i], logitlist[i + 1]) * w * lambda2
            loss = loss + criterion_t(logitlist[i], ensem_logits[i]) * w * lambda1
            loss = loss + criterion_t(logitlist[i + 1], ensem_logits[i]) * w * lambda1
        else:
            loss = loss + criterion_t(ensem_logits[i - 1], logitlist[i + 1]) * w * lambda2
            loss = loss + criterion_t(logitlist[i + 1], ensem_logits[i]) * w * lambda1
            loss = loss + criterion_t(ensem_logits[i - 1], ensem_logits[i]) * w * lambda1
    return loss


def test_authors_objective_equals_their_training_loop() -> None:
    branches = [logits(seed=s) for s in (30, 31, 32, 33)]  # M = 4: the loop's i >= 1 arm runs twice
    tas = [logits(seed=s) for s in (40, 41, 42)]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    omega = rampup(120.0, 240.0)
    theirs = authors_training_loop(branches, tas, y, kd_weight=1.5, rampup_weight=omega * 0.5, lambda1=4.0,
                                   lambda2=2.0, tau=3.0)
    ours = ahbf_loss(branches, tas, y, lambda1=4.0, lambda2=2.0, lambda3=4.0, tau=3.0, omega=omega, kd_scale=0.75)
    torch.testing.assert_close(ours["loss"], theirs)


def test_default_objective_is_the_paper_bit_for_bit() -> None:
    branches, tas = three_branches()
    y = torch.tensor([0, 1, 2, 3, -100, 0])
    default = ahbf_loss(branches, tas, y, omega=0.3)
    explicit = ahbf_loss(branches, tas, y, lambda1=4.0, lambda2=2.0, lambda3=0.0, tau=3.0, omega=0.3, kd_scale=1.0)
    eq14 = (labelled_ce(branches, y) + labelled_ce(tas, y)
            + 0.3 * (4.0 * takl_loss(branches, tas, 3.0) + 2.0 * btkl_loss(branches, tas, 3.0)))
    assert set(default) == {"loss", "ce_branches", "ce_tas", "takl", "btkl"}
    assert torch.equal(default["loss"], explicit["loss"]) and torch.equal(default["loss"], eq14)


def test_tbkl_gradient_reaches_the_branch_and_the_teacher_only_without_detach() -> None:
    for detach in (True, False):
        branches, tas = three_branches(grad=True)
        tbkl_loss(branches, tas, 3.0, detach_teacher=detach).backward()
        assert branches[0].grad is None  # z^1 is in no TBKL term
        assert all(float(z.grad.abs().sum()) > 0 for z in branches[1:])
        if detach:
            assert all(t.grad is None for t in tas)
        else:
            assert all(float(t.grad.abs().sum()) > 0 for t in tas)


def test_authors_objective_makes_the_deepest_branch_a_student() -> None:
    # Paper, detached, no labels: the deepest branch only teaches (BTKL), so it gets no gradient.
    # With TBKL it also learns from the last assistant.
    for lambda3, expect_grad in ((0.0, False), (4.0, True)):
        branches, tas = three_branches(grad=True)
        ahbf_loss(branches, tas, torch.full((6,), -100), lambda3=lambda3, kd_scale=0.75)["loss"].backward()
        assert (float(branches[2].grad.abs().sum()) > 0) == expect_grad
        assert float(tas[1].grad.abs().sum()) == 0.0  # the last assistant stays a teacher only


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
