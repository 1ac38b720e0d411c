"""The API reference's sources: every argument of the main public classes is documented in one
markup that mkdocstrings renders (Google style, Markdown: no reST roles), the reference shows
the documented public surface only, and the site needs no network (MathJax is served with it)."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

import ntk_rnn
from ntk_rnn import ElmanRNN, GRURNN, InitLaw, MeanFieldRNN, NTKCallback, Trainer
from ntk_rnn.run.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const):`")


def documented(doc: str, section: str) -> set[str]:
    """The names a Google-style ``section`` (Args, Attributes) of ``doc`` documents."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index(f"{section}:")
    except ValueError:
        return set()
    names = set()
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}(\*{0,2}\w+)(?: \([^)]*\))?:", line)
        if m:
            names.add(m.group(1).lstrip("*"))
    return names


@pytest.mark.parametrize("cls", [Trainer, NTKCallback, MeanFieldRNN, ElmanRNN, GRURNN],
                         ids=lambda c: c.__name__)
def test_every_constructor_argument_is_documented(cls):
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    missing = set(params) - documented(cls.__doc__, "Args")
    assert not missing, f"{cls.__name__}: no Args entry for {sorted(missing)}"


@pytest.mark.parametrize("cls", [TrainConfig, InitLaw], ids=lambda c: c.__name__)
def test_every_config_field_is_documented(cls):
    missing = {f.name for f in dataclasses.fields(cls)} - documented(cls.__doc__, "Attributes")
    assert not missing, f"{cls.__name__}: no Attributes entry for {sorted(missing)}"


def test_help_of_trainer_explains_alpha_and_horizon():
    doc = inspect.getdoc(Trainer)
    assert "see the module docstring" not in doc
    for word in ("alpha", "horizon", "progress", "run_dir"):
        assert f"`{word}`" in doc or f"{word}:" in doc


def test_public_docstrings_have_no_rest_roles():
    objs = [Trainer, Trainer.fit, Trainer.from_config, TrainConfig, NTKCallback, MeanFieldRNN,
            ElmanRNN, GRURNN, InitLaw]
    objs += [getattr(ntk_rnn, n) for n in ("CheckpointCallback", "OutputTrackingCallback",
                                           "ProgressCallback", "FastStepper", "EnsembleStepper",
                                           "OnlineState", "rtrl_step", "family_of")]
    raw = [o.__qualname__ for o in objs if ROLE.search(inspect.getdoc(o) or "")]
    assert not raw, f"reST roles in {raw}"


def test_rest_roles_left_elsewhere_render_as_references():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rest_roles", ROOT / "docs/hooks/rest_roles.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    out = hook.on_page_content(
        "see :class:<code>~ntk_rnn.run.config.TrainConfig</code> and "
        ":meth:<code>from_config</code>; :py:func:<code>ntk_rnn.limit.limit_ntk()</code>")
    assert ":class:" not in out and ":meth:" not in out and ":py:func:" not in out
    assert '<autoref identifier="ntk_rnn.run.config.TrainConfig" optional>' \
           "<code>TrainConfig</code></autoref>" in out
    assert "<code>from_config</code>" in out and "<code>ntk_rnn.limit.limit_ntk()</code>" in out


def test_reference_shows_the_documented_surface_and_the_site_needs_no_network():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    opts = cfg["plugins"][1]["mkdocstrings"]["handlers"]["python"]["options"]
    assert opts["show_if_no_docstring"] is False  # no undocumented attributes with their code
    assert "!^_" in opts["filters"]
    assert "_cfg" not in inspect.signature(Trainer).parameters
    assert not [js for js in cfg["extra_javascript"] if "://" in js], "a script from a CDN"
    assert cfg["theme"].get("font") is False  # no font CDN
    assert "docs/hooks/rest_roles.py" in cfg["hooks"]
    make = (ROOT / "Makefile").read_text()
    mathjax = next(js for js in cfg["extra_javascript"] if "mathjax/" in js)
    assert f"MATHJAX := docs/{mathjax}" in make  # `make docs` puts MathJax where the site loads it
    assert "site/index.html" in make  # and says how to view the site
