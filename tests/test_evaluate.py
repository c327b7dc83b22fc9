"""The evaluation helpers shared by the tasks: eval mode given back as it was, labelled samples only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdedge.train.evaluate import eval_mode, labelled_batches


def test_eval_mode_gives_every_module_its_mode_back_also_on_error() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert model.training and model[0].training and not model[1].training and model[2].training


def test_labelled_batches_drop_unlabelled_samples_and_refuse_an_unlabelled_split() -> None:
    x = torch.arange(6.0).reshape(6, 1)
    y = torch.tensor([0, -100, 1, -100, -100, 2])
    got = list(labelled_batches([(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:], y[5:])]))
    assert [b[1].tolist() for b in got] == [[0, 1], [2]]  # the all-unlabelled batch is skipped
    assert [b[0].flatten().tolist() for b in got] == [[0.0, 2.0], [5.0]]
    with pytest.raises(ValueError, match="no labelled samples"):
        list(labelled_batches([(x[3:5], y[3:5])]))
