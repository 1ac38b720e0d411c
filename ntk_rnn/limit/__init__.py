"""The infinite-width limit dynamics (theory §5): the limit ODE and its closed-form solution."""

from .feedback import FeedbackLimit, FeedbackSolution, limit_cell_ntk, solve_feedback_limit  # noqa: F401,E501
from .ode import KernelSolution, LimitODE

__all__ = ["KernelSolution", "LimitODE"]
