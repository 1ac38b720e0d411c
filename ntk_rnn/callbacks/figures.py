"""TensorBoard images of kernels: heatmaps and eigen-spectra, rendered cheaply and readably.

Building a matplotlib figure per image event (``tight_layout``, tick-label text measurement,
mathtext) cost ~90 ms per figure — most of a `make run`'s NTK-callback time. `KernelImages`
keeps one figure per tag with a fixed layout, updates its artists' data and renders with the Agg
canvas into an RGB array for ``SummaryWriter.add_image`` (a few ms per image). No pyplot: the
global matplotlib backend of a notebook that imports ntk_rnn is left alone (rc settings are set
only around our own drawing).

Images are 560 × 480 px with 11–13 px text and true minus signs. K_t, K_0 and K_∞ share one
colour scale (``KernelImages.set_scale``, fixed at the first image event) so they can be compared
by eye; K_t − K_0 has its own symmetric scale.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..ntk.metrics import eigvals

DPI = 100
SIZE = (5.6, 4.8)  # inches: 560 × 480 px
RC = {"axes.unicode_minus": True, "font.size": 10, "axes.titlesize": 12,
      "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.labelsize": 11, "legend.fontsize": 10}
FLOOR = 1e-12  # eigenvalues below FLOOR × the largest are numerical noise: not drawn


def spectrum(K: Tensor, floor: float = FLOOR) -> np.ndarray:
    """Eigenvalues of the symmetric part of K, descending, without the numerical floor: those
    ≤ ``floor`` × the largest (zero or negative from round-off) are dropped."""
    ev = eigvals(K.detach().double().cpu()).numpy()
    top = float(ev.max()) if ev.size else 0.0
    return ev[ev > floor * top] if top > 0 else ev[:0]


class _Heatmap:
    def __init__(self, n: int, m: int, diverging: bool) -> None:
        with matplotlib.rc_context(RC):
            self.fig = Figure(figsize=SIZE, dpi=DPI)
            FigureCanvasAgg(self.fig)
            ax = self.fig.add_axes((0.05, 0.05, 0.72, 0.84))
            self.im = ax.imshow(np.zeros((n, m)), cmap="RdBu_r" if diverging else "viridis",
                                interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            self.cbar = self.fig.colorbar(self.im, cax=self.fig.add_axes((0.80, 0.05, 0.04, 0.84)))
            self.title = ax.set_title("")
        self.diverging = diverging

    def render(self, A: np.ndarray, title: str, clim: tuple[float, float] | None) -> np.ndarray:
        if self.diverging:  # its own symmetric scale
            v = float(np.abs(A).max()) or 1.0
            clim = (-v, v)
        elif clim is None:
            lo, hi = float(A.min()), float(A.max())
            clim = (lo, hi if hi > lo else lo + 1.0)
        self.im.set_clim(*clim)
        self.im.set_data(A)
        self.title.set_text(title)
        return _rgb(self.fig)


class _Spectrum:
    def __init__(self) -> None:
        with matplotlib.rc_context(RC):
            self.fig = Figure(figsize=SIZE, dpi=DPI)
            FigureCanvasAgg(self.fig)
            self.ax = self.fig.add_axes((0.15, 0.12, 0.8, 0.78))
            self.ax.set_xlabel("index")  # log10 on a linear axis: no mathtext tick
            self.ax.set_ylabel("log10 eigenvalue")  # labels to typeset (3× faster)
            self.ax.grid(True, alpha=0.3)
        self.lines = {}

    def render(self, spectra: dict[str, np.ndarray], title: str) -> np.ndarray:
        spectra = {k: v for k, v in spectra.items() if len(v)}
        for label, ev in spectra.items():
            if label not in self.lines:
                (self.lines[label],) = self.ax.plot([], [], ".-", ms=5, label=label)
                self.ax.legend(loc="upper right")
            self.lines[label].set_data(np.arange(1, len(ev) + 1), np.log10(ev))
        if spectra:
            lg = np.log10(np.concatenate(list(spectra.values())))
            self.ax.set_xlim(0, max(len(ev) for ev in spectra.values()) + 1)
            self.ax.set_ylim(lg.min() - 0.3, lg.max() + 0.3)
        self.ax.set_title(title)
        return _rgb(self.fig)


def _rgb(fig: Figure) -> np.ndarray:
    with matplotlib.rc_context(RC):  # tick labels are formatted (minus signs) at draw time
        fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class KernelImages:
    """Renders kernel heatmaps (``heatmap``) and spectra (``spectrum_image``) as (H, W, 3) uint8
    arrays, reusing one figure per tag. Heatmaps that are not diverging share the colour scale
    set by `set_scale` (per-image min–max until it is set)."""

    def __init__(self) -> None:
        self._figs: dict[str, object] = {}
        self.clim: tuple[float, float] | None = None

    def set_scale(self, *kernels: Tensor, margin: float = 0.05) -> tuple[float, float]:
        """One colour scale for K_t, K_0 and K_∞: their common range, widened by ``margin`` of it
        (a kernel that later leaves it saturates at the ends of the colour bar)."""
        lo = min(float(K.min()) for K in kernels)
        hi = max(float(K.max()) for K in kernels)
        pad = margin * (hi - lo) if hi > lo else 1.0
        self.clim = (lo - pad, hi + pad)
        return self.clim

    def heatmap(self, tag: str, K: Tensor, title: str, diverging: bool = False) -> np.ndarray:
        A = K.detach().double().cpu().numpy()
        key = (tag, A.shape, diverging)
        if key not in self._figs:
            self._figs[key] = _Heatmap(*A.shape, diverging)
        return self._figs[key].render(A, title, None if diverging else self.clim)

    def spectrum_image(self, tag: str, spectra: dict[str, np.ndarray], title: str) -> np.ndarray:
        if tag not in self._figs:
            self._figs[tag] = _Spectrum()
        return self._figs[tag].render(spectra, title)
