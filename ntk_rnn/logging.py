"""TensorBoard: the run's writer, its HParams entry and its custom-scalars layout.

Everything is written into the run directory itself (one run = one TensorBoard run). The HParams
metrics are the live curves' tags (HParams shows the last value of a scalar tag), so no one-point
duplicate tags are written. Time Series groups cards by the tag's first component, sorted: the
NTK curves (``ntk/``) sort before ``ntk_images/``, ``output/``, ``params/`` and ``train/``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from . import tags as T
from .tags import HPARAMS_METRICS

# --- HParams --------------------------------------------------------------------------------
# (config key, column name, description): the hyper-parameters of a single run, in this order
MAIN_HPARAMS: tuple[tuple[str, str, str], ...] = (
    ("model.width", "width", "N, the number of hidden units"),
    ("model.beta", "beta", "β, the mean-field exponent"),
    ("train.alpha", "alpha", "α, the learning-rate scale"),
    ("train.gradient", "gradient", "rtrl (exact), truncated, or bptt (any model)"),
    ("seed", "seed", "the run seed"),
    ("train.horizon", "horizon", "limit time t = steps / N reached by the run"),
)
INT_WIDTH = 9  # integers are written as right-aligned strings (shown as "128", sorted as numbers)
_NOT_SWEPT = ("hydra.", "train.resume")


def tensorboard_enabled(cfg: Any) -> bool:
    lg = cfg.get("logger") if hasattr(cfg, "get") else getattr(cfg, "logger", None)
    return lg is None or bool(lg.get("tensorboard", True))


def make_writer(cfg: Any, run_dir: str | Path,
                purge_step: Optional[int] = None) -> Optional[SummaryWriter]:
    """A SummaryWriter on the run directory itself, so one run = one TensorBoard run.
    ``purge_step`` (resume): readers drop what earlier event files hold from that step on."""
    if not tensorboard_enabled(cfg):
        return None
    lg = cfg.get("logger") if hasattr(cfg, "get") else getattr(cfg, "logger", None)
    flush = int(lg.get("flush_secs", 10)) if lg is not None else 10
    if purge_step is not None:
        _after_existing_event_files(Path(run_dir))
    return SummaryWriter(log_dir=str(run_dir), flush_secs=flush, purge_step=purge_step)


def _after_existing_event_files(run_dir: Path) -> None:
    """Wait (≤ 1 s) until the clock's second is past every event file's in ``run_dir``.

    Event files are named ``events.out.tfevents.<second>.<host>.<pid>.<counter>`` and read in
    name order; a resumed writer's purge only drops what files *before* it hold. A resume in the
    same process and second as the interrupted run (a notebook, the tests) would otherwise be
    ordered by the counter as text ("10" before "9") and its purge could come first."""
    stamps = []
    for f in run_dir.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(f.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    if stamps:
        latest, deadline = max(stamps), time.time() + 1.5  # (a file from a skewed clock:
        while int(time.time()) <= latest and time.time() < deadline:  # do not wait for it)
            time.sleep(0.05)


def _select(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # a dataclass or plain object
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                return None
        return node


def _hparam_value(v: Any, override: Optional[str] = None) -> Any:
    """A value HParams can show: integers as right-aligned strings (HParams prints numbers with 5
    significant digits: "128.00"; padded strings read "128" and still sort as numbers), floats
    as numbers, config groups (a ``data=csv`` override) by the override's value."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return f"{v:>{INT_WIDTH}d}" if v >= 0 else str(v)
    if isinstance(v, float):
        return v
    if isinstance(v, str):
        return v
    if v is None:
        return override if override is not None else "None"
    if override is not None:
        return override
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    if isinstance(v, dict) and "_target_" in v:
        return str(v["_target_"]).rsplit(".", 1)[-1]
    return str(v)


