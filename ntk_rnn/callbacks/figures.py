"""TensorBoard images of kernels: heatmaps and eigen-spectra, rendered cheaply.

Building a matplotlib figure per image event (``tight_layout``, tick-label text measurement,
mathtext) cost ~90 ms per figure — most of a `make run`'s NTK-callback time. :class:`KernelImages`
keeps one figure per tag with a fixed layout, updates its artists' data and renders with the Agg
canvas into an RGB array for ``SummaryWriter.add_image`` (a few ms per image). No pyplot: the
global matplotlib backend of a notebook that imports ntk_rnn is left alone.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..ntk.metrics import _eigvals


def spectrum(K: Tensor) -> np.ndarray:
    """Eigenvalues of the symmetric part of K, descending, floored at 1e-16 (for a log axis)."""
    return _eigvals(K.detach().double().cpu()).clamp_min(1e-16).numpy()


class _Heatmap:
    def __init__(self, n: int, m: int, diverging: bool) -> None:
        self.fig = Figure(figsize=(3.6, 3.2), dpi=80)
        FigureCanvasAgg(self.fig)
        ax = self.fig.add_axes((0.04, 0.04, 0.72, 0.84))
        self.im = ax.imshow(np.zeros((n, m)), cmap="RdBu_r" if diverging else "viridis",
                            interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        self.fig.colorbar(self.im, cax=self.fig.add_axes((0.80, 0.04, 0.04, 0.84)))
        self.title = ax.set_title("", fontsize=9)
        self.diverging = diverging

    def render(self, A: np.ndarray, title: str) -> np.ndarray:
        if self.diverging:
            v = float(np.abs(A).max()) or 1.0
            self.im.set_clim(-v, v)
        else:
            lo, hi = float(A.min()), float(A.max())
            self.im.set_clim(lo, hi if hi > lo else lo + 1.0)
        self.im.set_data(A)
        self.title.set_text(title)
        return _rgb(self.fig)


class _Spectrum:
    def __init__(self) -> None:
        self.fig = Figure(figsize=(3.8, 3.0), dpi=80)
        FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_axes((0.2, 0.17, 0.75, 0.73))
        self.ax.set_xlabel("index", fontsize=8)  # log10 on a linear axis: no mathtext tick
        self.ax.set_ylabel("log10 eigenvalue", fontsize=8)  # labels to typeset (3× faster)
        self.ax.tick_params(labelsize=7)
        self.lines = {}

    def render(self, spectra: dict[str, np.ndarray], title: str) -> np.ndarray:
        for label, ev in spectra.items():
            if label not in self.lines:
                (self.lines[label],) = self.ax.plot([], [], ".-", ms=3, label=label)
                self.ax.legend(fontsize=8)
            self.lines[label].set_data(np.arange(1, len(ev) + 1), np.log10(ev))
        lg = np.log10(np.concatenate(list(spectra.values())))
        self.ax.set_xlim(0, max(len(ev) for ev in spectra.values()) + 1)
        self.ax.set_ylim(lg.min() - 0.3, lg.max() + 0.3)
        self.ax.set_title(title, fontsize=9)
        return _rgb(self.fig)


def _rgb(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class KernelImages:
    """Renders kernel heatmaps (``heatmap``) and spectra (``spectrum_image``) as (H, W, 3) uint8
    arrays, reusing one figure per tag."""

    def __init__(self) -> None:
        self._figs: dict[str, object] = {}

    def heatmap(self, tag: str, K: Tensor, title: str, diverging: bool = False) -> np.ndarray:
        A = K.detach().double().cpu().numpy()
        key = (tag, A.shape, diverging)
        if key not in self._figs:
            self._figs[key] = _Heatmap(*A.shape, diverging)
        return self._figs[key].render(A, title)

    def spectrum_image(self, tag: str, spectra: dict[str, np.ndarray], title: str) -> np.ndarray:
        if tag not in self._figs:
            self._figs[tag] = _Spectrum()
        return self._figs[tag].render(spectra, title)

