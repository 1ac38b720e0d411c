"""The command line: ``python -m ntk_rnn.train`` (or ``ntk-rnn-train``), a thin layer over
:class:`ntk_rnn.run.Trainer` configured by Hydra.

    python -m ntk_rnn.train model.width=1024 model.beta=0.6 train.horizon=2 seed=3
    python -m ntk_rnn.train -m model.width=256,1024 model.beta=0.6,0.9 seed=0,1
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .callbacks.ntk import summary_line as ntk_summary_line
from .checkpoint import atomic_write_text
from .errors import ConfigError, TrainingDiverged
from .run.config import register_configs
from .run.lock import LOCK_NAME, RunDirLocked, RunLock
from .run.signals import TrainingInterrupted
from .run.trainer import Trainer
from .tags import RUNNING_MSE


def conf_dir() -> Path:
    """The built-in config tree: ``ntk_rnn/conf`` in an installed wheel, the repository's
    top-level ``conf/`` in a checkout (users add their own with ``--config-dir`` or
    ``hydra.searchpath``)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise RuntimeError(f"ntk_rnn: the config tree is missing (looked in {here / 'conf'} and "
                       f"{here.parent / 'conf'}); reinstall the package")


register_configs()
CONF_DIR = str(conf_dir())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _job(cfg: DictConfig) -> Optional[float]:
    """One run (a single run, or one job of a sweep). Nothing is written into the run directory
    before the whole run is built, checked and its directory locked; a refused run writes
    nothing into a directory that already holds a run (its own record stays as it was)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    task_yaml = _task_yaml(cfg)
    trainer: Optional[Trainer] = None
    try:
        try:
            trainer = Trainer.from_config(cfg, run_dir)
        except OmegaConfBaseException as exc:  # an interpolation that cannot resolve, ...
            raise ConfigError(omegaconf_message(exc)) from None
        trainer.lock()  # one writer per run directory (RunDirLocked names the holder)
        try:
            write_hydra_records(run_dir, hc, task_yaml)
            result = trainer.fit()
        finally:
            trainer.unlock()
    except TrainingInterrupted as exc:  # the Trainer wrote the checkpoint and metrics.json
        print(f"ntk_rnn: interrupted: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)  # SystemExit: a signalled sweep stops too
    except (ConfigError, TrainingDiverged) as exc:
        if isinstance(exc, RunDirLocked):
            kind = "refused"
        elif isinstance(exc, ConfigError):
            kind = "config error"
            if trainer is None or trainer.status == "pending":  # refused before it began
                record_failure(run_dir, hc, task_yaml, str(exc))
        else:
            kind = "diverged"
        print(f"ntk_rnn: {kind}: {exc}", file=sys.stderr)
        if multirun:  # the launcher records the failure; the other jobs go on
            raise
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except OSError as exc:  # disk full, read-only, permission: the file and what is intact
        print(f"ntk_rnn: {write_error_message(exc, run_dir)}", file=sys.stderr)
        if multirun:
            raise
        sys.exit(1)
    except Exception as exc:  # a bug or the user's own code: keep the traceback
        if trainer is None or trainer.status == "pending":
            record_failure(run_dir, hc, task_yaml, f"{type(exc).__name__}: {exc}")
        raise
    if not multirun:
        print(run_summary(trainer, result), file=sys.stderr)
    return result.get(RUNNING_MSE)


def main() -> None:
    """``ntk-rnn-train`` / ``python -m ntk_rnn.train``: the Hydra app, with the current
    directory importable (a ``_target_`` in your own module), its own ``--help`` page, and
    Hydra's override and composition errors as one ``ntk_rnn: config error: ...`` line (exit 2).
    ``HYDRA_FULL_ERROR=1`` keeps Hydra's own reports."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # what `python -m` does
        sys.path.insert(0, cwd)
    args = sys.argv[1:]
    if any(a in ("--help", "-h") for a in args):
        print(help_page())
        return
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        _job()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we report in one line below
    threading.excepthook = _quiet_writer_threads
    try:
        _job()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else keeps its traceback
        line, code = hydra_error(exc, args)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(code)


