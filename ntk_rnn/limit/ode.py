"""The limit ODE of Model D (theory §5) solved in closed form on a sample of π.

    ∂_t h_t(x̄) = α E_π[(Y − h_t(X̄)) K(x̄, X̄)],   h_0 = 0.

With M windows X̄_M drawn from π (targets Y_M) and K_MM = V Λ Vᵀ, the sampled ODE has the solution

    h_t(x̄) = K_{x̄M} V diag((1 − e^{−α t λ/M}) / λ) Vᵀ Y_M,

and h_∞(x̄) = K_{x̄M} K_MM^+ Y_M (kernel regression). The π-sample adds an O(M^{-1/2}) error:
``LimitODE.from_source`` draws R independent samples and reports the spread of their solutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .kernel import limit_ntk

_F64 = torch.float64


class KernelSolution:
    """Closed-form solution for one sample (K_MM, Y_M): coefficients a_t, h_t = K_{x̄M} a_t.

    In the eigenbasis a_t = V ĉ_t with ĉ_t = diag((1 − e^{−α t λ/M}) / λ) Vᵀ Y_M, so h_t on probes
    is (K_{x̄M} V) ĉ_t: with K_{x̄M} V stored (``LimitODE.reduced``), V is not needed again."""

    def __init__(self, K_MM: Tensor, Y_M: Tensor, alpha: float, rcond: float = 1e-12) -> None:
        K_MM = K_MM.to(_F64)
        M = K_MM.shape[0]
        if K_MM.shape != (M, M) or Y_M.shape != (M,):
            raise ConfigError(f"LimitODE: K_MM {tuple(K_MM.shape)} and Y_M {tuple(Y_M.shape)} "
                              "disagree; expected (M, M) and (M,)")
        if not float(alpha) > 0:
            raise ConfigError(f"LimitODE: alpha={alpha} must be > 0")
        lam, V = torch.linalg.eigh(0.5 * (K_MM + K_MM.T))
        self.M, self.alpha = M, float(alpha)
        self.lam = lam.clamp_min(0.0)  # K is PSD; negative round-off eigenvalues are dropped
        self.V: Optional[Tensor] = V
        self.proj = V.T @ Y_M.to(_F64)  # Vᵀ Y_M
        self.cutoff = rcond * float(self.lam.max())

    @classmethod
    def from_eigen(cls, lam: Tensor, proj: Tensor, alpha: float, cutoff: float
                   ) -> "KernelSolution":
        """A solution known by its eigenvalues λ and Vᵀ Y_M only (no V: eigen coefficients)."""
        self = cls.__new__(cls)
        self.M, self.alpha, self.cutoff = lam.shape[0], float(alpha), float(cutoff)
        self.lam, self.proj, self.V = lam.to(_F64), proj.to(_F64), None
        return self

    def eigen_coefficients(self, t: float | Tensor) -> Tensor:
        """ĉ_t = diag((1 − e^{−α t λ/M}) / λ) Vᵀ Y_M, shape (len(t), M); λ → 0 gives α t / M."""
        t = torch.as_tensor(t, dtype=_F64).reshape(-1, 1)
        rate = self.alpha * self.lam / self.M  # (M,)
        gain = torch.where(self.lam > self.cutoff,
                           -torch.expm1(-t * rate) / self.lam.clamp_min(1e-300),
                           t * self.alpha / self.M)
        return gain * self.proj

    def eigen_coefficients_inf(self) -> Tensor:
        """ĉ_∞ = Λ^+ Vᵀ Y_M (eigenvalues below rcond·λ_max dropped), shape (M,)."""
        inv = torch.where(self.lam > self.cutoff, 1.0 / self.lam.clamp_min(1e-300),
                          torch.zeros_like(self.lam))
        return inv * self.proj

    def _need_V(self) -> Tensor:
        if self.V is None:
            raise ValueError("this solution was restored without V: use eigen_coefficients")
        return self.V

    def coefficients(self, t: float | Tensor) -> Tensor:
        """a_t = V ĉ_t, shape (len(t), M)."""
        return self.eigen_coefficients(t) @ self._need_V().T

    def coefficients_inf(self) -> Tensor:
        """a_∞ = K_MM^+ Y_M."""
        return self.eigen_coefficients_inf() @ self._need_V().T


@dataclass
class LimitODE:
    """h_t on probe windows, from R independent samples of π (theory §5).

    ``K_xM[r]`` is the limit kernel between the probes and sample r, ``KV[r] = K_xM[r] V_r`` the
    same in sample r's eigenbasis; the estimate is the mean of the R solutions and ``error`` its
    standard error (per probe), so that no comparison with a network hides below it.
    ``reduced()`` / ``from_reduced`` store and restore a solution by (λ, Vᵀ Y_M, K_xM V) only —
    O(M n) numbers instead of O(M²), and no eigendecomposition on loading.
    """

    solutions: list[KernelSolution]
    KV: list[Tensor]
    kernel_error: float = 0.0
    K_MM: Optional[list[Tensor]] = None  # the inputs (None once restored from ``reduced``)
    Y_M: Optional[list[Tensor]] = None
    K_xM: Optional[list[Tensor]] = None

    @classmethod
    def from_kernels(cls, K_MM: Sequence[Tensor], Y_M: Sequence[Tensor], K_xM: Sequence[Tensor],
                     alpha: float, kernel_error: float = 0.0) -> "LimitODE":
        sols = [KernelSolution(k, y, alpha) for k, y in zip(K_MM, Y_M)]
        K_xM = [k.to(_F64) for k in K_xM]
        return cls(sols, [k @ s.V for k, s in zip(K_xM, sols)], float(kernel_error),
                   [k.to(_F64) for k in K_MM], [y.to(_F64) for y in Y_M], K_xM)

    def reduced(self) -> dict:
        """What ``h``, ``error`` and ``h_inf`` need, as a dict of tensors (for a cache file)."""
        return {"lam": [s.lam for s in self.solutions], "proj": [s.proj for s in self.solutions],
                "cutoff": [s.cutoff for s in self.solutions], "KV": self.KV,
                "kernel_error": self.kernel_error}

    @classmethod
    def from_reduced(cls, d: dict, alpha: float) -> "LimitODE":
        sols = [KernelSolution.from_eigen(lam, p, alpha, c)
                for lam, p, c in zip(d["lam"], d["proj"], d["cutoff"])]
        return cls(sols, [k.to(_F64) for k in d["KV"]], float(d["kernel_error"]))

    @classmethod
    def from_source(cls, model, source, probes: Tensor, alpha: float, M: int = 1024,
                    samples: int = 2, length: Optional[int] = None,
                    generator: Optional[torch.Generator] = None, tol: float = 5e-4,
                    kernel: Optional[Callable] = None) -> "LimitODE":
        """Draw ``samples`` independent sets of M stationary windows (length ``length``, default
        the probes' L), compute the limit kernel on [sample, probes] once per set and solve.

        ``kernel(model, x, x2=None, tol=...) -> LimitKernel`` is the limit kernel (default
        :func:`~ntk_rnn.limit.limit_ntk`, Model D); the Elman network's is
        :func:`~ntk_rnn.limit.elman_limit_ntk` (with its BPTT ``window`` bound, theory §9),
        which also takes training windows longer than the probes."""
        if samples < 1 or M < 1:
            raise ConfigError(f"LimitODE: samples={samples} and M={M} must be >= 1")
        L = int(length or probes.shape[1])
        K_MM, Y_M, K_xM, err = [], [], [], 0.0
        for _ in range(samples):
            X, Y = source.windows(M, L, generator)
            if kernel is None:
                allx = torch.cat([X.to(_F64), probes.to(_F64)], dim=0)
                lim = limit_ntk(model, allx, tol=tol)
                K_MM.append(lim.value[:M, :M])
                K_xM.append(lim.value[M:, :M])
                err = max(err, float(lim.error))
            else:
                lim, cross = kernel(model, X.to(_F64), tol=tol), \
                    kernel(model, probes.to(_F64), X.to(_F64), tol=tol)
                K_MM.append(lim.value)
                K_xM.append(cross.value)
                err = max(err, float(lim.error), float(cross.error))
            Y_M.append(Y.to(_F64))
        return cls.from_kernels(K_MM, Y_M, K_xM, alpha, err)

    def _stack(self, coeffs: list[Tensor]) -> Tensor:
        return torch.stack([c @ K.T for c, K in zip(coeffs, self.KV)])  # (R, T, n)

    def h_samples(self, t: float | Tensor) -> Tensor:
        """h_t(probes) for each sample: (R, len(t), n)."""
        return self._stack([s.eigen_coefficients(t) for s in self.solutions])

    def h(self, t: float | Tensor) -> Tensor:
        """Mean over samples of h_t(probes): (len(t), n)."""
        return self.h_samples(t).mean(0)

    def error(self, t: float | Tensor) -> Tensor:
        """Standard error of ``h(t)`` from the spread of the R samples: (len(t), n).
        With R = 1 there is no spread: NaN."""
        hs = self.h_samples(t)
        if hs.shape[0] < 2:
            return torch.full(hs.shape[1:], float("nan"), dtype=_F64)
        return hs.std(0) / hs.shape[0] ** 0.5

    def h_inf(self) -> Tensor:
        """Kernel regression h_∞(probes) = K_{x̄M} K_MM^+ Y_M, averaged over samples: (n,)."""
        return self._stack([s.eigen_coefficients_inf()[None] for s in self.solutions]).mean(0)[0]
