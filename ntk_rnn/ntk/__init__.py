"""NTK engine: empirical kernel (generic torch.func, structured), metrics, Model F's cell kernel.

Large probe sets: ``blocked_ntk`` (the kernel within a memory budget) and ``KernelOperator`` with
the matrix-free metrics of ``ntk.large`` (``large.trace``, ``large.frobenius_norm``,
``large.top_eigenvalues``, ``large.target_alignment``, ``large.intrinsic_dimension``).
"""

from . import large
from ._features_c import pin as pin_features
from ._features_c import record as features_choice
from .cell import cell_ntk
from .empirical import (
    MEMORY_BUDGET,
    METHODS,
    ONLINE_GRADIENTS,
    Footprint,
    Method,
    OnlineGradient,
    check_inputs,
    choose_method,
    empirical_ntk,
    footprint,
    jacobian_blocks,
    method_costs,
    ntk_blocks,
    ntk_vp_kernel,
    training_kernel,
)
from .large import DEFAULT_MEMORY_BUDGET, Estimate, KernelOperator, blocked_ntk
from .metrics import (
    effective_rank,
    intrinsic_dimension,
    kernel_distance,
    kernel_velocity,
    relative_frobenius,
    target_alignment,
    top_eigenvalues,
)
from .structured import structure_of, structured_ntk, supports_structured, unit_feature_matrix

__all__ = [
    "ONLINE_GRADIENTS", "MEMORY_BUDGET", "METHODS", "OnlineGradient", "Method", "check_inputs",
    "choose_method", "empirical_ntk", "jacobian_blocks", "ntk_blocks", "ntk_vp_kernel",
    "training_kernel", "cell_ntk", "structured_ntk", "supports_structured", "unit_feature_matrix",
    "effective_rank", "intrinsic_dimension", "kernel_distance", "kernel_velocity",
    "relative_frobenius", "target_alignment", "top_eigenvalues", "Footprint", "footprint",
    "method_costs", "features_choice", "pin_features", "large", "DEFAULT_MEMORY_BUDGET",
    "Estimate", "KernelOperator", "blocked_ntk", "structure_of",
]
