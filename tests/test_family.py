"""The model-family seam (ntk_rnn/models/family.py): one place answers every "which" question."""

import re
from pathlib import Path

import pytest
import torch

import ntk_rnn
from ntk_rnn import GRURNN, ElmanRNN, MeanFieldRNN, NTKCallback, Trainer, family_of
from ntk_rnn.data import VAR1
from ntk_rnn.errors import ConfigError
from ntk_rnn.limit import is_exact, limit_kind, limit_ntk
from ntk_rnn.run.build import model_node
from tests.custom_models import TinyRNN

PKG = Path(ntk_rnn.__file__).parent


class TinyAtWidth(TinyRNN):
    """The README's custom module with the one method its Monte-Carlo limit needs."""

    def at_width(self, width, seed):
        torch.manual_seed(seed)
        return TinyAtWidth(self.input_dim, width, self.beta)


def test_families():
    cases = [(MeanFieldRNN(1, 4), "diagonal", "rtrl", "units", "quadrature"),
             (MeanFieldRNN(1, 4, recurrence="feedback"), "feedback", "rtrl", None, "cell"),
             (ElmanRNN(1, 4), "elman", "bptt", "elman", "elman"),
             (GRURNN(1, 4), "gru", "bptt", "gru", "coordinate"),
             (TinyRNN(1, 4), "generic", "bptt", None, "monte_carlo")]
    for model, name, online, structure, limit in cases:
        fam = family_of(model)
        assert (fam.name, fam.online, fam.structure, fam.limit) == (name, online, structure, limit)
        assert limit_kind(model) == limit and is_exact(model) == (limit != "monte_carlo")


def test_subclass_keeps_law_but_not_hand_written_engines():
    class MyElman(ElmanRNN):
        pass

    fam = family_of(MyElman(1, 4))
    assert fam.limit == "elman" and fam.bptt_engine is None and fam.structure is None


@pytest.mark.parametrize("model", [MeanFieldRNN(2, 5, beta=0.6, seed=3),
                                   MeanFieldRNN(2, 5, recurrence="feedback", activation="erf"),
                                   ElmanRNN(2, 5, recurrent_scaling="ntk", c_law="normal",
                                            A_std=0.7, activation="sigmoid"),
                                   GRURNN(2, 5, hh_std=0.5, bias_std=0.1)],
                         ids=["D", "F", "elman", "gru"])
def test_at_width_is_the_same_law_at_another_width(model):
    fam = family_of(model)
    a, b = fam.at_width(model, 9, seed=7), fam.at_width(model, 9, seed=7)
    assert type(a) is type(model) and a.width == 9 and a.input_dim == model.input_dim
    assert fam.limit_spec(a) == fam.limit_spec(model)  # K_∞'s law does not depend on N
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), k  # θ_0 from the seed
    assert not torch.equal(next(a.parameters()), next(fam.at_width(model, 9, 8).parameters()))


def test_model_node_records_real_arguments():
    m = ElmanRNN(1, 6, c_law="normal", c_scale=0.5, recurrent_scaling="ntk", A_std=0.8)
    node = model_node(m)
    assert node["c_law"] == "normal" and node["c_scale"] == 0.5 and node["A_std"] == 0.8
    assert node["recurrent_scaling"] == "ntk" and node["width"] == 6
    g = model_node(GRURNN(1, 6, hh_std=0.3, bias=False))
    assert g["hh_std"] == 0.3 and g["bias"] is False


def test_custom_module_without_at_width_is_refused_in_one_line():
    x = torch.randn(3, 4, 1)
    with pytest.raises(ConfigError, match=r"at_width\(width, seed\)"):
        limit_ntk(TinyRNN(1, 4), x)
    with pytest.raises(ConfigError, match=r"callbacks\.ntk\.limit=false"):
        Trainer(model=TinyRNN(1, 8), data=VAR1(), alpha=1.0, horizon=0.5, run_dir=None,
                callbacks=[NTKCallback(every_n_steps=4, n_probes=4, probe_length=4, top_k=2)])


@pytest.mark.parametrize("make", [lambda: MeanFieldRNN(input_dim=1, width=32),
                                  lambda: ElmanRNN(input_dim=1, width=32),
                                  lambda: GRURNN(input_dim=1, width=32),
                                  lambda: TinyAtWidth(input_dim=1, width=32)],
                         ids=["MeanFieldRNN", "ElmanRNN", "GRURNN", "custom"])
