"""The infinite-width limit dynamics: the limit ODE and its closed-form solution (theory §5), and
Model F's cell kernel and coupled limit (theory §6)."""

from .feedback import FeedbackLimit, FeedbackSolution, limit_cell_ntk, solve_feedback_limit
from .ode import KernelSolution, LimitODE

__all__ = ["KernelSolution", "LimitODE", "FeedbackLimit", "FeedbackSolution", "limit_cell_ntk",
           "solve_feedback_limit"]
