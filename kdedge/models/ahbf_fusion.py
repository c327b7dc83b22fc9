"""Fusion modules that build teachers from branches: AHBF's recursive assistants and ONE's gate.

Neither module is ever deployed: the student extracted from an AHBF model owns no parameter
of this file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdedge.models.backbones import init_weights


class AHBFFusion(nn.Module):
    """One adaptive hierarchy-branch fusion (paper Eqs. 8 and 12, the authors' module).

    Fuses the m-th branch with the (m−1)-th teacher assistant:

        F̃^m  = BN(Conv1x1([F^m, F̃^(m−1)]))                 (2C → C channels, with bias)
        s^m  = softmax(ReLU(BN1d(Linear(GAP(F̃^m)))))       (s^m ∈ R², Eq. 12)
        z^ta(m) = s^m_1 · z^m + s^m_2 · z^ta(m−1)           (Eq. 8, on logits)

    ``F̃^m`` is handed to the next fusion. The ReLU before the softmax is the authors' (it keeps
    both weights at 1/2 when both pre-activations are negative); the batch-norm on two numbers
    needs training batches of at least two samples.

    Args:
        channels: C, channels of a branch's last feature map.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 2)
        self.bn_scores = nn.BatchNorm1d(2)
        init_weights(self)

    def forward(self, f_branch: Tensor, f_prev: Tensor, z_branch: Tensor, z_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (fused feature F̃^m [N, C, H, W], TA logits z^ta(m) [N, K], scores s^m [N, 2])."""
        fused = self.bn(self.conv(torch.cat([f_branch, f_prev], dim=1)))
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(fused, 1), 1)
        scores = torch.softmax(torch.relu(self.bn_scores(self.fc(pooled))), dim=1)
        ta = scores[:, 0:1] * z_branch + scores[:, 1:2] * z_prev
        return fused, ta, scores


class ONEGate(nn.Module):
    """ONE's gate (Lan et al. 2018, as in the OKDDip code): an ensemble teacher over all branches.

        g = softmax(ReLU(BN1d(Linear(GAP(H)))))   (H: the shared trunk's output, g ∈ R^M)
        z^e = Σ_m g_m · z^m                          (the paper's Eq. 6 with D = this gate)

    Args:
        channels: channels of the shared trunk's output.
        branches: M.
    """

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)
        init_weights(self)

    def forward(self, shared: Tensor, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Returns (ensemble logits [N, K], gate [N, M])."""
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(shared, 1), 1)
        gate = torch.softmax(torch.relu(self.bn(self.fc(pooled))), dim=1)
        ensemble = (gate.unsqueeze(-1) * torch.stack(logits, dim=1)).sum(dim=1)
        return ensemble, gate


__all__ = ["AHBFFusion", "ONEGate"]
