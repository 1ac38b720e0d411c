"""Build a run's pieces from its config: seeds, the data source, the model, the callbacks.

Every pluggable object is built with ``hydra.utils.instantiate`` from its ``_target_``. A config
mistake raises :class:`~ntk_rnn.errors.ConfigError` naming the key; an exception raised by a
user's own class keeps its traceback, under a one-line note naming the key that built it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ..callbacks.base import Callback
from ..data.base import check_source
from ..errors import ConfigError
from ..models.init import generator_from_seed, reseed
from .config import check_callback_args, opt

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SEED_STREAMS = ("model", "data", "probe")


# --- seeds --------------------------------------------------------------------------------
def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for model init, data stream and probes from one run seed."""
    children = np.random.SeedSequence(int(seed)).spawn(len(SEED_STREAMS))
    return {k: int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for k, c in
            zip(SEED_STREAMS, children)}


def run_seeds(cfg: Any) -> dict[str, int]:
    """The run's seeds: all from ``seed``, except the data stream's from ``data_seed`` when set
    (the stream of run seed ``data_seed``: an ensemble's shared stream)."""
    seeds = derive_seeds(cfg.seed)
    data_seed = opt(cfg, "data_seed")
    if data_seed is not None:
        seeds["data"] = derive_seeds(data_seed)["data"]
    return seeds


def member_dir(e: int) -> str:
    return f"member_{e:03d}"


def member_config(cfg: Any, e: int) -> Any:
    """The config of ensemble member e: the single run with ``seed + e`` (and ``data_seed + e``
    when set); with ``train.shared_stream`` every member reads the stream of run seed ``seed``
    (or ``data_seed``), while its initial parameters and probes still come from seed + e."""
    c = copy.deepcopy(cfg)
    data_seed = opt(cfg, "data_seed")
    if bool(opt(cfg.train, "shared_stream", False)):
        data_seed = int(cfg.seed) if data_seed is None else int(data_seed)
    elif data_seed is not None:
        data_seed = int(data_seed) + e
    values = {"seed": int(cfg.seed) + e, "data_seed": data_seed}
    train = {"ensemble_size": 1, "shared_stream": False}
    with open_dict(c):
        for k, v in values.items():
            c[k] = v
        for k, v in train.items():
            c.train[k] = v
    return c


# --- building from _target_ ----------------------------------------------------------------
class UserCodeError(RuntimeError):
    """A user's own class raised while being built; ``__cause__`` keeps its traceback."""


# --- which _target_s may run (configs are code: README, "Reliability") ---------------------------
TRUSTED_ENV = "NTK_RNN_TRUSTED_TARGETS"


def _system_paths() -> list[str]:
    """Folders of the standard library and installed packages (site-packages)."""
    import site
    import sysconfig

    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - virtualenv's old site.py
        pass
    return [os.path.realpath(p) for p in paths if p]


def _user_module(name: str) -> bool:
    """Is module ``name`` the user's own: a source file outside the standard library and the
    installed packages (a module in the current directory or on PYTHONPATH)?"""
    top = name.split(".", 1)[0]
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None) if spec is not None else None
    locs = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    files = [origin] if origin and origin not in ("built-in", "frozen") else locs
    if not files:
        return False
    system = _system_paths()
    for f in files:
        real = os.path.realpath(f)
        if any(real == s or real.startswith(s + os.sep) for s in system):
            return False
    return True


def _trusted_prefixes() -> list[str]:
    return [p.strip() for p in os.environ.get(TRUSTED_ENV, "").split(",") if p.strip()]


