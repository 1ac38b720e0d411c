"""``limit_ntk(model, x, x2=None)``: the infinite-width kernel K_∞ of any model, by its family.

The model's family (``ntk_rnn.models.family_of(model).limit``) names the limit; this module's
table ``LIMITS`` maps the name to the function that computes it:

==================  ===============================================================  =========
``"quadrature"``    Model D: E[S S'] + E[c²] E[P·P' + Q Q'] by quadrature/RQMC (§5)   exact
``"cell"``          Model F at initialisation: the cell kernel at (x_L, 0) (§6)        exact
``"elman"``         full-matrix Elman network: closed-form recursion (§9)              exact
``"coordinate"``    GRU: the infinite-width coordinate distribution, sampled         sampled
                    (Tensor Programs, §10; ``limit.coordinate``), no finite-width bias
``"monte_carlo"``   any other model (custom): the mean NTK of wide networks at N′,     bounded
                    its bias estimated from N′/2 (``limit.monte_carlo``)
==================  ===============================================================  =========

A ``"coordinate"`` model asked for with Monte-Carlo keywords (``width``, ``draws``,
``factory``) gets the Monte-Carlo limit instead, and so does one outside the sampler's scope
(``limit.coordinate.applies``: E[c] ≠ 0 under NTK scaling).

Every result has ``value`` (float64), ``error`` (the largest per-entry error estimate) and
``relative_error`` (‖error‖_F/‖K_∞‖_F: the same units as the relative distance
‖K − K_∞‖_F/‖K_∞‖_F that the NTK callback logs).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.family import LIMIT_KINDS, family_of


def _quadrature(model, x, x2, *, tol=5e-4, method="auto", **kw):
    from .kernel import limit_ntk as model_d_limit

    return model_d_limit(model, x, x2, tol=tol, method=method, **kw)


def _cell(model, x, x2, *, tol=5e-4, method="auto", **kw):
    """Model F at initialisation: the memory is m_0 = 0 and ∂_s f = O(N^{1/2−β}) → 0, so the
    window NTK tends to the cell kernel at (x_L, 0) (theory §6)."""
    from .feedback import limit_cell_ntk

    def last(z: Tensor) -> Tensor:
        z = z if z.dim() == 3 else z.unsqueeze(0)
        return torch.cat([z[:, -1], z.new_zeros(len(z), 1)], dim=1)

    return limit_cell_ntk(model, last(x), None if x2 is None else last(x2),
                          tol=min(tol, 1e-6), method=method, **kw)


def _elman(model, x, x2, *, tol=5e-4, method="auto", **kw):
    from .elman import elman_limit_ntk

    return elman_limit_ntk(model, x, x2, tol=min(tol, 1e-4), **kw)


def _monte_carlo(model, x, x2, *, factory=None, width=None, draws=8, ntk_method="auto",
                 tol=None, method=None, **kw):
    from .monte_carlo import mc_limit_ntk

    fam = family_of(model)
    N = int(getattr(model, "width", 1))
    width = int(width or default_mc_width(N))

    def make(width: int, seed: int) -> nn.Module:
        return fam.at_width(model, width, seed, factory)

    return mc_limit_ntk(make, x, width=width, draws=draws, x2=x2, method=ntk_method,
                        compare_width=max(1, width // 2), **kw)


def _coordinate(model, x, x2, *, samples=None, replicates=None, seed=0, tol=None, method=None,
                **kw):
    from .coordinate import DEFAULT_REPLICATES, DEFAULT_SAMPLES, coordinate_limit_ntk

    return coordinate_limit_ntk(model, x, x2, samples=int(samples or DEFAULT_SAMPLES),
                                replicates=int(replicates or DEFAULT_REPLICATES), seed=seed)


def default_mc_width(N: int) -> int:
    """N′ of a Monte-Carlo limit: 2N, at least 256 and at most 2048 (its bias is estimated from
    a second estimate at N′/2)."""
    return int(min(max(2 * N, 256), 2048))


#: the limit's name (a model family's ``limit``) → the function computing it
LIMITS: dict[str, Callable[..., Any]] = {
    "quadrature": _quadrature, "cell": _cell, "elman": _elman, "coordinate": _coordinate,
    "monte_carlo": _monte_carlo,
}
_MC_KEYS = ("factory", "width", "draws", "ntk_method")
assert set(LIMITS) == set(LIMIT_KINDS)


def limit_kind(model: Any) -> str:
    """The name of ``model``'s limit ("quadrature", "cell", "elman", "coordinate",
    "monte_carlo"); a "coordinate" model outside the sampler's scope has "monte_carlo"."""
    kind = family_of(model).limit
    if kind == "coordinate":
        from .coordinate import applies

        return kind if applies(model) else "monte_carlo"
    return kind


def is_exact(model: Any) -> bool:
    """Whether ``model``'s limit is computed without finite-width networks (to quadrature
    accuracy, or sampled from the infinite-width coordinate distribution) rather than by the
    Monte Carlo over wider networks."""
    return limit_kind(model) != "monte_carlo"


def sampler_settings(model: Any) -> dict:
    """What a sampled limit's numbers depend on besides the model and the windows (start notes,
    the K_∞ cache key): the coordinate sampler's ``samples`` and ``replicates``; {} otherwise."""
    if limit_kind(model) != "coordinate":
        return {}
    from .coordinate import DEFAULT_REPLICATES, DEFAULT_SAMPLES

    return {"samples": DEFAULT_SAMPLES, "replicates": DEFAULT_REPLICATES}


def limit_ntk(model: nn.Module, x: Tensor, x2: Optional[Tensor] = None, **kw: Any):
    """K_∞(x̄_i, x̄'_j) of ``model`` for windows x (n, L, d) and x2 (m, L′, d) (default x), by its
    family's limit (see the module docstring). Keywords go to that limit: ``tol``, ``method``
    (quadrature/cell/elman); ``samples``, ``replicates``, ``seed`` (coordinate); ``factory``,
    ``width``, ``draws``, ``ntk_method``, ``seed`` (Monte Carlo; given to a "coordinate" model
    they select the Monte Carlo). Returns an object with ``value``, ``error``,
    ``relative_error``."""
    kind = limit_kind(model)
    if kind not in LIMITS:
        raise ConfigError(f"the limit {kind!r} of {type(model).__qualname__} is not known; "
                          f"known: {list(LIMITS)}")
    if kind == "coordinate" and any(kw.get(k) is not None for k in _MC_KEYS):
        kind = "monte_carlo"
    if kind != "monte_carlo":
        for k in _MC_KEYS:
            kw.pop(k, None)
    if kind != "coordinate":
        kw.pop("samples", None)
        kw.pop("replicates", None)
    return LIMITS[kind](model, x, x2, **kw)
