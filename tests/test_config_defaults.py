"""Defaults live in one place: the class signature or the dataclass schema. A YAML preset that
lists a setting must give the code's default, unless it is one of the preset's declared
overrides below; and every preset composes and instantiates."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class

from ntk_rnn.models.init import InitLaw
from ntk_rnn.run.config import LoggerConfig, TrainConfig

CONF = Path(__file__).resolve().parent.parent / "conf"
# (file, dotted key): the settings a preset exists to change
OVERRIDES = {
    ("model/diagonal.yaml", "width"), ("model/feedback.yaml", "width"),
    ("model/feedback.yaml", "recurrence"), ("model/feedback.yaml", "init.b"),
    ("model/feedback.yaml", "init.rho"), ("train/truncated.yaml", "gradient"),
    ("train/one_step.yaml", "gradient"), ("train/rtrl.yaml", "gradient"),
    ("data/markov.yaml", "transition"),
    ("data/markov.yaml", "states"),
}


def _defaults_of(cls) -> dict:
    if dataclasses.is_dataclass(cls):
        return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def disagreements(rel: str, node: dict, defaults: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if k.startswith("_") or k not in defaults or (rel, key) in OVERRIDES:
            continue
        d = defaults[k]
        if k == "init" and isinstance(v, dict):
            out += disagreements(rel, v, _defaults_of(InitLaw), f"{key}.")
        elif d is not None and not isinstance(d, (dict, list)) and v != d:
            out.append(f"{rel}: {key}={v!r} but the code's default is {d!r}")
    return out


def presets() -> list[tuple[str, dict, dict]]:
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = str(path.relative_to(CONF))
        node = yaml.safe_load(path.read_text()) or {}
        if rel.startswith("train/"):
            out.append((rel, node, _defaults_of(TrainConfig)))
        elif rel.startswith("logger/"):
            out.append((rel, node, _defaults_of(LoggerConfig)))
        elif rel.startswith(("model/", "data/")) and node.get("_target_") not in (None, "???"):
            out.append((rel, node, _defaults_of(get_class(node["_target_"]))))
        elif rel.startswith("callbacks/"):
            for name, sub in node.items():
                if isinstance(sub, dict) and sub.get("_target_"):
                    out.append((f"{rel}:{name}", sub, _defaults_of(get_class(sub["_target_"]))))
    return out


@pytest.mark.parametrize("rel,node,defaults", presets(), ids=[p[0] for p in presets()])
def test_yaml_agrees_with_code_defaults(rel, node, defaults):
    assert not disagreements(rel.split(":")[0], node, defaults)


def test_checker_catches_a_disagreement():
    assert disagreements("x.yaml", {"every_n_steps": 50}, {"every_n_steps": 128})
    assert disagreements("m.yaml", {"init": {"rho": 0.7}}, {"init": None})