def run_hparams(cfg: Any, metrics: Optional[dict] = None) -> dict[str, Any]:
    """The main hyper-parameters of a run (config key → value): width, β, α, gradient, seed and
    the horizon t actually reached (``metrics["t"]`` when given, else ``train.horizon``)."""
    out = {}
    for key, _, _ in MAIN_HPARAMS:
        v = _select(cfg, key)
        if key == "train.horizon":
            t = (metrics or {}).get("t")
            v = float(t) if isinstance(t, (int, float)) else (None if v is None else float(v))
            if v is None:
                continue
        out[key] = _hparam_value(v)
    return out


def parse_swept(swept: Optional[Iterable[str]]) -> dict[str, Optional[str]]:
    """``["model.width=32", "+x=1", "seed"]`` → ``{"model.width": "32", "x": "1", "seed": None}``
    (Hydra override strings or bare keys; hydra.* and train.resume dropped)."""
    out: dict[str, Optional[str]] = {}
    for item in swept or ():
        key, eq, value = str(item).partition("=")
        key = key.lstrip("+~").strip()
        if key and not key.startswith(_NOT_SWEPT):
            out[key] = value if eq else None
    return out


def _sweep_pattern(value: str) -> bool:
    """Does a Hydra override value sweep (``a,b``, ``range(...)``, ``choice(...)``, ...)?"""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        return OverridesParser.create().parse_overrides([f"k={value}"])[0].is_sweep_override()
    except Exception:
        return "," in value or bool(re.match(r"\s*(range|choice|glob|interval)\(", value))


