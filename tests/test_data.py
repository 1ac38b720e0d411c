"""ntk_rnn.data: stationarity, ergodic averages, reproducibility, targets, files, configs."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ntk_rnn.data import (
    VAR1,
    FadingMemory,
    FileSeries,
    LagNonlinear,
    MarkovChain,
    SeattleTemps,
    ThresholdAR,
    check_chunk,
    check_source,
    check_windows,
)
from ntk_rnn.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def take(source, steps: int, chunk: int = 1000, seed: int = 0):
    X, Y, n = [], [], 0
    for x, y in source.stream(gen(seed), chunk):
        check_chunk(source, x, y, chunk)
        X.append(x)
        Y.append(y)
        n += len(x)
        if n >= steps:
            break
    return torch.cat(X)[:steps], torch.cat(Y)[:steps]


A2 = [[0.5, 0.2], [-0.1, 0.3]]


# --- VAR(1) ---------------------------------------------------------------------------------
def test_var1_stationary_cov_solves_lyapunov():
    src = VAR1(A=A2, noise_scale=[[1.0, 0.3], [0.3, 0.5]])
    S, A, Q = src.stationary_cov, src.A, src.noise_cov
    assert src.input_dim == 2
    assert torch.allclose(S, A @ S @ A.T + Q, atol=1e-12)


def test_var1_stream_covariance_matches_stationary():
    src = VAR1(A=A2)
    T = 100_000
    X, Y = take(src, T)
    S = src.stationary_cov
    emp = X.T @ X / T
    # sd of a sample covariance of an AR chain: sqrt((S_ii S_jj + S_ij²) τ / T), τ = (1+ρ²)/(1-ρ²)
    rho = float(torch.linalg.eigvals(src.A).abs().max())
    tau = (1 + rho**2) / (1 - rho**2)
    sd = torch.sqrt((torch.outer(S.diag(), S.diag()) + S**2) * tau / T)
    assert ((emp - S).abs() < 5 * sd).all(), (emp, S, sd)
    assert (X.mean(0).abs() < 5 * torch.sqrt(S.diag() * tau / T)).all()
    assert Y.abs().max() < 1


def test_var1_windows_have_stationary_marginals():
    src = VAR1(A=A2)
    n = 8000
    X, Y = src.windows(n, 6, gen(1))
    check_windows(src, X, Y, n, 6)
    S = src.stationary_cov
    sd = torch.sqrt((torch.outer(S.diag(), S.diag()) + S**2) / n)
    for k in (0, 5):  # first and last step of the window
        emp = X[:, k].T @ X[:, k] / n
        assert ((emp - S).abs() < 5 * sd).all()
    # windows are independent chains: lag-one cross moment E[X_1 X_0ᵀ] = A Σ
    lag = X[:, 1].T @ X[:, 0] / n
    assert ((lag - src.A @ S).abs() < 5 * sd).all()


def test_var1_unstable_A_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.A has spectral radius 1.05 >= 1"):
        VAR1(A=1.05)
    with pytest.raises(ConfigError, match=r"data.A has shape"):
        VAR1(dim=2, A=[[0.5, 0.0, 0.0]])


# --- Markov chain -----------------------------------------------------------------------------
P3 = [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.6, 0.0, 0.4]]


def test_markov_state_frequencies_converge_to_stationary():
    states = [[0.0], [1.0], [2.0]]
    src = MarkovChain(P3, states)
    pi = src.stationary
    assert torch.allclose(pi @ src.transition, pi, atol=1e-12)
    T = 60_000
    X, _ = take(src, T)
    freq = torch.bincount(X[:, 0].long(), minlength=3).double() / T
    # mixing is fast (|λ_2| < 0.6): allow 5 sd with an autocorrelation factor 4
    assert ((freq - pi).abs() < 5 * torch.sqrt(pi * (1 - pi) * 4 / T)).all(), (freq, pi)
    n = 20_000
    Xw, _ = src.windows(n, 3, gen(2))
    fw = torch.bincount(Xw[:, -1, 0].long(), minlength=3).double() / n
    assert ((fw - pi).abs() < 5 * torch.sqrt(pi * (1 - pi) / n)).all()


@pytest.mark.parametrize("P, msg", [
    ([[0.5, 0.6], [0.5, 0.5]], r"data.transition row 0 sums to 1.1"),
    ([[1.2, -0.2], [0.5, 0.5]], r"data.transition\[0\]\[1\]=-0.2 is negative"),
    ([[1.0, 0.0], [0.5, 0.5]], r"data.transition is reducible"),
    ([[0.0, 1.0], [1.0, 0.0]], r"data.transition is periodic \(period 2\)"),
    ([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], r"periodic \(period 3\)"),
    ([[0.5, 0.5]], r"square"),
])
def test_markov_bad_transition_is_a_config_error(P, msg):
    with pytest.raises(ConfigError, match=msg):
        MarkovChain(P)


# --- threshold AR -----------------------------------------------------------------------------
def test_threshold_ar():
    src = ThresholdAR()
    X, Y = take(src, 20_000)
    assert X.shape == (20_000, 1) and torch.isfinite(X).all()
    assert (X > 0).double().mean() > 0.1 and (X <= 0).double().mean() > 0.5  # both regimes
    Xw, _ = src.windows(4000, 4, gen(3))
    # stream and windows sample the same stationary law (mean and spread within sampling error)
    assert abs(X.mean() - Xw[:, -1].mean()) < 0.25 and abs(X.std() / Xw[:, -1].std() - 1) < 0.1
    with pytest.raises(ConfigError, match=r"max\(\|a_low\|, \|a_high\|\) < 1"):
        ThresholdAR(a_low=1.0)


# --- reproducibility ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: VAR1(A=A2, target=FadingMemory(lam=0.8)),
    lambda: MarkovChain(P3, [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.5]]),
    lambda: ThresholdAR(burn_in=50),
])
def test_reproducible_and_chunking_invariant(make):
    src = make()
    a = take(src, 777, chunk=7, seed=5)
    b = take(src, 777, chunk=100, seed=5)
    c = take(make(), 777, chunk=100, seed=5)
    d = take(src, 777, chunk=100, seed=6)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    for u, v in zip(b, c, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(b[0], d[0])
    w1, w2 = src.windows(50, 9, gen(4)), src.windows(50, 9, gen(4))
    assert torch.equal(w1[0], w2[0]) and torch.equal(w1[1], w2[1])
    assert a[0].dtype == torch.float64 and a[1].dtype == torch.float64


def test_stream_does_not_shift_when_generator_is_reused():
    src = VAR1()
    g = gen(0)
    it = src.stream(g, 10)
    torch.rand(5, generator=g)  # the caller uses its generator meanwhile
    assert torch.equal(next(it)[0], next(iter(src.stream(gen(0), 10)))[0])


# --- targets ------------------------------------------------------------------------------------
def fading_direct(X: torch.Tensor, lam: float, a: float) -> torch.Tensor:
    """Y_k = (1-λ) Σ_{j=0}^{k} λ^j tanh(a Σ X_{k-j}), truncated at the start of X."""
    g = torch.tanh(a * X.sum(-1))
    k = torch.arange(X.shape[0])
    W = torch.where(k[:, None] >= k[None, :], lam ** (k[:, None] - k[None, :]).double(), 0.0)
    return (1 - lam) * W @ g


def test_fading_memory_stream_and_windows_match_direct_formula():
    lam = 0.6
    src = VAR1(A=0.7, target=FadingMemory(lam=lam, a=0.5))
    X, Y = take(src, 400, chunk=33)
    direct = fading_direct(X, lam, 0.5)
    # the stream's history before X_0 contributes <= λ^k to Y_k: compare after 80 steps
    assert (Y[80:] - direct[80:]).abs().max() < 1e-12
    Xw, Yw = src.windows(64, 80, gen(7))
    direct_w = torch.stack([fading_direct(x, lam, 0.5)[-1] for x in Xw])
    assert (Yw - direct_w).abs().max() < 1e-12


def test_fading_memory_burn_and_validation():
    assert FadingMemory(lam=0.5).burn == 41 and FadingMemory(lam=0.0).burn == 0
    assert FadingMemory(lam=0.999, max_burn=300).burn == 300
    with pytest.raises(ConfigError, match=r"data.target.lam=1.2 must be in \[0, 1\)"):
        FadingMemory(lam=1.2)


def test_lag_target_formula_and_dim_check():
    src = VAR1(A=A2, target=LagNonlinear(a=[1.0, 0.5], b=-0.5, c=0.3))
    X, Y = take(src, 200, chunk=17)
    z = X[1:] @ torch.tensor([1.0, 0.5], dtype=torch.float64) - 0.5 * X[:-1].sum(1) \
        + 0.3 * X[1:, 0] * X[:-1, 0]
    assert torch.allclose(Y[1:], torch.tanh(z), atol=1e-14, rtol=0)
    with pytest.raises(ConfigError, match=r"data.target.a has 3 entries"):
        VAR1(A=A2, target=LagNonlinear(a=[1.0, 2.0, 3.0]))
    # dict specs, as a plain (non-hydra) config would give them
    src = VAR1(target={"kind": "fading", "lam": 0.5})
    assert isinstance(src.target, FadingMemory)


# --- files --------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_file_series_csv(tmp_path):
    rows = ["date,x,y"] + [f"d{k},{k},{2 * k}" for k in range(10)]
    p = write_csv(tmp_path / "s.csv", rows)
    with pytest.raises(ConfigError, match=r"data.target_column is not set and .* has 2 input "
                       r"columns \['x', 'y'\]: say which one to predict"):
        FileSeries(p, standardize=False)  # two candidates: which one is the target?
    src = FileSeries(p, standardize=False, target_column="x")
    assert src.columns == ["x", "y"] and src.input_dim == 2 and src.num_steps == 9
    X, Y = take(src, 9, chunk=4)
    assert torch.equal(X[:, 0], torch.arange(9).double()) and torch.equal(Y, X[:, 0] + 1)
    src = FileSeries(p, columns=["y"], target_column="x", horizon=2)
    y = 2 * np.arange(10.0)
    assert src.num_steps == 8
    assert np.allclose(src.X[:, 0].numpy(), ((y - y.mean()) / y.std())[:8], atol=1e-14)
    with pytest.raises(ConfigError, match=r"all were used; set data.cycle=true"):
        take(src, 9, chunk=4)
    cyc = FileSeries(p, columns=["x"], cycle=True)
    X, _ = take(cyc, 20, chunk=4)
    assert torch.equal(X[:9], X[9:18])
    Xw, Yw = cyc.windows(100, 3, gen(0))
    check_windows(cyc, Xw, Yw, 100, 3)
    assert torch.allclose(Xw[:, 1] - Xw[:, 0], Xw[:, 2] - Xw[:, 1])  # contiguous rows


def test_file_series_npy(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.stack([np.sin(np.arange(50.0)), np.arange(50.0)], 1))
    src = FileSeries(p, columns=[1], target_column=0, standardize=False)
    assert src.input_dim == 1 and src.num_steps == 49
    assert torch.allclose(src.Y, torch.sin(torch.arange(1, 50).double()))


def test_file_series_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        FileSeries(tmp_path / "missing.csv")
    p = write_csv(tmp_path / "nan.csv", ["a,temp", "1,2", "2,", "3,4"])
    with pytest.raises(ConfigError, match=r"column 'temp' has a missing value at row 1 .*set "
                       r"data.missing to one of drop, ffill, interpolate"):
        FileSeries(p, target_column="temp")
    p = write_csv(tmp_path / "text.csv", ["a,temp", "1,2", "2,abc", "3,4"])
    with pytest.raises(ConfigError, match=r"column 'temp' has a non-numeric or infinite value "
                       r"'abc' at row 1"):
        FileSeries(p, missing="drop", target_column="temp")  # text is not a gap, whatever
        # data.missing says
    p = write_csv(tmp_path / "ok.csv", ["a,b"] + [f"{k},{k}" for k in range(5)])
    with pytest.raises(ConfigError, match=r"column 'c' is not in .*available columns: "
                       r"\['a', 'b'\]"):
        FileSeries(p, columns=["c"])
    with pytest.raises(ConfigError, match=r"has 2 rows; need at least"):
        FileSeries(write_csv(tmp_path / "short.csv", ["a", "1", "2"]))
    with pytest.raises(ConfigError, match=r"do not fit"):
        FileSeries(p, target_column="a").windows(3, 10, gen())


def test_file_series_missing_modes(tmp_path):
    rows = ["date,x,y", "2000-01-01,,10", "2000-01-02,1,NA", "2000-01-03,2,12",
            "2000-01-04,,13", "2000-01-05,,14", "2000-01-06,5,15", "2000-01-07,6,"]
    p = write_csv(tmp_path / "gaps.csv", rows)
    for bad in ("fill", None, "Drop"):
        with pytest.raises(ConfigError, match=r"data.missing=.* must be one of error, drop, "
                           r"ffill, interpolate"):
            FileSeries(p, missing=bad)
    with pytest.raises(ConfigError, match=r"column 'x' has a missing value at row 0 \(0-based, "
                       r"header excluded; 5 missing cells in all\); set data.missing"):
        FileSeries(p, target_column="x")  # the date column is skipped; x (first cell empty) kept

    def table(src):
        return torch.cat([src.X, src.Y[:, None]], 1).numpy()

    src = FileSeries(p, missing="drop", standardize=False, horizon=0, target_column="x")
    assert src.columns == ["x", "y"] and src.dropped_rows == 5 and src.missing_cells == 5
    assert np.array_equal(table(src)[:, :2], [[2, 12], [5, 15]])
    # row 0 has no x before
    src = FileSeries(p, missing="ffill", standardize=False, horizon=0, target_column="x")
    assert src.dropped_rows == 1
    assert np.array_equal(table(src)[:, :2], [[1, 10], [2, 12], [2, 13], [2, 14], [5, 15],
                                              [6, 15]])
    src = FileSeries(p, missing="interpolate", standardize=False, horizon=0,
                     target_column="x")  # no y after row 5
    assert src.dropped_rows == 2
    assert np.allclose(table(src)[:, :2], [[1, 11], [2, 12], [3, 13], [4, 14], [5, 15]])
    src = FileSeries(p, columns=["y"], target_column="x", missing="interpolate",
                     standardize=False)
    assert np.allclose(src.X[:, 0].numpy(), [11, 12, 13, 14]) and \
        np.allclose(src.Y.numpy(), [2, 3, 4, 5])
    with pytest.raises(ConfigError, match=r"has 2 rows after data.missing=drop dropped 6"):
        FileSeries(write_csv(tmp_path / "few.csv", rows + ["2000-01-08,,1"]), missing="drop",
                   columns=["x", "y"], target_column="y")
    npy = tmp_path / "gaps.npy"
    np.save(npy, np.array([0.0, np.nan, 2.0, 3.0, np.nan, 5.0]))
    src = FileSeries(npy, missing="interpolate", standardize=False, horizon=0)
    assert np.allclose(src.X[:, 0].numpy(), np.arange(6.0))


def trainer_class():
    from ntk_rnn.run import Trainer

    return Trainer.from_config


def test_file_series_cycle_is_unbounded(tmp_path):
    """A cycling file reports num_steps=None (the stream never ends), so a run longer than the
    file is accepted; without cycle the trainer refuses it before training."""
    from .conftest import BARE, make_cfg

    p = write_csv(tmp_path / "year.csv", ["year,v"] + [f"{1700 + k}-12-31,{np.sin(0.5 * k)}"
                                                       for k in range(309)])
    src = FileSeries(p, cycle=True)
    assert src.columns == ["v"] and src.num_steps is None and src.length == 308
    assert FileSeries(p).num_steps == 308
    run = ["data=csv", f"data.path={p}", *BARE, "train.steps=400"]
    Trainer = trainer_class()
    with pytest.raises(ConfigError, match=r"holds 308; .*set data.cycle=true"):
        Trainer(make_cfg(*run), tmp_path / "a")
    metrics = Trainer(make_cfg(*run, "data.cycle=true"), tmp_path / "b").fit()
    assert metrics["status"] == "completed" and metrics["steps"] == 400


def statsmodels_csv(tmp_path: Path, name: str) -> Path:
    """A statsmodels dataset written as a csv with a date column first."""
    datasets = pytest.importorskip("statsmodels.datasets")
    pd = pytest.importorskip("pandas")
    if name == "co2":  # weekly CO2 at Mauna Loa, 1958-2001, 59 weeks missing
        df = datasets.co2.load_pandas().data
        df.index = df.index.strftime("%Y-%m-%d")
    else:  # yearly sunspot numbers 1700-2008
        df = datasets.sunspots.load_pandas().data
        df.index = pd.Index([f"{int(y)}-12-31" for y in df.pop("YEAR")])
    path = tmp_path / f"{name}.csv"
    df.to_csv(path, index_label="date")
    return path


def test_real_series_with_gaps_and_dates(tmp_path):
    co2 = statsmodels_csv(tmp_path, "co2")
    lines = co2.read_text().splitlines()
    assert lines[0] == "date,co2" and len(lines) == 2285 and lines[7] == "1958-05-10,"
    with pytest.raises(ConfigError, match=r"column 'co2' has a missing value at row 6 .*59 "
                       r"missing cells.*data.missing to one of drop, ffill, interpolate"):
        FileSeries(co2)
    raw = np.array([float(v.split(",")[1] or "nan") for v in lines[1:]])
    for mode, rows in (("drop", 2284 - 59), ("ffill", 2284), ("interpolate", 2284)):
        src = FileSeries(co2, missing=mode)
        assert src.columns == ["co2"] and src.length == rows - 1 and src.dropped_rows == 2284 - rows
        X, Y = take(src, src.length, chunk=128)
        assert torch.equal(X[1:, 0], Y[:-1]) and abs(float(X.mean())) < 0.01
        assert float((X[:, 0] * Y).mean()) > 0.95  # smooth trend + seasonal cycle
        Xw, Yw = src.windows(32, 52, gen(1))
        check_windows(src, Xw, Yw, 32, 52)
    src = FileSeries(co2, missing="interpolate", standardize=False)
    gap = np.flatnonzero(np.isnan(raw))[0]  # 1958-05-10, between 316.9 and 317.5
    assert gap == 6 and np.isclose(float(src.X[gap, 0]), (raw[5] + raw[7]) / 2)
    sun = statsmodels_csv(tmp_path, "sunspots")
    src = FileSeries(sun, cycle=True)
    assert src.columns == ["SUNACTIVITY"] and src.length == 308 and src.num_steps is None
    X, _ = take(src, 700, chunk=100)
    assert torch.equal(X[:308], X[308:616])


@pytest.mark.parametrize("name,extra", [("co2", ["data.missing=interpolate"]),
                                        ("sunspots", ["data.cycle=true"])])
def test_train_on_real_series(tmp_path, name, extra):
    from .conftest import CALLBACKS_OFF, make_cfg

    path = statsmodels_csv(tmp_path, name)
    cfg = make_cfg("data=csv", f"data.path={path}", "model.width=16", "train.steps=600",
                   CALLBACKS_OFF, "dtype=float64", *extra)
    metrics = trainer_class()(cfg, tmp_path / "run").fit()
    assert metrics["status"] == "completed" and metrics["steps"] == 600
    assert np.isfinite(metrics["running_mse"])


def test_seattle_temps_offline():
    src = SeattleTemps()
    assert src.num_steps == 8758 and src.input_dim == 1
    assert abs(float(src.X.mean())) < 0.01 and abs(float(src.X.std()) - 1) < 0.01
    # hourly temperature: strongly autocorrelated one step ahead
    assert float((src.X[:, 0] * src.Y).mean()) > 0.95


# --- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_config_instantiates_and_follows_protocol(name, tmp_path):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if OmegaConf.is_missing(cfg, "_target_"):
        pytest.skip(f"{name}.yaml is a template without a _target_")
    if name == "csv":
        rows = ["t,v"] + [f"{k},{np.sin(k)}" for k in range(200)]
        cfg.path = str(write_csv(tmp_path / "s.csv", rows))
        cfg.target_column = "v"
    for convert in ("none", "all"):
        src = check_source(instantiate(cfg, _convert_=convert))
        X, Y = next(iter(src.stream(gen(), 50)))
        check_chunk(src, X, Y, 50)
        Xw, Yw = src.windows(16, 12, gen())
        check_windows(src, Xw, Yw, 16, 12)
        assert X.dtype == Xw.dtype == torch.float64


def test_plain_iteration_helpers():
    src = MarkovChain(P3)
    assert src.input_dim == 3  # one-hot default embedding
    chunks = list(islice(src.stream(gen(), 5), 3))
    assert all(x.shape == (5, 3) for x, _ in chunks)
