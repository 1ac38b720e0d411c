"""NTK engine: the empirical kernel (generic torch.func and structured), metrics, Model F's cell kernel."""

from .empirical import (
    GRADIENTS,
    MEMORY_BUDGET,
    METHODS,
    Gradient,
    Method,
    check_inputs,
    choose_method,
    empirical_ntk,
    jacobian_blocks,
    ntk_blocks,
    ntk_vp_kernel,
    training_kernel,
)
from .cell import cell_ntk
from .metrics import (
    effective_rank,
    intrinsic_dimension,
    kernel_distance,
    kernel_velocity,
    relative_frobenius,
    target_alignment,
    top_eigenvalues,
)
from .structured import structured_ntk, supports_structured, unit_feature_matrix

__all__ = [
    "GRADIENTS", "MEMORY_BUDGET", "METHODS", "Gradient", "Method", "check_inputs",
    "choose_method", "empirical_ntk", "jacobian_blocks", "ntk_blocks", "ntk_vp_kernel",
    "training_kernel", "cell_ntk", "structured_ntk", "supports_structured", "unit_feature_matrix",
    "effective_rank", "intrinsic_dimension", "kernel_distance", "kernel_velocity",
    "relative_frobenius", "target_alignment", "top_eigenvalues",
]
