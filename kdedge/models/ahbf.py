"""AHBF-OKD: hierarchical branches with adaptive hierarchy-branch fusion, and the clean student.

The training model (:class:`AHBFNet`) is a shared trunk, M branches of increasing depth (see
:mod:`kdedge.models.ahbf_branches`) and a fusion on top:

- ``fusion="ahbf"`` (the paper): M−1 :class:`~kdedge.models.ahbf_fusion.AHBFFusion` modules
  build the recursive teacher assistants ta(2) … ta(M) (Eqs. 8 and 12); ta(1) is branch 1;
- ``fusion="one"``: ONE's gate builds one ensemble teacher (the ONE baseline);
- ``fusion="none"``: branches only (CL, DML, and with one branch the vanilla network).

Its forward returns an :class:`AHBFOutput` with every branch's logits and every teacher's
logits, in train and in eval mode alike. What is deployed is ``student()`` (also ``deploy()``):
a standalone deep copy of the shared trunk + one branch + its classifier, which owns no other
branch and no fusion parameter and is exactly the plain backbone network (same parameter
count as, e.g., ``create_model("resnet32")``).

Example:
    >>> model = create_model("ahbf", num_classes=100, backbone="resnet32", branches=4, aux=4)
    >>> out = model(torch.randn(8, 3, 32, 32))
    >>> len(out.branches), len(out.tas)                 # z^1..z^4, z^ta(2)..z^ta(4)
    (4, 3)
    >>> student = model.student()                       # branch 1 = ResNet-32, 0.47 M params
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdedge.models.ahbf_branches import (
    BranchLayout,
    cifar_resnet_layout,
    mobilenetv2_layout,
    torchvision_resnet_layout,
    torchvision_resnet_names,
)
from kdedge.models.ahbf_fusion import AHBFFusion, ONEGate
from kdedge.models.stages import INPUT, Stage, StageSpec

FUSIONS = ("ahbf", "one", "none")
# default auxiliary blocks per hierarchy level: the paper's a = 4 on CIFAR, 2 on ImageNet; the
# authors' MobileNetV2 model defaults to 2 (its chunks land in stages of 3, 3 and 1 blocks).
DEFAULT_AUX = {"cifar_resnet": 4, "mobilenetv2": 2, "torchvision": 2}


def _pool_logits(head: nn.Module, features: Tensor) -> Tensor:
    # flatten, not a reshape on x.shape[0]: keeps the batch dimension dynamic in exported graphs
    return head(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))


@dataclass
class AHBFOutput:
    """What :class:`AHBFNet` returns (train and eval mode alike).

    Attributes:
        branches: logits z^1 … z^M of every branch [N, K], hierarchy order (shallowest first).
        tas: ``fusion="ahbf"``: the teacher assistants' logits z^ta(2) … z^ta(M) (M−1 tensors;
            ta(1) is ``branches[0]`` and is not repeated); otherwise empty.
        ensemble: ``fusion="one"``: the gated ensemble teacher's logits; otherwise None.
        scores: ``"ahbf"``: the attention scores s^2 … s^M [N, 2] (weight of the branch, weight
            of the previous TA); ``"one"``: the gate [N, M]; otherwise empty.
        target: index of the target branch in ``branches`` (0, or M−1 in compression mode).
    """

    branches: list[Tensor]
    tas: list[Tensor] = field(default_factory=list)
    ensemble: Tensor | None = None
    scores: list[Tensor] = field(default_factory=list)
    target: int = 0

    @property
    def logits(self) -> Tensor:
        """The target branch's logits (what the deployed student computes)."""
        return self.branches[self.target]


