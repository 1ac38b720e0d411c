"""Everything infinite-width: ``limit_ntk(model, x, x2=None)`` (K_∞ of any model, by its family:
``limit.dispatch``), Model D's limit kernel (theory §5), Model F's cell kernel and coupled limit
(theory §6), the closed-form limit of the full-matrix Elman network (theory §9), the GRU's limit
sampled from the infinite-width coordinate distribution (theory §10), the Monte-Carlo limit of
any other model, and the limit ODE with its closed-form solution."""

from .coordinate import CoordinateLimitKernel, coordinate_limit_ntk
from .dispatch import LIMITS, is_exact, limit_kind, limit_ntk, sampler_settings
from .elman import elman_limit_ntk
from .feedback import FeedbackLimit, FeedbackSolution, limit_cell_ntk, solve_feedback_limit
from .kernel import LimitAccuracyWarning, LimitKernel
from .monte_carlo import MCLimitKernel, mc_limit_ntk
from .ode import KernelSolution, LimitODE
from .window import limit_window_ntk, window_drift_curve

__all__ = ["LimitKernel", "LimitAccuracyWarning", "limit_ntk", "KernelSolution", "LimitODE",
           "FeedbackLimit", "FeedbackSolution", "limit_cell_ntk", "solve_feedback_limit",
           "MCLimitKernel", "mc_limit_ntk", "elman_limit_ntk", "coordinate_limit_ntk",
           "CoordinateLimitKernel", "sampler_settings",
           "limit_window_ntk", "window_drift_curve", "LIMITS", "is_exact", "limit_kind"]