def _quiet_writer_threads(args: Any) -> None:
    """An OSError in TensorBoard's writer thread (disk full) is raised again in the run's own
    thread at its next write, where it becomes one line: no second traceback from the thread."""
    if issubclass(args.exc_type, OSError) and "tensorboard" in repr(args.thread).lower() + \
            type(args.thread).__module__:
        return
    threading.__excepthook__(args)


def hydra_error(exc: BaseException, args: list[str]) -> tuple[Optional[str], int]:
    """(one line, exit code) for an error Hydra raised around the jobs: a bad override or config
    group (exit 2), a sweep whose jobs failed (exit 1); (None, 0) for anything else (a user's own
    code: its traceback is kept)."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    if isinstance(exc, MissingConfigException):
        group = str(getattr(exc, "missing_cfg_file", "") or "")
        options = list(getattr(exc, "options", None) or [])
        if "/" in group and options:
            g, name = group.rsplit("/", 1)
            return (f"ntk_rnn: config error: {g}={name} is not a preset; choose one of "
                    f"{', '.join(options)}", 2)
        return f"ntk_rnn: config error: {_first_line(exc)}", 2
    multirun = any(a in ("-m", "--multirun") for a in args)
    if isinstance(exc, OSError) and not multirun:  # e.g. Hydra cannot create the run directory
        return f"ntk_rnn: cannot write {exc.filename or ''}: {exc.strerror or exc}".replace(
            "write :", "write:"), 1
    if isinstance(exc, (ConfigError, TrainingDiverged, OSError)):  # a failed job of a sweep
        return (f"ntk_rnn: the sweep finished with a failed job (the others ran; "
                f"`python -m ntk_rnn.sweep <sweep dir>` lists them): {_first_line(exc)}", 1)
    if isinstance(exc, OverrideParseException):
        return f"ntk_rnn: config error: cannot parse the override: {_first_line(exc)}", 2
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        m = re.search(r"(?:Could not (?:override|append to|delete from config)|Error merging "
                      r"override)\W+'?([\w.]+)'?", str(exc))
        key = m.group(1) if m else None
        given = next((a for a in args if key and a.lstrip("+~").split("=", 1)[0] == key), key)
        from omegaconf.errors import ConfigAttributeError, ConfigKeyError

        if key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or (
                key and "not in struct" in str(cause)):
            near = nearest_key(key, args)
            hint = f"; did you mean {near}?" if near else \
                "; `ntk-rnn-train --cfg job` lists every key"
            return f"ntk_rnn: config error: unknown key {given}{hint}", 2
        what = _first_line(cause) if cause is not None else _first_line(exc)
        return f"ntk_rnn: config error: {given + ': ' if given else ''}{what}", 2
    from omegaconf.errors import OmegaConfBaseException as _OCE

    if isinstance(exc, _OCE):
        return f"ntk_rnn: config error: {omegaconf_message(exc)}", 2
    return None, 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def omegaconf_message(exc: BaseException) -> str:
    """An omegaconf error as one line naming the key (``full_key``) where it knows it."""
    key = getattr(exc, "full_key", None)
    msg = _first_line(exc)
    return f"{key}: {msg}" if key else msg


def nearest_key(key: str, args: list[str]) -> Optional[str]:
    """The known config key closest to ``key`` (the config composed with the presets chosen in
    ``args``), or None."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = [a for a in args if "=" in a and "." not in a.split("=", 1)[0]
              and not a.startswith(("-", "+", "~")) and "," not in a]
    keys: list[str] = []
    for overrides in (groups, []):
        try:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            keys = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
            break
        except Exception:  # noqa: BLE001 - a bad group: try without
            continue
    keys = [k for k in keys if not k.startswith("hydra")]
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not near:  # compare the last part within the same node (model.widht -> model.width)
        head, _, leaf = key.rpartition(".")
        same = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == head]
        cand = difflib.get_close_matches(leaf, same, n=1, cutoff=0.5)
        near = [f"{head}.{cand[0]}" if head else cand[0]] if cand else []
    return near[0] if near else None


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(f"{prefix}{k}")
            out += _dotted_keys(v, f"{prefix}{k}.")
    return out


def _task_yaml(cfg: DictConfig) -> str:
    try:
        return OmegaConf.to_yaml(cfg)
    except Exception:  # noqa: BLE001
        return ""