class AHBFStudent(nn.Module):
    """One branch of an AHBF model as a standalone network: shared trunk + branch + classifier.

    An anytime model with a single stage (``combine_rules = ("last",)``), so export treats it
    like any other family. ``forward(x)`` returns logits [N, K].
    """

    combine_rules: tuple[str, ...] = ("last",)

    def __init__(self, shared: nn.Module, branch: nn.Module, head: nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        self.shared = shared
        self.branch = branch
        self.head = head
        self.meta = dict(meta)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.branch(self.shared(x))

    def forward_head(self, f: Tensor) -> Tensor:
        return _pool_logits(self.head, f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def stages(self) -> list[Stage]:
        return [StudentStage(self)]

    def prefixes(self) -> list[Stage]:
        return []

    def stage_meta(self) -> dict[str, Any]:
        return dict(self.meta)


class StudentStage(Stage):
    """The whole student as stage 0: input → (logits,), one member."""

    def __init__(self, net: AHBFStudent) -> None:
        super().__init__()
        self.net = net
        self.spec = StageSpec(name="stage0", inputs=(INPUT,), outputs=("logits",), logits="logits", members=1)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.net(x),)


class AHBFNet(nn.Module):
    """The training model: shared trunk, hierarchical branches, optional fusion (see module doc).

    Args:
        layout: the backbone cut (:func:`~kdedge.models.ahbf_branches.cifar_resnet_layout` …).
        fusion: ``"ahbf"``, ``"one"`` or ``"none"``.
        target: index of the target branch.
        meta: JSON-able facts about the configuration (backbone, aux, …).
    """

    def __init__(self, layout: BranchLayout, fusion: str, target: int, meta: dict[str, Any]) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        m = len(layout.branches)
        if fusion != "none" and m < 2:
            raise ValueError(f"fusion {fusion!r} needs branches >= 2, got {m}; set fusion: none for a single branch")
        self.shared = layout.shared
        self.branches = nn.ModuleList(layout.branches)
        self.heads = nn.ModuleList(layout.heads)
        self.fusions = nn.ModuleList([AHBFFusion(layout.num_features) for _ in range(m - 1)] if fusion == "ahbf" else [])
        self.gate = ONEGate(layout.shared_channels, m) if fusion == "one" else None
        self.fusion = fusion
        self.target = target
        self.blocks = list(layout.blocks)
        self.stage_names = layout.stage_names
        self.meta = dict(meta)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def forward(self, x: Tensor) -> AHBFOutput:
        h = self.shared(x)
        feats = [branch(h) for branch in self.branches]
        logits = [_pool_logits(head, f) for head, f in zip(self.heads, feats)]
        out = AHBFOutput(branches=logits, target=self.target)
        if self.fusion == "ahbf":
            f_prev, z_prev = feats[0], logits[0]  # F̃^1 = F^1, ta(1) = branch 1
            for fusion, f, z in zip(self.fusions, feats[1:], logits[1:]):
                f_prev, z_prev, s = fusion(f, f_prev, z, z_prev)
                out.tas.append(z_prev)
                out.scores.append(s)
        elif self.gate is not None:
            out.ensemble, gate = self.gate(h, logits)
            out.scores.append(gate)
        return out

    def student(self, branch: int | None = None) -> AHBFStudent:
        """A standalone copy of the shared trunk + ``branch`` + its classifier (default: target).

        ``branch`` is a 0-based index in hierarchy order (0 = the paper's branch 1). The copy
        shares no tensor with this model and owns nothing else; in eval mode it computes
        exactly ``self(x).branches[branch]``.
        """
        b = self.target if branch is None else branch
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.num_branches:
            raise ValueError(f"no branch {branch!r}: this model has branches 0..{self.num_branches - 1} "
                             f"(0-based, shallowest first; target = {self.target})")
        meta = {**self.meta, "branch": b, "target": b == self.target,
                "blocks": dict(zip(self.stage_names, self.blocks[b]))}
        student = AHBFStudent(copy.deepcopy(self.shared), copy.deepcopy(self.branches[b]),
                              copy.deepcopy(self.heads[b]), meta)
        return student.train(self.training)

    def deploy(self) -> AHBFStudent:
        """What export deploys: the target branch's student, in eval mode."""
        return self.student().eval()


def _parse_backbone(backbone: str) -> tuple[str, Any]:
    """("cifar_resnet", depth) | ("mobilenetv2", None) | ("torchvision", arch)."""
    if backbone == "mobilenetv2":
        return "mobilenetv2", None
    if backbone.startswith("tv_"):
        known = torchvision_resnet_names()
        if backbone[3:] not in known:
            raise ValueError(f"{backbone[3:]!r} is not a torchvision ResNet; use one of "
                             f"{', '.join('tv_' + k for k in known)}")
        return "torchvision", backbone[3:]
    if backbone.startswith("resnet") and backbone[6:].isdigit():
        depth = int(backbone[6:])
        if depth >= 8 and (depth - 2) % 6 == 0:
            return "cifar_resnet", depth
        raise ValueError(f"{backbone!r} is not a CIFAR ResNet depth (6n+2: resnet8, resnet14, resnet20, resnet32, "
                         f"resnet110, ...); for torchvision's ResNet-{depth} use backbone 'tv_{backbone}'")
    raise ValueError(f"unknown ahbf backbone {backbone!r}; use a CIFAR ResNet 'resnet<6n+2>' (e.g. 'resnet32'), "
                     f"'mobilenetv2', or a torchvision ResNet 'tv_<name>' (e.g. 'tv_resnet18')")


def ahbf(num_classes: int = 10, in_channels: int = 3, input_size: Sequence[int] | None = None,
         backbone: str = "resnet32", branches: int = 4, aux: int | None = None, fusion: str = "ahbf",
         compression: bool = False, width: int | None = None, width_mult: float | None = None,
         cifar: bool | None = None) -> AHBFNet:
    """Build an AHBF-OKD training model.

    Args:
        num_classes, in_channels, input_size: from the dataset (``input_size`` = (H, W)).
        backbone: ``"resnet<6n+2>"`` (CIFAR ResNet: resnet8 … resnet32, resnet110),
            ``"mobilenetv2"``, or ``"tv_<torchvision ResNet>"`` (tv_resnet18, tv_resnet34, …).
        branches: M, number of branches (>= 1; fusions need >= 2).
        aux: a, blocks per hierarchy level; default 4 (CIFAR ResNet) or 2 (MobileNetV2,
            torchvision ResNets).
        fusion: ``"ahbf"`` (recursive TAs), ``"one"`` (ONE's gate) or ``"none"``.
        compression: target = deepest branch, the others have fewer blocks (paper Table 5).
        width: CIFAR ResNet base width (16 in the paper; smaller for tests and demos).
        width_mult: MobileNetV2 width multiplier (default 0.5, the paper's MobileNetV2(0.5)).
        cifar: MobileNetV2 CIFAR strides; default True for inputs smaller than 64 pixels.

    Raises:
        ValueError: unknown backbone/fusion, options that do not apply to the backbone, or a
            branch/aux count the backbone cannot host.

    Example:
        >>> m = ahbf(num_classes=10, in_channels=1, input_size=(28, 28), backbone="resnet8",
        ...          width=8, branches=3, aux=1)
    """
    kind, spec = _parse_backbone(backbone)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ahbf: {key} must be a positive integer, got {value!r}")
    if input_size is not None and (isinstance(input_size, (int, str)) or len(input_size) != 2):
        raise ValueError(f"ahbf: input_size must be an (H, W) pair, got {input_size!r}")
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"branches must be an integer >= 1, got {branches!r}")
    if aux is None:
        aux = DEFAULT_AUX[kind]
    if isinstance(aux, bool) or not isinstance(aux, int) or aux < 0:
        raise ValueError(f"aux (auxiliary blocks per hierarchy level) must be an integer >= 0, got {aux!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    if width is not None and kind != "cifar_resnet":
        raise ValueError(f"width applies to CIFAR ResNet backbones only, not {backbone!r}")
    if (width_mult is not None or cifar is not None) and kind != "mobilenetv2":
        raise ValueError(f"width_mult and cifar apply to the mobilenetv2 backbone only, not {backbone!r}")
    meta: dict[str, Any] = {"family": "ahbf", "backbone": backbone, "branches": branches, "aux": aux,
                            "compression": bool(compression), "num_classes": num_classes, "in_channels": in_channels}
    if kind == "cifar_resnet":
        _check_min(backbone, input_size, 8)
        meta["width"] = 16 if width is None else width
        layout = cifar_resnet_layout(spec, num_classes, in_channels, branches, aux, compression, meta["width"])
    elif kind == "mobilenetv2":
        if cifar is None:
            cifar = input_size is not None and min(input_size) < 64
        _check_min(backbone, input_size, 8 if cifar else 32)
        meta["width_mult"], meta["cifar"] = 0.5 if width_mult is None else width_mult, cifar
        layout = mobilenetv2_layout(num_classes, in_channels, branches, aux, compression, meta["width_mult"], cifar)
    else:
        _check_min(backbone, input_size, 32)
        layout = torchvision_resnet_layout(spec, num_classes, in_channels, branches, aux, compression)
    target = branches - 1 if compression else 0
    meta["fusion"] = fusion
    return AHBFNet(layout, fusion, target, meta)


def _check_min(name: str, input_size: Sequence[int] | None, min_size: int) -> None:
    if input_size is not None and min(input_size) < min_size:
        raise ValueError(f"ahbf backbone {name} needs inputs of at least {min_size}x{min_size}, "
                         f"got {tuple(input_size)}; resize the data or pick a smaller backbone")


__all__ = ["AHBFNet", "AHBFOutput", "AHBFStudent", "StudentStage", "ahbf", "FUSIONS"]
