"""Config schemas (registered in Hydra's ConfigStore) and range validation with clear errors.

Each key exists once, here, with its allowed range; errors name the key as it is typed on the
command line (``model.beta=1.5 is outside [0.5, 1]``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from ..errors import ConfigError, renamed_value
from ..models.activations import ACTIVATIONS
from ..models.recurrence import ONLINE_GRADIENTS, RENAMED_GRADIENTS


# (the docstring's entries are `name (type): ...`: the --help page reads this class's source for
# `name: value  # comment` lines, which only the fields below are)
@dataclass
class TrainConfig:
    """The `train.*` settings: on the command line `train.alpha=2`, from Python a keyword of
    `Trainer` (`Trainer(..., alpha=2)`); the defaults below apply to both.

    Attributes:
        alpha (float): α > 0: the learning rate is α_N = α N^{2β−2} (theory §3).
        horizon (float): The limit time t = k / N to train to: round(horizon · N) steps.
        steps (int): A number of steps instead of `horizon` (None: from `horizon`).
        gradient (str): How ∂Ŷ_k/∂θ is computed: `auto` (RTRL for `MeanFieldRNN`, `bptt`
            for any other model), `rtrl` (exact real-time recurrent learning, Models D and F),
            `one_step` (the gradient of the last step, the memory treated as an input, Models D
            and F; formerly `truncated`, still accepted with a warning), `bptt` (truncated
            backpropagation through the last `bptt_window` elements, any model).
        bptt_window (int): Elements of the stream a `bptt` gradient goes back through.
        chunk_size (int): Elements of the stream read and trained on at once; the
            NaN/divergence check runs once per chunk.
        log_every (int): Steps between `train/*` scalars (0: about 200 points per run).
        mse_window (int): Steps in the running MSE `train/running_mse` (0: N, one unit of t).
        divergence_threshold (float): |Y − Ŷ| above this stops the run as diverged.
        backend (str): How steps run, all exact: `auto` (the compiled CPU kernel, else eager
            torch; CUDA graphs on a GPU), `kernel`, `eager`, `graphs`, or `reference` (one
            `rtrl_step` per element).
        resume (bool | str): Continue from the newest good checkpoint in the run directory:
            `true` (one must exist), `false`, or `auto` (if one exists, else start fresh).
        ensemble_size (int): E >= 1 networks trained together as one batched computation;
            member e is the single run with seed + e, written to `<run_dir>/member_{e:03d}/`.
        shared_stream (bool): Ensembles: every member reads the data stream of the run's seed
            (`data_seed`) instead of its own.
    """

    alpha: float = 4.0  # α > 0; the step size is α N^{2β-2}
    horizon: Optional[float] = 4.0  # limit time t; steps = round(horizon * N)
    steps: Optional[int] = None  # overrides horizon when set
    # auto (MeanFieldRNN: rtrl; any other model: bptt) | rtrl (exact RTRL, Models D and F) |
    # one_step (memory treated as an input, D and F; old spelling truncated) | bptt
    # (backpropagation through the last bptt_window elements of the stream, any model)
    gradient: str = "auto"
    bptt_window: int = 32  # elements of the stream a bptt gradient goes back through
    chunk_size: int = 256  # stream chunk; the NaN/divergence check runs once per chunk
    log_every: int = 0  # 0 = about 200 points per run
    mse_window: int = 0  # running-MSE window in steps; 0 = N
    divergence_threshold: float = 1e6  # |Y - Ŷ| above this stops the run
    # how steps run (all exact, equal to round-off): auto (compiled CPU kernel, else eager torch
    # ops; CUDA graphs on GPU) | kernel | eager | graphs | reference (one rtrl_step per element)
    backend: str = "auto"
    # continue from the newest good checkpoint in the run directory: true (required), false, or
    # auto (resume when one exists, else start fresh); with Hydra: hydra.run.dir=<old run dir>
    resume: Any = False
    # E >= 1 networks trained together as one batched computation; member e is the single run
    # with seed + e, logged in <run_dir>/member_{e:03d}/ (README, "Ensembles")
    ensemble_size: int = 1
    # ensembles: every member reads the data stream of run seed `seed` (data_seed), instead of
    # its own
    shared_stream: bool = False


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    flush_secs: int = 10


@dataclass
class Config:
    # the network, built from its _target_ (conf/model/*.yaml: MeanFieldRNN for Models D and F);
    # its defaults are the class's signature, the presets only override them
    model: Any = MISSING
    data: Any = MISSING  # a SequenceSource built from its _target_
    train: TrainConfig = field(default_factory=TrainConfig)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    # the data stream's seed, when it should not come from `seed` (null: from `seed`); the
    # stream is the one of the run with seed = data_seed (an ensemble's shared stream)
    data_seed: Optional[int] = None
    device: str = "cpu"
    dtype: str = "float32"


def opt(node: Any, key: str, default: Any = None) -> Any:
    """``node.key`` of a DictConfig, dict or dataclass config, or ``default`` when absent (keys
    added after a run's config was saved, e.g. ``train.ensemble_size``)."""
    return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


_DTYPES = ("float32", "float64")
TRAIN_GRADIENTS = ("auto", *ONLINE_GRADIENTS, "bptt")  # train.gradient
TRAIN_BACKENDS = ("auto", "kernel", "eager", "graphs", "reference")
MAX_STEPS = 10**9  # steps of one run (the running-MSE ring holds train.mse_window of them)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_known_keys(cfg: Any) -> None:
    """Keys the schema does not have (``+foo=1``, ``+train.alfa=1``, a typo in a config file):
    a ConfigError naming the key and the nearest known one. ``model.*``, ``data.*`` and
    ``callbacks.*`` are checked against the classes they build."""
    import dataclasses
    import difflib

    if not isinstance(cfg, DictConfig):
        return
    for node, schema, prefix in ((cfg, Config, ""), (cfg.get("train"), TrainConfig, "train."),
                                 (cfg.get("logger"), LoggerConfig, "logger.")):
        if not isinstance(node, DictConfig):
            continue
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in known and not (prefix == "" and key == "hydra"):
                near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
                hint = f"; did you mean {prefix}{near[0]}?" if near else \
                    f"; the {prefix.rstrip('.') or 'top-level'} keys are {known}"
                raise ConfigError(f"unknown key {prefix}{key}{hint}")


def resolve_renamed(cfg: Any, warn: bool = True) -> None:
    """Deprecated spellings of config values replaced, in place, by their names, each with one
    FutureWarning naming the key (``warn=False``: silently, for a saved run's config):
    ``train.gradient=truncated`` → ``one_step``, ``callbacks.<name>.limit_method=mc`` → ``iid``.
    Runs before any check that refuses an unknown value. ``cfg``: a DictConfig, Config or dict."""
    def renamed(node: Any, key: str, table: dict, name: str) -> None:
        value = opt(node, key)
        new = renamed_value(value, table, name, warn)
        if new is not value:
            if hasattr(node, "__setitem__"):
                node[key] = new
            else:
                setattr(node, key, new)

    t = opt(cfg, "train")
    if t is not None:
        renamed(t, "gradient", RENAMED_GRADIENTS, "train.gradient")
    for name, node in (opt(cfg, "callbacks") or {}).items():
        if hasattr(node, "get") and node.get("limit_method") is not None:
            from ..limit.kernel import RENAMED_METHODS

            renamed(node, "limit_method", RENAMED_METHODS, f"callbacks.{name}.limit_method")


def validate(cfg: DictConfig | Config) -> None:
    """Range checks that types alone cannot express. Raises ConfigError naming the key."""
    resolve_renamed(cfg)
    check_known_keys(cfg)
    m, t = cfg.model, cfg.train
    _require(m is not None and "_target_" in m,
             "model has no _target_; use a preset (model=diagonal|feedback) or "
             "model._target_=my_module.MyRNN")
    if "width" in m:
        _require(isinstance(m.width, int) and int(m.width) >= 1,
                 f"model.width={m.width} must be an integer >= 1")
    if "beta" in m:
        _require(_finite(m.beta) and 0.5 <= float(m.beta) <= 1.0,
                 f"model.beta={m.beta} is outside [0.5, 1] (0.5 = NTK scaling, 1 = mean-field)")
    if "activation" in m:
        _require(m.activation in ACTIVATIONS,
                 f"model.activation={m.activation!r} is not supported; choose one of "
                 f"{sorted(ACTIVATIONS)}")
    _require(_finite(t.alpha) and float(t.alpha) > 0,
             f"train.alpha={t.alpha} must be a finite number > 0")
    _require(t.gradient in TRAIN_GRADIENTS,
             f"train.gradient={t.gradient!r}: choose one of {list(TRAIN_GRADIENTS)}")
    _require(isinstance(opt(t, "bptt_window", 32), int) and int(opt(t, "bptt_window", 32)) >= 1,
             f"train.bptt_window={opt(t, 'bptt_window')} must be an integer >= 1")
    _require(t.get("backend", "auto") in TRAIN_BACKENDS,
             f"train.backend={t.get('backend')!r}: choose one of {list(TRAIN_BACKENDS)}")
    if t.steps is None:
        _require(t.horizon is not None and _finite(t.horizon) and float(t.horizon) > 0,
                 f"train.horizon={t.horizon} must be a finite number > 0 (or set train.steps)")
    else:
        _require(int(t.steps) >= 1, f"train.steps={t.steps} must be >= 1")
    _require(int(t.chunk_size) >= 1, f"train.chunk_size={t.chunk_size} must be >= 1")
    _require(int(t.log_every) >= 0, f"train.log_every={t.log_every} must be >= 0")
    _require(int(t.mse_window) >= 0, f"train.mse_window={t.mse_window} must be >= 0")
    _require(float(t.divergence_threshold) > 0,
             f"train.divergence_threshold={t.divergence_threshold} must be > 0")
    resume = opt(t, "resume", False)
    _require(isinstance(resume, bool) or resume == "auto",
             f"train.resume={resume!r}: choose true, false or auto")
    init = m.get("init") or {}
    for key in ("c_scale", "w_scale", "rho"):
        value = opt(init, key, 1.0)
        _require(_finite(value) and float(value) >= 0,
                 f"model.init.{key}={value} must be a finite number >= 0")
    _require(cfg.dtype in _DTYPES, f"dtype={cfg.dtype!r}: choose one of {list(_DTYPES)}")
    _require(int(cfg.seed) >= 0, f"seed={cfg.seed} must be >= 0")
    data_seed = opt(cfg, "data_seed")
    _require(data_seed is None or int(data_seed) >= 0,
             f"data_seed={data_seed} must be >= 0 (or null: the stream of `seed`)")
    size = opt(t, "ensemble_size", 1)
    _require(isinstance(size, int) and not isinstance(size, bool) and size >= 1,
             f"train.ensemble_size={size} must be an integer >= 1 (the number of networks "
             "trained together; 1 = a single run)")
    dev = str(cfg.device)
    _require(dev == "cpu" or dev.startswith("cuda"),
             f"device={dev!r}: choose 'cpu' or 'cuda' (or 'cuda:K')")
    if dev.startswith("cuda"):
        import torch

        _require(torch.cuda.is_available(),
                 f"device={dev!r} but CUDA is not available on this machine; use device=cpu")


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def check_callback_args(name: str, node: Any, cls: Any) -> None:
    """``callbacks.<name>`` settings against ``cls.__init__``: unknown keys, and values whose type
    does not match the default (int, float, bool, str), fail with a ConfigError naming the key.
    Range checks stay in each callback's ``setup``."""
    params = inspect.signature(cls).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in node:
        if key in ("_target_", "_partial_", "_recursive_", "_convert_", "_args_"):
            continue
        field = f"callbacks.{name}.{key}"
        value = node[key]
        if key not in params:
            if takes_kwargs:
                continue
            raise ConfigError(f"{field}: {cls.__name__} has no setting {key!r}; it takes "
                              f"{[k for k in params if k != 'self']}")
        default = params[key].default
        if default is inspect.Parameter.empty or default is None:
            continue
        if value is None:
            raise ConfigError(f"{field}=null: give a value (default {default!r})")
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not math.isnan(value)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{field}={value!r} must be {want}")


def num_steps(cfg: DictConfig | Config, width: Optional[int] = None) -> int:
    """Training steps: train.steps if set, else round(train.horizon · N) (time t = k / N); N is
    ``width`` (the built model's: the trainer computes it once, after building) or
    ``model.width`` of the config. More than MAX_STEPS is a ConfigError."""
    if cfg.train.steps is not None:
        steps = int(cfg.train.steps)
    else:
        N = int(width if width is not None else cfg.model.width)
        steps = max(1, round(float(cfg.train.horizon) * N))
    _require(steps <= MAX_STEPS, f"train.steps={steps} (train.horizon · model.width) is above "
             f"the limit {MAX_STEPS:.0e}; train in several runs or lower train.horizon")
    return steps