def check_target(key: str, target: Any) -> Any:
    """The object ``_target_`` names, if the allow-list admits it, else a ConfigError: ntk_rnn's
    own classes, and classes or functions of the user's own modules (see ``_user_module``), or
    of a module named in ``$NTK_RNN_TRUSTED_TARGETS`` (comma-separated module prefixes). Nothing
    from the standard library or another installed package (``builtins.open``, ``io.open``,
    ``os.system``, ``subprocess.Popen``, ``torch.load``, ...): a config cannot run them."""
    if not isinstance(target, str):  # an object given from Python: the caller's own
        return target
    name = target.strip()
    module = name.rsplit(".", 1)[0] if "." in name else name
    own = name.startswith("ntk_rnn.")
    trusted = any(name == p or name.startswith(p.rstrip(".") + ".") for p in _trusted_prefixes())
    if not (own or trusted or _user_module(module)):
        raise ConfigError(
            f"{key}._target_={name!r} is not allowed: a config may build ntk_rnn's own classes and"
            f" classes or functions of your own modules (files in the current directory or on "
            f"PYTHONPATH), not of the standard library or installed packages; to allow a package"
            f" of yours, set {TRUSTED_ENV}={module.split('.', 1)[0]}")
    try:
        obj = _locate(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the config's
        text = str(exc).strip().splitlines()
        raise ConfigError(f"{key}._target_={name!r} cannot be imported "
                          f"({text[-1] if text else type(exc).__name__})") from None
    if own and not isinstance(obj, type):
        raise ConfigError(f"{key}._target_={name!r} is not a class (a config builds ntk_rnn's "
                          "classes)")
    if not callable(obj):
        raise ConfigError(f"{key}._target_={name!r} is not a class or function")
    return obj


def _locate(path: str) -> Any:
    from hydra._internal.utils import _locate as locate

    return locate(path)


def check_targets(key: str, node: Any) -> None:
    """Every ``_target_`` in ``node``, nested ones included, through :func:`check_target`."""
    if isinstance(node, (DictConfig, dict)):
        for k in node:
            v = node[k]
            if k == "_target_":
                check_target(key, v)
            else:
                check_targets(f"{key}.{k}", v)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, v in enumerate(node):
            check_targets(f"{key}[{i}]", v)


def _target_class(key: str, target: Any) -> Any:
    return check_target(key, target)


_HINTS = {"data": "; for a custom source start from the empty preset: data=custom "
                  "data._target_=...",
          "model": "; for your own module start from the empty preset: model=custom "
                   "model._target_=..."}


def _check_keys(key: str, node: Any, cls: Any, filled: tuple[str, ...] = ()) -> None:
    """Keys the class does not take: a ConfigError naming them (before anything is built)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    extra = [k for k in node if not str(k).startswith("_") and k not in params]
    if extra:
        raise ConfigError(f"{key}._target_={cls.__module__}.{cls.__qualname__} does not accept "
                          f"{extra}; it takes {[k for k in params if k not in filled]}"
                          f"{_HINTS.get(key, '')}")
    missing = [f for f in filled if f not in params]
    if missing:
        raise ConfigError(f"{key}._target_={cls.__module__}.{cls.__qualname__} must take "
                          f"{missing} (filled in by the trainer); it takes {list(params)}")


def build(key: str, node: Any, **filled: Any) -> Any:
    """``instantiate(node, **filled)``; a ConfigError raised inside keeps its message, any other
    exception from the user's class keeps its traceback under a line naming ``key``."""
    if not (isinstance(node, DictConfig) and "_target_" in node):
        raise ConfigError(f"{key} has no _target_ (the class to build)")
    check_targets(key, node)  # nested _target_s too: only what the allow-list admits runs
    cls = _target_class(key, node._target_)
    _check_keys(key, node, cls, tuple(filled))
    try:
        return instantiate(node, _convert_="all", **filled)
    except InstantiationException as exc:
        root = exc.__cause__ or exc  # hydra wraps the class's own exception
        if isinstance(root, ConfigError):
            raise root from None
        text = str(root).strip()
        raise UserCodeError(f"{key}: {node._target_} raised {type(root).__name__}: "
                            f"{text.splitlines()[0][:300] if text else ''}") from root


def build_source(data_cfg: Any) -> Any:
    """The data source: built from ``data._target_``, or a source object given directly."""
    source = data_cfg if _is_source(data_cfg) else build("data", data_cfg)
    return check_source(source)


def _is_source(obj: Any) -> bool:
    return hasattr(obj, "stream") and hasattr(obj, "windows")


def build_model(cfg: Any, input_dim: int, seed: int) -> torch.nn.Module:
    """``model._target_`` built with ``input_dim`` from the data source and θ_0 drawn from
    ``seed`` (MeanFieldRNN also takes the run's dtype and device)."""
    m = cfg.model
    cls = _target_class("model", m.get("_target_")) if "_target_" in m else None
    if cls is None:
        raise ConfigError("model has no _target_; use a preset (model=diagonal|feedback|elman|gru)"
                          " or model=custom model._target_=my_module.MyRNN")
    params = _signature(cls)
    filled: dict[str, Any] = {"input_dim": int(input_dim)}
    for k, v in (("generator", generator_from_seed(seed)), ("dtype", DTYPES[cfg.dtype]),
                 ("device", cfg.device)):
        if k in params:
            filled[k] = v
    if isinstance(m.get("init"), DictConfig) and m.init.get("sampler") is not None:
        from ..models.init import InitLaw  # a custom μ0: the sampler is built first, then passed

        check_targets("model.init.sampler", m.init.sampler)
        law = OmegaConf.to_container(m.init, resolve=True)
        law["sampler"] = instantiate(m.init.sampler)
        filled["init"] = InitLaw(**law)
    with torch.random.fork_rng(devices=[]):  # a model drawing θ_0 from torch's global RNG in
        torch.manual_seed(seed)              # its constructor is still determined by the seed
        model = build("model", m, **filled)
    check_model(model, input_dim)
    if "generator" not in params:
        seed_model(model, seed, cfg.dtype, cfg.device)
    return model


def _signature(cls: Any) -> dict:
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return {}


def seed_model(model: torch.nn.Module, seed: int, dtype: str, device: str) -> None:
    """θ_0 from the run's model seed: ``reset_parameters(generator)`` when the model has it."""
    reseed(model, seed)
    model.to(dtype=DTYPES[dtype], device=device)


def check_model(model: Any, input_dim: Optional[int] = None) -> None:
    """A model the trainer can train: an nn.Module with parameters, mapping (B, L, d) to (B, L).
    A module that took ``input_dim`` from the trainer but keeps it under another name (an
    ``nn.RNN``-style ``input_size``) gets ``model.input_dim`` set to it."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model._target_ built a {type(model).__name__}, not a torch.nn.Module")
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"model._target_={type(model).__qualname__} has no parameters to train")
    d = getattr(model, "input_dim", None)
    if d is None and input_dim is not None:
        model.input_dim = d = int(input_dim)
    if d is None:
        raise ConfigError(f"model._target_={type(model).__qualname__} must keep its input_dim "
                          "(self.input_dim = input_dim)")
    x = torch.zeros(2, 3, int(d), dtype=params[0].dtype, device=params[0].device)
    with torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, 3):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"model._target_={type(model).__qualname__}: forward maps windows "
                          f"(B, L, d) = (2, 3, {d}) to {shape}; it must return outputs (B, L)")


def build_callbacks(cfg: Any) -> list[Callback]:
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        key = f"callbacks.{name}"
        target = node.get("_target_") if hasattr(node, "get") else None
        if target is None:
            raise ConfigError(f"{key} has no _target_ (a Callback class to build)")
        check_callback_args(name, node, _target_class(key, target))
        cb = build(key, node)
        if not isinstance(cb, Callback):
            raise ConfigError(f"{key}: {type(cb).__name__} is not an ntk_rnn.callbacks.Callback")
        cb.name = name
        out.append(cb)
    return out


# --- describing Python objects as config (the Python API's config.yaml) ------------------------
def describe(obj: Any, fields: Callable[[Any], dict] | None = None) -> dict:
    """A config node for an object built in Python: its ``_target_`` and the constructor
    arguments it keeps as attributes of the same name (what config.yaml and HParams show)."""
    cls = type(obj)
    node: dict[str, Any] = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    recorded = getattr(obj, "init_args", None)
    if isinstance(recorded, dict):  # the arguments it was built with (data.base.RecordsArgs)
        for name, v in recorded.items():
            if name not in ("self", "generator", "dtype", "device", "input_dim", "seed"):
                node[name] = _plain_arg(v)
        if fields is not None:
            node.update(fields(obj))
        return node
    for name in _signature(cls):
        if name in ("self", "generator", "dtype", "device", "input_dim", "seed"):
            continue
        v = getattr(obj, name, None)
        if isinstance(v, (bool, int, float, str)) or v is None:
            node[name] = v
        elif dataclasses.is_dataclass(v):
            node[name] = {k: x for k, x in dataclasses.asdict(v).items()
                          if isinstance(x, (bool, int, float, str)) or x is None}
    if fields is not None:
        node.update(fields(obj))
    return node


def _plain_arg(v: Any) -> Any:
    """A recorded constructor argument as a config value: numbers, strings, None, lists and
    dicts as they are; tensors and arrays as (nested) lists; paths as strings."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict) or OmegaConf.is_config(v):
        items = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        return {str(k): _plain_arg(x) for k, x in items.items()}
    if isinstance(v, (list, tuple)) or OmegaConf.is_list(v):
        return [_plain_arg(x) for x in v]
    if dataclasses.is_dataclass(v):
        return {k: _plain_arg(x) for k, x in dataclasses.asdict(v).items()}
    return str(v)


def model_node(model: Any) -> dict:
    """``describe`` for models: the constructor arguments the model recorded (``init_args``: the
    package's models), else its attributes of the constructor's names; activation, recurrence and
    initial law included."""
    def extra(m: Any) -> dict:
        out: dict[str, Any] = {}
        act = getattr(m, "act", None)
        if act is not None and hasattr(act, "name"):
            out["activation"] = act.name
        law = getattr(m, "init_law", None)
        if dataclasses.is_dataclass(law):  # the law as built (a custom sampler as null)
            out["init"] = {k: (None if k == "sampler" else v)
                           for k, v in dataclasses.asdict(law).items()
                           if k == "sampler" or isinstance(v, (bool, int, float, str))}
        if hasattr(m, "width"):
            out["width"] = int(m.width)
        return out
    return describe(model, extra)