def write_hydra_records(run_dir: Path, hc: Any, task_yaml: str) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` (what Hydra itself writes,
    ``hydra.output_subdir: null`` in conf/config.yaml), written atomically and only once the run
    is built and its directory locked."""
    folder = run_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", task_yaml)
    try:
        atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
    except OmegaConfBaseException:
        pass
    import yaml

    atomic_write_text(folder / "overrides.yaml", yaml.safe_dump(
        [str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)],
        default_flow_style=False))


def record_failure(run_dir: Path, hc: Any, task_yaml: str, error: str) -> None:
    """A refused job's record (``.hydra/`` and ``metrics.json`` with ``status: failed``, which
    ``python -m ntk_rnn.sweep`` reports), written only into a new, empty run directory that no
    other process holds: an existing run's files are never touched by a later command."""
    lock = RunLock(run_dir)
    try:
        if any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            return  # a directory that holds a run (or another run's start): write nothing
        lock.acquire()
        if any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            return
        write_hydra_records(run_dir, hc, task_yaml)
        atomic_write_text(run_dir / "metrics.json", json.dumps(
            {"status": "failed", "error": error}, indent=2))
    except (OSError, ConfigError, OmegaConfBaseException) as exc:
        print(f"ntk_rnn: warning: no failure record in {run_dir} ({exc})", file=sys.stderr)
    finally:
        lock.release()


def write_error_message(exc: OSError, run_dir: Path) -> str:
    """One line for an OSError while a run writes: the file, why, the last intact checkpoint."""
    name = exc.filename
    if name is None:  # a write of TensorBoard's event file (its thread does not name it)
        events = sorted(Path(run_dir).glob("events.out.tfevents.*"),
                        key=lambda p: p.stat().st_mtime)
        name = str(events[-1]) if events else "a file in the run directory"
    why = exc.strerror or str(exc)
    ckpts = sorted(Path(run_dir).glob("checkpoints/step_*.pt")) + sorted(
        Path(run_dir).glob("member_*/checkpoints/step_*.pt"))
    ckpts = [p for p in ckpts if p.is_file()]
    last = (f"the last intact checkpoint is {ckpts[-1]} (continue with train.resume=true "
            f"hydra.run.dir={run_dir} once there is room)" if ckpts
            else "no checkpoint was written yet")
    return f"cannot write {name}: {why}; {last}"


def run_summary(trainer: Trainer, result: dict) -> str:
    """The few lines a run ends with: where it went, what it found, how to look at it."""
    m = result if trainer.E == 1 else trainer.members[0].metrics
    lines = [f"ntk_rnn: run complete -> {trainer.run_dir}"]
    if trainer.E > 1:
        lines.append(f"  ensemble: {trainer.E} members (member_000..), "
                     f"{result.get('counts')}; mean running MSE {_fmt(result.get(RUNNING_MSE))}")
    lines.append(f"  steps {m.get('steps')}  t = {_fmt(m.get('t'))}  running MSE "
                 f"{_fmt(m.get(RUNNING_MSE))}  ({m.get('gradient', trainer.gradient)} gradient,"
                 f" {m.get('backend', trainer.backend)} backend, {_fmt(m.get('wall_s'))} s"
                 + (f", of which the limit {_fmt(m['limit_s'])} s" if m.get("limit_s") else "")
                 + ")")
    if "target_column" in m:  # a file source: what was learned from what
        lines.append(f"  data: inputs {', '.join(map(str, m.get('input_columns', [])))} -> "
                     f"target {m['target_column']}")
    ntk = ntk_summary_line(m)
    if ntk:
        lines.append(ntk)
    lines.append(f"  look at it: tensorboard --logdir {trainer.run_dir}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class SweepSummary(Callback):
    """Hydra callback: a multirun ends with the command that summarises it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        print(f"ntk_rnn: sweep complete -> {sweep_dir}\n  summary: python -m ntk_rnn.sweep "
              f"{sweep_dir}\n  look at it: tensorboard --logdir {sweep_dir}", file=sys.stderr)


# --- --help -------------------------------------------------------------------------------------
# the keys the help page explains, in this order; each one-line explanation is read from where
# the docs read it (the comments of TrainConfig in ntk_rnn/run/config.py and of the preset files
# in conf/), so the two cannot disagree
HELP_KEYS = (
    ("model/diagonal.yaml", "model.", ("width", "beta", "activation")),
    ("train", "train.", ("alpha", "horizon", "steps", "gradient", "mse_window", "resume",
                         "ensemble_size")),
    ("config.yaml", "", ("seed", "device", "dtype")),
    ("data/csv.yaml", "data.", ("path", "columns", "target_column", "missing")),
    ("callbacks/ntk.yaml", "callbacks.ntk.", ("every_n_steps", "n_probes")),
    ("callbacks/checkpoint.yaml", "callbacks.checkpoint.", ("every_n_steps",)),
)


def _comments(lines: list[str]) -> dict[str, str]:
    """``key: value  # comment`` (YAML, or a dataclass field) -> {key: comment}; a field without
    a trailing comment takes the comment lines just above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"([A-Za-z_]\w*)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m:
            out.setdefault(m.group(1), (m.group(2) or " ".join(above)).strip())
        above = []
    return out


def _docstring_entries(doc: str) -> dict[str, str]:
    """``name : type`` + indented text (numpydoc) or ``name (type): text`` / ``name: text``
    (Google) entries of a docstring -> {name: first sentence}."""
    import inspect

    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if not m:
            continue
        text = m.group(2).strip()
        numpy = i + 1 < len(lines) and lines[i + 1].startswith((" ", "\t")) and \
            not line.startswith((" ", "\t"))
        if numpy:  # "alpha : float" then the description, indented
            text = lines[i + 1].strip()
        if text:
            out.setdefault(m.group(1), text.split(". ")[0].rstrip("."))
    return out


def key_docs() -> list[tuple[str, str]]:
    """(key, one-line explanation) of the main keys (HELP_KEYS)."""
    import inspect

    from .run.config import TrainConfig

    rows = []
    for source, prefix, keys in HELP_KEYS:
        if source == "train":
            lines = inspect.getsource(TrainConfig).splitlines()
        else:
            try:
                lines = (Path(CONF_DIR) / source).read_text().splitlines()
            except OSError:
                lines = []
        docs = _comments(lines)
        if source == "train":  # a docstring's Attributes/Parameters entry wins where there is one
            docs.update({k: v for k, v in _docstring_entries(TrainConfig.__doc__ or "").items()
                         if v})
        for k in keys:
            rows.append((prefix + k, docs.get(k, "")))
    return rows


def _short(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters at a clause boundary."""
    if len(text) <= n:
        return text
    cut = max(text.rfind(sep, 0, n - 1) for sep in ("; ", " (", ", ", " | "))
    return (text[:cut] if cut > n // 3 else text[:n - 1].rsplit(" ", 1)[0]) + " …"


def help_page() -> str:
    rows = key_docs()
    width = max(len(k) for k, _ in rows)
    keys = "\n".join(f"  {k:<{width}}  {_short(d, 96 - width)}".rstrip() for k, d in rows)
    return f"""ntk-rnn-train: train recurrent networks online along one long sequence and log
how far their neural tangent kernel is from its infinite-width limit (TensorBoard,
metrics.json, checkpoints). Each run writes into its own directory (outputs/<date>/<time>; a sweep,
-m, into multirun/<date>/<time>/<job>).

usage: ntk-rnn-train [key=value ...]            one run
       ntk-rnn-train -m key=a,b [key=value ...]  a sweep (one job per combination)

presets: model=diagonal|feedback|elman|gru|custom  data=var1|markov|tar|csv|seattle_temps|custom
         train=online|rtrl|one_step  callbacks=default|none|[default,linearized]

main keys:
{keys}

examples:
  ntk-rnn-train model.width=1024 model.beta=0.6 train.horizon=2 seed=3
  ntk-rnn-train data=csv data.path=$PWD/series.csv data.target_column=y
  ntk-rnn-train train.resume=true hydra.run.dir=outputs/2025-01-01/12-00-00
  ntk-rnn-train -m model.width=256,1024 seed=0,1

every key with its value:  ntk-rnn-train --cfg job   (add presets/overrides to see theirs)
Hydra's own options:       ntk-rnn-train --hydra-help
docs: README.md and docs/ (guide: docs/guide/, every key: ntk_rnn/run/config.py and conf/), or
      `make docs` in a checkout. Configs are trusted code: see "Reliability" in the README."""


if __name__ == "__main__":
    main()
