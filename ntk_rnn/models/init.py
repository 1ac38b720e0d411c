"""The initial law μ0 of the per-unit parameters (c_i, w_i, b_i), i.i.d. over units (theory §2)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, get_args

import torch
from torch import Tensor

from ..errors import ConfigError

Kind = Literal["uniform", "normal", "rademacher", "constant"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class InitLaw:
    """μ0, default as theory §2: c ~ U[-1, 1], w ~ N(0, I/d), b ~ U[-ρ, ρ].

    Each group has a kind and a scale: `uniform` is U[-scale, scale], `normal` is
    N(0, scale²) (for w: N(0, scale² I/d)), `rademacher` is ±scale, `constant` is scale.
    For b the scale is ρ.

    Attributes:
        c: Kind of c's law.
        c_scale: Scale of c's law.
        w: Kind of w's law.
        w_scale: Scale of w's law.
        b: Kind of b's law.
        rho: ρ, the scale of b's law (Model D needs ρ · sup|σ'| < 1).
        sampler: Optional custom law replacing all of the above,
            `sampler(width, input_dim, generator, dtype) -> (c, w, b)`; the limit kernel
            then needs Monte Carlo (`callbacks.ntk.limit_method=iid`).
    """

    c: Kind = "uniform"
    c_scale: float = 1.0
    w: Kind = "normal"
    w_scale: float = 1.0
    b: Kind = "uniform"
    rho: float = 0.5
    sampler: Optional[Callable] = None

    def __post_init__(self) -> None:
        for group in ("c", "w", "b"):
            kind = getattr(self, group)
            if kind not in KINDS:
                raise ConfigError(
                    f"model.init.{group}={kind!r} is not a known law; choose one of {list(KINDS)}"
                )
        for field in ("c_scale", "w_scale", "rho"):
            if not float(getattr(self, field)) >= 0:
                raise ConfigError(f"model.init.{field}={getattr(self, field)} must be >= 0")

    @property
    def is_custom(self) -> bool:
        return self.sampler is not None

    @property
    def b_bound(self) -> float:
        """sup |b| under μ0 (inf for unbounded laws)."""
        return float("inf") if self.b == "normal" else float(self.rho)

    def c_second_moment(self) -> float:
        """E[c²], the factor of the P and Q terms of the limit kernel (theory §5)."""
        s2 = float(self.c_scale) ** 2
        return s2 / 3.0 if self.c == "uniform" else s2

    def sample(
        self, width: int, input_dim: int, generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw (c (N,), w (N, d), b (N,)) i.i.d. over units. Sampling is on CPU, then moved,
        so a seed gives the same network on every device."""
        if self.sampler is not None:
            c, w, b = self.sampler(width, input_dim, generator, dtype)
            c, w, b = (torch.as_tensor(t, dtype=dtype) for t in (c, w, b))
            if c.shape != (width,) or w.shape != (width, input_dim) or b.shape != (width,):
                raise ConfigError(
                    f"model.init.sampler returned shapes {tuple(c.shape)}, {tuple(w.shape)}, "
                    f"{tuple(b.shape)}; expected ({width},), ({width}, {input_dim}), ({width},)"
                )
            return c.to(device), w.to(device), b.to(device)
        c = _draw(self.c, self.c_scale, (width,), generator, dtype)
        w = _draw(self.w, self.w_scale, (width, input_dim), generator, dtype)
        if self.w == "normal":
            w = w / input_dim**0.5
        b = _draw(self.b, self.rho, (width,), generator, dtype)
        return c.to(device), w.to(device), b.to(device)


def _draw(kind: str, scale: float, shape: tuple, gen, dtype) -> Tensor:
    if kind == "uniform":
        return (2.0 * torch.rand(shape, generator=gen, dtype=dtype) - 1.0) * scale
    if kind == "normal":
        return torch.randn(shape, generator=gen, dtype=dtype) * scale
    if kind == "rademacher":
        return (2.0 * torch.randint(0, 2, shape, generator=gen).to(dtype) - 1.0) * scale
    return torch.full(shape, float(scale), dtype=dtype)


def reseed(model: Any, seed: int) -> bool:
    """Redraw θ_0 from ``seed`` with the model's ``reset_parameters(generator)`` when it has one
    (True); a model without it keeps the θ_0 it was built with (False)."""
    reset = getattr(model, "reset_parameters", None)
    if not callable(reset) or "generator" not in inspect.signature(reset).parameters:
        return False
    reset(generator_from_seed(seed))
    return True


def generator_from_seed(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with ``seed``: every seeded draw of the package starts here."""
    return torch.Generator().manual_seed(int(seed))