def hydra_swept() -> tuple[Optional[list[str]], Optional[set[str]]]:
    """(this job's task overrides, the keys the sweep varies) from Hydra, when in a multirun job;
    (None, None) otherwise. The varying keys come from ``<sweep dir>/multirun.yaml`` (the sweep's
    own overrides, e.g. ``model.width=32,64``); None when it cannot be read."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        if str(hc.mode.name) != "MULTIRUN":
            return None, None
        task = list(hc.overrides.task)
    except Exception:
        return None, None
    return task, _varying_in(hc.sweep.dir)


def hparams_layout(cfg: Any, metrics: dict[str, Any], swept: Optional[Iterable[str]] = None,
                   varying: Optional[set[str]] = None) -> tuple[list, dict[str, Any], list]:
    """(HParamInfo list, name → value, MetricInfo list) of a run.

    The hparams are the keys a sweep varies, marked ``differs`` (``varying``; when None, every
    key of ``swept``, the sweep's overrides), then width, β, α, gradient, seed and horizon.
    TensorBoard lists ``differs`` first (then by name, the config key) and its HParams tab shows
    the first five hparams and the first five metrics by default. Constants (activation, data,
    dtype, an override every job shares, ...) are left out."""
    from tensorboard.plugins.hparams import api_pb2

    ov = parse_swept(swept)
    differs = set(ov) if varying is None else set(varying)
    values = run_hparams(cfg, metrics)
    names = {k: (n, d) for k, n, d in MAIN_HPARAMS}
    for key in sorted(differs):
        if key not in values:
            values[key] = _hparam_value(_select(cfg, key), ov.get(key))
    infos = []
    for key, v in values.items():
        name, desc = names.get(key, (key.rsplit(".", 1)[-1], f"{key} (overridden)"))
        typ = ("DATA_TYPE_BOOL" if isinstance(v, bool) else "DATA_TYPE_STRING"
               if isinstance(v, str) else "DATA_TYPE_FLOAT64")
        infos.append(api_pb2.HParamInfo(name=key, display_name=name, description=desc,
                                        type=api_pb2.DataType.Value(typ),
                                        differs=key in differs))
    infos.sort(key=lambda h: (not h.differs, h.name))  # as TensorBoard's backend orders them
    mets = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name,
                               description=f"last value of {tag}")
            for tag, name, key in HPARAMS_METRICS if key in metrics]
    return infos, values, mets


def _plugin_summary(tag: str, plugin_data: Any) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=plugin_data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=smd)])


def write_hparams(writer: SummaryWriter, cfg: Any, metrics: dict[str, Any],
                  swept: Optional[Sequence[str]] = None) -> None:
    """The run's HParams entry, in the writer's own directory (``SummaryWriter.add_hparams``
    would open a timestamped sub-run, which splits the run in the HParams dashboard).

    ``swept``: the overridden keys of a sweep (``key`` or Hydra's ``key=value`` task overrides);
    None: read from Hydra in a multirun job (``HydraConfig``), none in a single run. The metrics
    are the live tags (drift, distance to limit, kernel distance to limit, output error when
    logged, running MSE): HParams shows their last value. ``metrics`` (the run's final numbers)
    says which of them were logged and gives the horizon t reached.
    """
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    varying = None
    if swept is None:
        swept, varying = hydra_swept()
    else:  # the CLI's task overrides: Hydra's multirun.yaml says which of them vary
        _, varying = hydra_swept()
        if varying is not None and not set(parse_swept(swept)) >= varying:
            varying = None  # another sweep's file: trust ``swept``
    infos, values, mets = hparams_layout(cfg, metrics, swept, varying)
    now = time.time()
    exp = api_pb2.Experiment(time_created_secs=now, hparam_infos=infos, metric_infos=mets)
    ssi = plugin_data_pb2.SessionStartInfo(start_time_secs=now)
    for k, v in values.items():
        if isinstance(v, bool):
            ssi.hparams[k].bool_value = v
        elif isinstance(v, str):
            ssi.hparams[k].string_value = v
        else:
            ssi.hparams[k].number_value = float(v)
    sei = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"),
                                         end_time_secs=now)
    V = metadata.PLUGIN_DATA_VERSION
    for tag, data in ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(
            experiment=exp, version=V)),
            (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
                session_start_info=ssi, version=V)),
            (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
                session_end_info=sei, version=V))):
        add_summary(writer, _plugin_summary(tag, data))
    writer.flush()


def add_summary(writer: SummaryWriter, summary: Any) -> None:
    """Write a raw ``Summary`` proto into the writer's own event file. SummaryWriter has no
    public method for it (``add_hparams`` writes into a new timestamped sub-run); its public
    ``file_writer`` does it, and after ``close()`` (None) torch's own reopening is used: the one
    place this package touches a private member of torch."""
    fw = writer.file_writer
    if fw is None:
        fw = writer._get_file_writer()
    fw.add_summary(summary)


def _varying_in(sweep_dir: Any) -> Optional[set[str]]:
    """The keys the sweep in ``sweep_dir`` varies (its ``multirun.yaml``); None if unreadable."""
    try:
        import yaml

        sweep = yaml.safe_load((Path(str(sweep_dir)) / "multirun.yaml").read_text()) or {}
        items = sweep["hydra"]["overrides"]["task"]
        return {k for k, v in parse_swept(items).items() if v is not None and _sweep_pattern(v)}
    except Exception:
        return None


def trial_name(*args: Any) -> str:
    """A short job directory name (Hydra ``hydra.sweep.subdir``, through the OmegaConf resolver
    ``ntk_trial``): ``trial_name([sweep_dir,] override_dirname)``. Each key is cut to its last
    component and, when ``<sweep_dir>/multirun.yaml`` says which keys the sweep varies, only those
    are kept: with ``-m model.width=32,64 seed=0,1 train.horizon=1``,
    ``model.width=32,seed=0,train.horizon=1`` → ``width=32,seed=0``. In conf/config.yaml::

        subdir: ${hydra.job.num}_${ntk_trial:${hydra.sweep.dir},${hydra.job.override_dirname}}
    """
    *rest, override_dirname = args
    varying = _varying_in(rest[0]) if rest else None
    parts = []
    for item in str(override_dirname).split(","):
        key, eq, value = item.partition("=")
        key = key.lstrip("+~")
        if eq and varying is not None and key not in varying:
            continue
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}" if eq else item)
    return ",".join(parts) or "job"


def register_resolvers() -> None:
    """``${ntk_trial:...}`` → `trial_name`, ``${ntk_fresh:...}`` →
    `ntk_rnn.run.lock.fresh_dir` (idempotent; done when this module is imported,
    which ``python -m ntk_rnn.train`` does before Hydra composes its config)."""
    if not OmegaConf.has_resolver("ntk_trial"):
        OmegaConf.register_new_resolver("ntk_trial", trial_name)
    if not OmegaConf.has_resolver("ntk_fresh"):  # a default run directory of its own
        from .run.lock import fresh_dir

        OmegaConf.register_new_resolver("ntk_fresh", fresh_dir)


register_resolvers()


# --- custom scalars ---------------------------------------------------------------------------
def _one(tag: str) -> list:
    return ["Multiline", [f"^{re.escape(tag)}$"]]


def custom_scalar_layout(top_k: int = 0, ntk: bool = True, output: bool = False,
                         blocks: Sequence[str] = ("c", "w", "b")) -> dict:
    """TensorBoard custom-scalars layout: one quantity per chart (a chart's lines are the runs,
    one colour each), titled by what it plots."""
    layout: dict[str, dict] = {}

    def charts(*tags: str) -> dict:
        return {T.TITLES[t]: _one(t) for t in tags}

    if ntk:
        layout["NTK"] = charts(T.NTK_DRIFT, T.NTK_DISTANCE_TO_LIMIT,
                               T.NTK_LOG10_KERNEL_DISTANCE_TO_LIMIT, T.NTK_LOG10_KERNEL_DISTANCE,
                               T.NTK_VELOCITY, T.NTK_TARGET_ALIGNMENT, T.NTK_EFFECTIVE_RANK)
        layout["NTK spectrum (log10 eigenvalues)"] = {
            f"log10 λ{i + 1}": _one(T.ntk_spectrum_tag(f"eig_{i + 1}")) for i in range(top_k)}
        layout["NTK per-block drift"] = {
            f"drift of the {b} block": _one(T.ntk_block_tag(f"drift_{b}")) for b in blocks}
    if output:
        layout["Output vs limit"] = charts(T.OUTPUT_RMSE_TO_LIMIT, T.OUTPUT_LIMIT_ERROR,
                                           T.OUTPUT_LIMIT_RMS, T.OUTPUT_NETWORK_RMS)
    layout["Training"] = charts(T.TRAIN_RUNNING_MSE, T.TRAIN_LOSS)
    if ntk:
        layout["Parameter displacement"] = {
            f"‖θ_t − θ_0‖/‖θ_0‖ of {b}": _one(T.displacement_tag(b)) for b in blocks}
    return layout


def _callback(callbacks: Any, callback: tuple[str, str]) -> Any:
    """The run's callback (`ntk_rnn.tags.NTK_CALLBACK`, ...: config name, class name), or None."""
    name, target = callback
    for cb in callbacks or ():
        if getattr(cb, "name", None) == name or any(c.__name__ == target
                                                    for c in type(cb).__mro__):
            return cb
    return None


def write_layout(state: Any, top_k: int = 0) -> None:
    """The run's custom-scalars layout, written once per run by the first callback that calls it
    (TensorBoard reads one layout per run): NTK charts when the run has the NTK callback,
    output charts when it has the output callback (``state.callbacks``)."""
    w = getattr(state, "writer", None)
    if w is None or getattr(state, "_ntk_rnn_layout_written", False):
        return
    cbs = getattr(state, "callbacks", ())
    ntk = _callback(cbs, T.NTK_CALLBACK)
    if ntk is not None and not top_k:
        top_k = int(getattr(ntk, "top_k", 5) or 5)
    layout = custom_scalar_layout(top_k, ntk=ntk is not None,
                                  output=_callback(cbs, T.OUTPUT_CALLBACK) is not None)
    w.add_custom_scalars(layout)
    try:
        state._ntk_rnn_layout_written = True
    except AttributeError:
        pass
