"""Matplotlib figures for TensorBoard images: kernel heatmaps and eigen-spectra."""

from __future__ import annotations

from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def heatmap_figure(K: Tensor, title: str, diverging: bool = False):
    A = K.detach().double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=80)
    if diverging:
        v = abs(A).max() or 1.0
        im = ax.imshow(A, cmap="RdBu_r", vmin=-v, vmax=v)
    else:
        im = ax.imshow(A, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def spectrum_figure(K: Tensor, K_inf: Optional[Tensor]):
    fig, ax = plt.subplots(figsize=(3.8, 3.0), dpi=80)
    for M, label in ((K, "K_t"), (K_inf, "K_∞")):
        if M is None:
            continue
        ev = torch.linalg.eigvalsh(0.5 * (M + M.T).double().cpu()).flip(0).clamp_min(1e-16)
        ax.semilogy(range(1, len(ev) + 1), ev.numpy(), ".-", label=label, ms=3)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