def test_readme_python_snippet_for_every_model(make):
    """README's Python API snippet, with each kind of model."""
    trainer = Trainer(model=make(), data=VAR1(), alpha=4.0, horizon=0.5,
                      callbacks=[NTKCallback(every_n_steps=4, n_probes=6, probe_length=6, top_k=3,
                                             limit_width=32, limit_draws=2)],
                      seed=0, run_dir=None)
    metrics = trainer.fit()
    assert len(trainer.history["ntk/drift_from_init"]) >= 2
    assert 0 < metrics["ntk_limit_relative_error"] < float("inf")
    assert metrics["ntk_distance_to_limit"] > 0
    assert metrics["ntk_limit_method"]


SEAM = {"models/family.py", "models/recurrence.py"}
DISPATCH = re.compile(r"isinstance\([^)]*\b(MeanFieldRNN|ElmanRNN|GRURNN)\b[^)]*\)"
                      r"|type\([^)]*\)\s+is\s+(MeanFieldRNN|ElmanRNN|GRURNN)\b"
                      r"|recurrence\s*[!=]="
                      r"|\"recurrence\"[^)]*\)\s*[!=]=")


def test_no_model_family_dispatch_outside_the_seam():
    hits = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).as_posix()
        if rel in SEAM:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if DISPATCH.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_dispatch_check_can_fail(tmp_path):
    assert DISPATCH.search('if model.recurrence == "feedback":')
    assert DISPATCH.search("if not isinstance(m, MeanFieldRNN):")
    assert DISPATCH.search("if type(m) is ElmanRNN and x:")
    assert DISPATCH.search('getattr(model, "recurrence", None) == "diagonal"')


@pytest.mark.parametrize("scaling", ["mean_field", "ntk"])
def test_cli_elman_uses_the_closed_form(tiny_cfg, scaling):
    """`model=elman` from the config: K_∞ is the closed form at quadrature level (≤ 1e−3), and
    its relative error is reported in the units of the distance."""
    cfg = tiny_cfg("model=elman", "model.width=16", f"model.recurrent_scaling={scaling}",
                   "callbacks.ntk.limit=true", "callbacks.ntk.n_probes=6",
                   "callbacks.ntk.probe_length=5")
    m = Trainer.from_config(cfg, None).fit()
    assert m["ntk_limit_method"] == "elman_closed_form"
    assert m["ntk_limit_error_estimate"] <= 1e-3
    assert m["ntk_limit_relative_error"] <= 1e-3
    assert m["ntk_limit_relative_error"] < m["ntk_distance_to_limit"]


def test_python_elman_run_config_reruns_to_the_same_numbers():
    """A Python-built Elman run's config (config.yaml) records its real arguments: built from it,
    the run gives the same numbers."""
    from omegaconf import OmegaConf

    model = ElmanRNN(1, 12, c_law="normal", c_scale=0.7, recurrent_scaling="ntk", A_std=0.9)
    a = Trainer(model=model, data=VAR1(), alpha=2.0, horizon=1.0, seed=4, run_dir=None,
                tensorboard=False)
    ma = a.fit()
    cfg = OmegaConf.create(OmegaConf.to_yaml(a.cfg))  # what config.yaml holds
    assert cfg.model.c_law == "normal" and cfg.model.A_std == 0.9
    mb = Trainer.from_config(cfg, None).fit()
    assert ma["running_mse"] == mb["running_mse"] and ma["steps"] == mb["steps"]


def test_start_note_names_the_models_own_limit():
    """The line printed before K_∞ is computed says which limit: closed form for Elman, the
    sampled coordinate limit for the GRU."""
    notes = {}
    for name, model in (("elman", ElmanRNN(1, 16)), ("gru", GRURNN(1, 16))):
        cb = NTKCallback(every_n_steps=4, n_probes=4, probe_length=4, top_k=2)
        tr = Trainer(model=model, data=VAR1(), alpha=1.0, horizon=0.5, run_dir=None,
                     callbacks=[cb], tensorboard=False, progress=False)
        notes[name] = cb.start_note(tr.members[0].state)
    assert "elman" in notes["elman"] and "Monte Carlo" not in notes["elman"]
    assert "coordinate" in notes["gru"] and "Monte Carlo" not in notes["gru"]
