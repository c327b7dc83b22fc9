"""Tiny anytime models that follow kdedge/models/stages.py exactly, and the digits data, for
export and bundle tests.

``ToyAnytime`` has three stages: stage0 (members 1) carries ``f0``; stage1 (members 2) reads
``stage0:f0`` and carries ``f1``; stage2 (members 1) reads both. It has fused prefixes and a
training-only ``aux`` layer that no stage uses (it must never reach a stage file).
``ToyOnline`` is an AHBF-like model whose ``deploy()`` returns a one-stage student without its
auxiliary branch and fusion layer.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdedge.models.stages import INPUT, Stage, StageSpec


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _pool(f: Tensor) -> Tensor:
    return f.mean((2, 3))


class _Stage0(Stage):
    def __init__(self, m: ToyAnytime) -> None:
        super().__init__()
        self.stem, self.head = m.stem, m.head0
        self.spec = StageSpec("stage0", (INPUT,), ("logits", "f0"), "logits", 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f0 = self.stem(x)
        return self.head(_pool(f0)), f0


class _Stage1(Stage):
    def __init__(self, m: ToyAnytime) -> None:
        super().__init__()
        self.block, self.head_a, self.head_b = m.block1, m.head1a, m.head1b
        self.spec = StageSpec("stage1", ("stage0:f0",), ("logits", "f1"), "logits", 2)

    def forward(self, f0: Tensor) -> tuple[Tensor, Tensor]:
        f1 = self.block(f0)
        p = _pool(f1)
        return self.head_a(p) + self.head_b(p), f1  # sum over the two members


class _Stage2(Stage):
    def __init__(self, m: ToyAnytime) -> None:
        super().__init__()
        self.block, self.head = m.block2, m.head2
        self.spec = StageSpec("stage2", ("stage0:f0", "stage1:f1"), ("logits",), "logits", 1)

    def forward(self, f0: Tensor, f1: Tensor) -> tuple[Tensor]:
        return (self.head(_pool(self.block(f1 + f0))),)


class _Prefix(Stage):
    """Stages 0..k fused: the summed logits of their members from the input alone."""

    def __init__(self, m: ToyAnytime, k: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(m.stages()[: k + 1])
        members = sum(s.spec.members for s in self.parts)
        self.spec = StageSpec(f"prefix{k}", (INPUT,), ("logits",), "logits", members)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        l0, f0 = self.parts[0](x)
        total = l0
        if len(self.parts) > 1:
            l1, f1 = self.parts[1](f0)
            total = total + l1
        if len(self.parts) > 2:
            total = total + self.parts[2](f0, f1)[0]
        return (total,)


class ToyAnytime(nn.Module):
    """Three stages with carried features, members (1, 2, 1), fused prefixes and an unused aux layer."""

    family = "toy"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8,
                 combine_rules: tuple[str, ...] = ("mean_logits", "mean_probs", "last"), with_prefixes: bool = True) -> None:
        super().__init__()
        self.combine_rules = combine_rules
        self.with_prefixes = with_prefixes
        self.stem = _block(in_channels, width)
        self.head0 = nn.Linear(width, num_classes)
        self.block1 = _block(width, width)
        self.head1a = nn.Linear(width, num_classes)
        self.head1b = nn.Linear(width, num_classes)
        self.block2 = _block(width, width)
        self.head2 = nn.Linear(width, num_classes)
        self.aux = nn.Linear(64, 64)  # training-only: no stage reads it
        self.width = width

    def stages(self) -> list[Stage]:
        return [_Stage0(self), _Stage1(self), _Stage2(self)]

    def prefixes(self) -> list[Stage]:
        return [_Prefix(self, k) for k in range(3)] if self.with_prefixes else []

    def stage_meta(self) -> dict[str, Any]:
        return {"family": "toy", "width": self.width}

    def forward(self, x: Tensor) -> list[Tensor]:
        s0, s1, s2 = self.stages()
        l0, f0 = s0(x)
        l1, f1 = s1(f0)
        (l2,) = s2(f0, f1)
        return [l0, l1 / 2, l2]  # per-stage mean logits (training target for every exit)


class _TreeStage0(Stage):
    def __init__(self, m: ToyTree) -> None:
        super().__init__()
        self.stem, self.trunk, self.head = m.stem, m.trunk, m.head0
        self.spec = StageSpec("stage0", (INPUT,), ("logits", "f"), "logits", 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.stem(x)
        return self.head(_pool(self.trunk(f))), f  # f is carried: only convolutions read it


class _TreeStage1(Stage):
    def __init__(self, m: ToyTree) -> None:
        super().__init__()
        self.branch, self.head = m.branch, m.head1
        self.spec = StageSpec("stage1", ("stage0:f",), ("logits",), "logits", 1)

    def forward(self, f: Tensor) -> tuple[Tensor]:
        return (self.head(_pool(self.branch(f))),)


class ToyTree(nn.Module):
    """Two stages shaped like an HNE tree: stage0 carries the feature map ``f`` at its branch
    point (``width`` channels, a multiple of 16, so onnxruntime's NCHWc convolutions read it)
    and stage1 is the second member's branch from there. Nothing but convolutions reads ``f``."""

    family = "toy"
    combine_rules = ("mean_logits", "mean_probs", "last")

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _block(in_channels, width)
        self.trunk, self.branch = _block(width, width), _block(width, width)
        self.head0, self.head1 = nn.Linear(width, num_classes), nn.Linear(width, num_classes)
        self.width = width

    def stages(self) -> list[Stage]:
        return [_TreeStage0(self), _TreeStage1(self)]

    def stage_meta(self) -> dict[str, Any]:
        return {"family": "toy", "width": self.width}

    def forward(self, x: Tensor) -> list[Tensor]:
        s0, s1 = self.stages()
        l0, f = s0(x)
        return [l0, s1(f)[0]]


class _StudentStage(Stage):
    def __init__(self, shared: nn.Module, branch: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.shared, self.branch, self.head = shared, branch, head
        self.spec = StageSpec("stage0", (INPUT,), ("logits",), "logits", 1)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.head(_pool(self.branch(self.shared(x)))),)


class ToyStudent(nn.Module):
    """The deployed target branch of :class:`ToyOnline`: one stage, rule ``last``."""

    combine_rules = ("last",)
    family = "toy-online"

    def __init__(self, shared: nn.Module, branch: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.shared, self.branch, self.head = shared, branch, head

    def stages(self) -> list[Stage]:
        return [_StudentStage(self.shared, self.branch, self.head)]

    def prefixes(self) -> list[Stage]:
        return []

    def forward(self, x: Tensor) -> Tensor:
        return self.stages()[0](x)[0]


class ToyOnline(nn.Module):
    """AHBF-like: shared layers, a target branch, a deeper auxiliary branch and a fusion layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.shared = _block(in_channels, width)
        self.branch0 = _block(width, width)
        self.head0 = nn.Linear(width, num_classes)
        self.branch1 = nn.Sequential(_block(width, 2 * width), _block(2 * width, width))
        self.head1 = nn.Linear(width, num_classes)
        self.fusion = nn.Conv2d(2 * width, width, 1)

    def deploy(self) -> ToyStudent:
        return ToyStudent(self.shared, self.branch0, self.head0)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.shared(x)
        a, b = self.branch0(h), self.branch1(h)
        fused = self.fusion(torch.cat([a, b], 1))
        return [self.head0(_pool(a)), self.head1(_pool(b)), self.head0(_pool(fused))]


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """sklearn's 8x8 digits, normalised: (x_train, y_train, x_val, y_val, info dict)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = d.images.astype(np.float32)  # 0..16
    scale, mean, std = 1 / 16, 0.3, 0.4
    x = ((raw * scale - mean) / std)[:, None].astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    info = {"name": "digits", "num_classes": 10, "in_channels": 1, "input_size": [8, 8], "mean": [mean], "std": [std],
            "scale": scale, "channel_order": "L", "class_names": [str(i) for i in range(10)], "resize": None}
    return x[:1400], y[:1400], x[1400:], y[1400:], info


def train_toy(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0) -> nn.Module:
    """A few epochs of Adam on every output of ``model`` (a list of logits); returns it in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            idx = perm[i : i + 64]
            outs = model(xt[idx])
            loss = sum(nn.functional.cross_entropy(o, yt[idx]) for o in outs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# Shared, per-process fixtures: training and exporting take seconds, so every test module in a
# process reuses them. Tests must not modify what these return (copy a bundle before tampering).

@functools.lru_cache(maxsize=None)
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    return digits_data()


def trained_toy(with_prefixes: bool = True) -> ToyAnytime:
    """The toy model trained on digits (do not modify it)."""
    return _trained_toy(bool(with_prefixes))


@functools.lru_cache(maxsize=None)
def _trained_toy(with_prefixes: bool) -> ToyAnytime:
    xtr, ytr, _, _, _ = digits()
    torch.manual_seed(0)
    return train_toy(ToyAnytime(with_prefixes=with_prefixes), xtr, ytr, epochs=6)


@functools.lru_cache(maxsize=None)
def _scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="kdedge-test-bundles-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def toy_bundle(precision: str = "fp32", with_prefixes: bool = True) -> Path:
    """A bundle of the trained toy model (do not modify it)."""
    return _toy_bundle(precision, bool(with_prefixes))


@functools.lru_cache(maxsize=None)
def _toy_bundle(precision: str, with_prefixes: bool) -> Path:
    from kdedge.export import export

    xtr, ytr, xv, yv, info = digits()
    out = _scratch() / f"toy-{precision}-{int(with_prefixes)}.kdedge"
    # The toy's INT8 loss sits near one point; a gate of 2 points keeps the fixture from flipping
    # on a single borderline image when thread counts differ between test processes.
    return export(trained_toy(with_prefixes), out, info=info, val_data=(xv, yv),
                  calib_data=(xtr[:128], ytr[:128]) if precision == "int8" else None, precision=precision,
                  **({"int8_max_drop": TOY_INT8_MAX_DROP} if precision == "int8" else {}))


TOY_INT8_MAX_DROP = 2.0
