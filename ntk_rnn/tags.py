"""The names a run writes, in one place: TensorBoard tags, ``metrics.json`` keys and the config
names of the callbacks whose charts the layout shows.

A callback's log point is a dict of plain names (``drift_from_init``, ``eig_1``, ...); its tag is
``<group>/<name>`` and its key in ``metrics.json`` is ``<group>_<name>`` (`ntk_tag`,
`ntk_key`, `lazy_tag`, `lazy_key`). The groups sort in TensorBoard's Time Series as
``ntk/`` < ``ntk_images/`` < ``output/`` < ``params/`` < ``train/``. The titles (`TITLES`) are
those of the custom-scalars charts, the HParams columns and ``python -m ntk_rnn.sweep --plot``.
"""

from __future__ import annotations

# --- TensorBoard tags -----------------------------------------------------------------------
NTK_DRIFT = "ntk/drift_from_init"
NTK_DISTANCE_TO_LIMIT = "ntk/distance_to_limit"
NTK_LOG10_KERNEL_DISTANCE = "ntk/log10_kernel_distance"
NTK_LOG10_KERNEL_DISTANCE_TO_LIMIT = "ntk/log10_kernel_distance_to_limit"
NTK_VELOCITY = "ntk/velocity"
NTK_TARGET_ALIGNMENT = "ntk/target_alignment"
NTK_EFFECTIVE_RANK = "ntk/effective_rank"
NTK_LIMIT_TEXT = "ntk/limit_kernel"  # a text entry: K_∞'s method and error
NTK_IMAGES = "ntk_images/"  # + K_t, K_t_minus_K_0, ...

OUTPUT_RMSE_TO_LIMIT = "output/rmse_to_limit"
OUTPUT_LIMIT_ERROR = "output/limit_error"
OUTPUT_LIMIT_RMS = "output/limit_rms"
OUTPUT_NETWORK_RMS = "output/network_rms"

TRAIN_LOSS = "train/loss"
TRAIN_RUNNING_MSE = "train/running_mse"
TRAIN_T = "train/t"
TRAIN_STEPS_PER_S = "train/steps_per_s"


# a log point's plain name → its tag (``drift_from_init`` → ``ntk/drift_from_init``); the cosine
# kernel distances and the eigenvalues ``eig_<i>`` are logged as log10, the per-block drifts
# ``drift_<block>`` under per_block/; the linearized shadow's names (``output_gap``) under lazy/
ntk_tag = "ntk/{}".format
ntk_log10_tag = "ntk/log10_{}".format
ntk_spectrum_tag = "ntk/spectrum/log10_{}".format
ntk_block_tag = "ntk/per_block/{}".format
lazy_tag = "lazy/{}".format


def displacement_tag(param: str, absolute: bool = False) -> str:
    """‖θ_t − θ_0‖/‖θ_0‖ of one parameter (or the histogram of |θ_t − θ_0| with ``absolute``)."""
    return f"params/{'abs_' if absolute else ''}displacement_{param}"


# --- metrics.json keys ----------------------------------------------------------------------
ntk_key = "ntk_{}".format  # ``drift_from_init`` → ``ntk_drift_from_init``
lazy_key = "lazy_{}".format  # ``output_gap`` → ``lazy_output_gap``
RUNNING_MSE = "running_mse"
FINAL_LOSS = "final_loss"
OUTPUT_RMSE_FINAL_KEY = "output_rmse_final"
NTK_DRIFT_KEY = ntk_key("drift_from_init")
NTK_DISTANCE_TO_LIMIT_KEY = ntk_key("distance_to_limit")
NTK_KERNEL_DISTANCE_TO_LIMIT_KEY = ntk_key("kernel_distance_to_limit")
NTK_LIMIT_ERROR_KEY = ntk_key("limit_error_estimate")
NTK_LIMIT_RELATIVE_ERROR_KEY = ntk_key("limit_relative_error")
NTK_LIMIT_METHOD_KEY = ntk_key("limit_method")
NTK_INITIAL_DISTANCE_TO_LIMIT_KEY = ntk_key("initial_distance_to_limit")

# the member columns of an ensemble's summary and the NTK columns of a sweep's table
SUMMARY_KEYS = (RUNNING_MSE, FINAL_LOSS, NTK_DRIFT_KEY, NTK_DISTANCE_TO_LIMIT_KEY)

# --- titles ---------------------------------------------------------------------------------
TITLES = {
    NTK_DRIFT: "drift from init ‖K_t − K_0‖/‖K_0‖",
    NTK_DISTANCE_TO_LIMIT: "distance to limit ‖K_t − K_∞‖/‖K_∞‖",
    NTK_LOG10_KERNEL_DISTANCE_TO_LIMIT: "log10 cosine distance to K_∞",
    NTK_LOG10_KERNEL_DISTANCE: "log10 cosine distance to K_0",
    NTK_VELOCITY: "velocity",
    NTK_TARGET_ALIGNMENT: "target alignment",
    NTK_EFFECTIVE_RANK: "effective rank",
    OUTPUT_RMSE_TO_LIMIT: "output error rms(Ŷ − h_t)",
    OUTPUT_LIMIT_ERROR: "error of h_t (floor)",
    OUTPUT_LIMIT_RMS: "rms of h_t",
    OUTPUT_NETWORK_RMS: "rms of Ŷ",
    TRAIN_RUNNING_MSE: "running MSE",
    TRAIN_LOSS: "loss",
}

# (tag, HParams column, metrics.json key that says the tag was logged), in the HParams order
HPARAMS_METRICS: tuple[tuple[str, str, str], ...] = (
    (NTK_DRIFT, "drift from init", NTK_DRIFT_KEY),
    (NTK_DISTANCE_TO_LIMIT, "distance to limit", NTK_DISTANCE_TO_LIMIT_KEY),
    (NTK_LOG10_KERNEL_DISTANCE_TO_LIMIT, "log10 kernel distance to limit",
     NTK_KERNEL_DISTANCE_TO_LIMIT_KEY),
    (OUTPUT_RMSE_TO_LIMIT, "output error", OUTPUT_RMSE_FINAL_KEY),
    (TRAIN_RUNNING_MSE, "running MSE", RUNNING_MSE),
)

# --- callbacks whose charts the custom-scalars layout shows: (config name, class name) ------
NTK_CALLBACK = ("ntk", "NTKCallback")
OUTPUT_CALLBACK = ("output", "OutputTrackingCallback")
