"""Losses of distillation-based multi-exit training, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdedge.train.losses.multiexit import (
    anneal_temperature,
    distillation_loss,
    exitwise_loss,
    labelled_cross_entropy,
    multiexit_loss,
    soft_cross_entropy,
    teacher_confidence,
    teacher_sets,
)

LN3, LN9 = math.log(3.0), math.log(9.0)


def test_teacher_sets():
    assert teacher_sets("last", 4) == [(3,), (3,), (3,), ()]
    assert teacher_sets("later", 3) == [(1, 2), (2,), ()]
    assert teacher_sets([[2], [0, 2], []], 3) == [(2,), (0, 2), ()]
    assert teacher_sets("last", 1) == [()]


@pytest.mark.parametrize("spec,match", [
    ([[3], [3], []], r"names exit 3, but the network has exits 0\.\.2"),  # an exit after the last
    ([[1], [1], []], "cannot teach itself"),
    ([[2], []], "one list per exit"),
    ([[2, 2], [2], []], "repeats"),
    ("first", "unknown teacher set 'first'"),
])
def test_bad_teacher_sets(spec, match):
    with pytest.raises(ValueError, match=match):
        teacher_sets(spec, 3)


def test_exitwise_loss_is_the_mean_of_exit_cross_entropies():
    y = torch.tensor([0, 1])
    uniform = torch.zeros(2, 2)                       # CE = ln 2 on both samples
    sharp = torch.tensor([[2.0, 0.0], [0.0, 0.0]])    # CE = ln(1 + e^-2), ln 2
    expected = (math.log(2) + (math.log(1 + math.exp(-2)) + math.log(2)) / 2) / 2
    assert exitwise_loss([uniform, sharp], y).item() == pytest.approx(expected, rel=1e-6)


def test_unlabelled_samples_carry_no_cross_entropy():
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0], [9.0, -9.0]])
    y = torch.tensor([0, -100, -100])
    assert labelled_cross_entropy(z, y).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # a batch of unlabelled samples only: zero loss that still back-propagates (DDP stays in step)
    w = torch.ones(2, requires_grad=True)
    loss = exitwise_loss([z * w], torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros(2))


def test_soft_cross_entropy_matches_eq2_by_hand():
    teacher = torch.tensor([[LN3, 0.0]])        # softmax at T=1: (3/4, 1/4)
    student = torch.tensor([[0.0, LN3]])        # log softmax at T=1: (ln 1/4, ln 3/4)
    expected = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert soft_cross_entropy(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: teacher (√3, 1)/(1+√3); student logits/2 = (0, ln √3); and the factor T² = 4
    r3 = math.sqrt(3)
    t = (r3 / (1 + r3), 1 / (1 + r3))
    s = (1 / (1 + r3), r3 / (1 + r3))
    expected2 = -4 * (t[0] * math.log(s[0]) + t[1] * math.log(s[1]))
    assert soft_cross_entropy(student, teacher, 2.0).item() == pytest.approx(expected2, rel=1e-6)
    with pytest.raises(ValueError, match="temperature must be positive"):
        soft_cross_entropy(student, teacher, 0.0)


def _reference_distillation(logits, teachers, T):
    """Eq. 4 written out in numpy, sample by sample."""
    def sm(v):
        e = np.exp(v / T - (v / T).max())
        return e / e.sum()

    M, N = len(logits), logits[0].shape[0]
    total = 0.0
    for n in range(N):
        per_sample = 0.0
        for m in range(M):
            if teachers[m]:
                terms = [-T * T * float(np.sum(sm(logits[t][n]) * np.log(sm(logits[m][n])))) for t in teachers[m]]
                per_sample += sum(terms) / len(terms)
        total += per_sample / M
    return total / N


@pytest.mark.parametrize("kind", ["last", "later"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_distillation_loss_matches_eq4(kind, T):
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g) * 3 for _ in range(3)]
    teachers = teacher_sets(kind, 3)
    expected = _reference_distillation([z.numpy().astype(np.float64) for z in logits], teachers, T)
    assert distillation_loss(logits, teachers, T).item() == pytest.approx(expected, rel=1e-5)


def test_teachers_get_no_gradient_from_distillation():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(3)]
    distillation_loss(z, teacher_sets("last", 3), 2.0).backward()
    assert z[2].grad is None  # the last exit only teaches
    assert z[0].grad.abs().sum() > 0 and z[1].grad.abs().sum() > 0
    # in the full objective the last exit's gradient is that of its own CE term only
    y = torch.tensor([0, 1, 2, 0])
    z = [t.detach().clone().requires_grad_() for t in z]
    total, _, _ = multiexit_loss(z, y, teacher_sets("last", 3), T=2.0, C=0.5)
    total.backward()
    last = z[2].detach().clone().requires_grad_()
    (2 * 0.5 * labelled_cross_entropy(last, y) / 3).backward()
    assert torch.allclose(z[2].grad, last.grad, atol=1e-7)


def test_objective_weights():
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(6, 5, generator=g) for _ in range(4)]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ts = teacher_sets("last", 4)
    cls, dist = exitwise_loss(z, y), distillation_loss(z, ts, 3.0)
    total, c_part, d_part = multiexit_loss(z, y, ts, 3.0, C=0.5)
    assert torch.allclose(total, cls + dist)  # Eq. 1 exactly at C = 0.5
    assert torch.allclose(c_part, cls) and torch.allclose(d_part, dist)
    assert torch.allclose(multiexit_loss(z, y, ts, 3.0, C=0.0)[0], 2 * cls)
    assert torch.allclose(multiexit_loss(z, y, ts, 3.0, C=1.0)[0], 2 * dist)
    with pytest.raises(ValueError, match=r"C must be in \[0, 1\]"):
        multiexit_loss(z, y, ts, 3.0, C=1.5)


def test_semi_supervised_objective_eq6():
    # two labelled and two unlabelled samples: CE averages over the 2 labelled ones (1/N),
    # distillation over all 4 (1/N')
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(4, 3, generator=g) for _ in range(2)]
    y = torch.tensor([1, -100, 0, -100])
    ts = teacher_sets("last", 2)
    total, cls, dist = multiexit_loss(z, y, ts, 1.5, C=0.5)
    lab = torch.tensor([0, 2])
    expected_cls = sum(torch.nn.functional.cross_entropy(t[lab], y[lab]) for t in z) / 2
    expected_dist = soft_cross_entropy(z[0], z[1], 1.5) / 2  # all four samples, 1/M with M = 2
    assert torch.allclose(cls, expected_cls) and torch.allclose(dist, expected_dist)
    assert torch.allclose(total, expected_cls + expected_dist)


def test_teacher_confidence_on_a_crafted_batch():
    last = torch.tensor([[LN9, 0.0], [0.0, 0.0]])  # max prob 0.9 and 0.5 at T = 1
    logits = [torch.zeros(2, 2), last]
    ts = teacher_sets("last", 2)
    assert teacher_confidence(logits, ts, 1.0).item() == pytest.approx(0.7)
    assert teacher_confidence(logits, ts, 2.0).item() == pytest.approx((0.75 + 0.5) / 2)  # 9^(1/2) = 3
    # several teachers: max of their MEAN distribution (Alg. 1, line 11), not the mean of maxima
    a = torch.tensor([[LN9, 0.0]])   # (0.9, 0.1)
    b = torch.tensor([[0.0, LN9]])   # (0.1, 0.9)
    assert teacher_confidence([torch.zeros(1, 2), a, b], teacher_sets("later", 3), 1.0).item() == pytest.approx(0.5)
    assert teacher_confidence([torch.zeros(1, 2)], [()], 1.0) is None


def test_annealing_rule():
    assert anneal_temperature(1.0, 0.7, mu=0.5) == pytest.approx(1.05)
    assert anneal_temperature(2.0, 0.4, mu=0.5) == 2.0       # below μ: unchanged, never lowered
    assert anneal_temperature(2.0, 0.5, mu=0.5) == 2.0       # strictly above μ to grow
    with pytest.raises(ValueError, match="must be > 1"):
        anneal_temperature(1.0, 0.9, mu=0.5, factor=1.0)


def test_annealing_stops_once_the_adjusted_confidence_is_below_mu():
    # rows with max prob 9^(1/T)/(1+9^(1/T)) and 1/2; with μ = 0.6 the mean drops to ≤ μ once
    # 9^(1/T) ≤ 7/3, i.e. T ≥ ln 9 / ln(7/3) = 2.593…: after ceil(log_1.05 2.593…) = 20 steps
    logits = [torch.zeros(2, 2), torch.tensor([[LN9, 0.0], [0.0, 0.0]])]
    ts = teacher_sets("last", 2)
    T = 1.0
    for _ in range(100):
        T = anneal_temperature(T, float(teacher_confidence(logits, ts, T)), mu=0.6)
    assert T == pytest.approx(1.05 ** 20)
    assert float(teacher_confidence(logits, ts, T)) <= 0.6 < float(teacher_confidence(logits, ts, T / 1.05))
