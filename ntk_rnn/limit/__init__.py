"""The infinite-width limit dynamics (theory §5): the limit ODE and its closed-form solution."""

from .ode import KernelSolution, LimitODE

__all__ = ["KernelSolution", "LimitODE"]
