"""Issue 15: the kernel-drift law, the linearized shadow's gap, and Model F's moving window kernel.

    python -m experiments.drift_study --quick          # pipeline check (~1 min)
    python -m experiments.drift_study --full           # the study (~30 min on 2 shared cores)
    python -m experiments.drift_study --full --analyze-only

Everything goes through the public API (``Trainer``, ``NTKCallback``, ``LinearizedCallback``):
one ensemble run (``ensemble_size`` seeds, member e = seed e) per (β, α, N), horizon t = 2,
float64, VAR(1) data as in the width sweeps; the logged times t = 0.25, 0.5, ..., 2 of one run
give the t axis. A small callback defined here (``ParityCallback``) adds, at the same times,

* the per-unit parameter displacement  D = ‖θ_t − θ_0‖ / √N  (and per group c, w, b), and
* the exact split of the kernel change into its parts odd and even in the displacement,
  K_± = K(θ_0 ± Δ), Δ = θ_t − θ_0:  odd = (K_+ − K_−)/2 (orders 1, 3, ...),
  even = (K_+ + K_−)/2 − K_0 (orders 2, 4, ...), each as ‖·‖_F / ‖K_0‖_F.
  The parity argument of theory §5 says the odd part averages out over units (N^{-1/2} times
  its size) and the even part is coherent; this measures both directly.

Results: experiments/results/drift_<mode>.json (raw series per member) and
drift_<mode>_fits.json; figures experiments/figures/drift_*.png, lazy_*.png,
feedback_window_*.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ntk_rnn import MeanFieldRNN, NTKCallback, Trainer
from ntk_rnn.callbacks import LinearizedCallback
from ntk_rnn.callbacks.base import Callback
from ntk_rnn.data import VAR1
from ntk_rnn.models.init import generator_from_seed

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "experiments" / "results"
FIG = ROOT / "experiments" / "figures"
PROBE_SEED = 777

MODES = {
    # (widths, betas, alphas, seeds, linearized up to N, study budget in s, feedback widths)
    "quick": dict(widths=[2 ** k for k in range(6, 10)], betas=[0.75, 0.9], alphas=[1.0, 4.0],
                  seeds=3, lin_max=2 ** 9, budget=120, fb_widths=[2 ** 6, 2 ** 7, 2 ** 8],
                  n_probes=16, L=16),
    "full": dict(widths=[2 ** k for k in range(8, 16)], betas=[0.6, 0.75, 0.9],
                 alphas=[0.25, 1.0, 4.0], seeds=4, lin_max=2 ** 12, budget=1380,
                 fb_widths=[2 ** 8, 2 ** 9, 2 ** 10, 2 ** 11], n_probes=32, L=16),
}
HORIZON, EVERY_T = 2.0, 0.25
T_READ = (0.25, 1.0, 2.0)
# Model F's μ0 of conf/model/feedback.yaml (the width sweeps'): b ~ N(0, 1)
FEEDBACK_INIT = dict(c="uniform", c_scale=1.0, w="normal", w_scale=1.0, b="normal", rho=1.0)


def flat(model) -> torch.Tensor:
    return torch.cat([model.c.detach(), model.w.detach().reshape(-1), model.b.detach()])


def load_flat(model, theta: torch.Tensor) -> None:
    N, d = model.width, model.input_dim
    with torch.no_grad():
        model.c.copy_(theta[:N])
        model.w.copy_(theta[N:N + N * d].view(N, d))
        model.b.copy_(theta[N + N * d:])


def kernel(model, x: torch.Tensor) -> torch.Tensor:
    """K^N = (1/N) Σ_i φ_i φ_iᵀ, φ_i = (S, cP, cQ) at the windows' last step (theory §4)."""
    with torch.no_grad():
        S, P, Q = model.unit_features(x)  # (n, N), (n, N, d), (n, N)
        c = model.c.detach()
        phi = torch.cat([S, (P * c.view(1, -1, 1)).flatten(1), Q * c], dim=1)
        return phi @ phi.T / model.width


class ParityCallback(Callback):
    """Displacement per unit and the odd/even split of K_t − K_0 (module docstring)."""

    name = "parity"

    def __init__(self, every_t: float, n_probes: int, probe_length: int) -> None:
        super().__init__(1, every_t)
        self.n, self.L = n_probes, probe_length
        self.hist: dict[str, list] = {}
        self.dK: dict[float, tuple] = {}  # t -> (K_t - K_0, ‖K_0‖) at the read times

    def setup(self, state) -> None:
        super().setup(state)
        X, _ = state.source.windows(self.n, self.L, generator_from_seed(PROBE_SEED))
        p = state.model.c
        self.x = X.to(p.device, p.dtype)

    def on_train_start(self, state) -> None:
        self.theta0 = flat(state.model)
        self.K0 = kernel(state.model, self.x)
        self.shadow = copy.deepcopy(state.model).requires_grad_(False)

    def on_step_end(self, step: int, state) -> None:
        m = state.model
        N, d = m.width, m.input_dim
        dlt = flat(m) - self.theta0
        K = kernel(m, self.x)
        load_flat(self.shadow, self.theta0 - dlt)
        Km = kernel(self.shadow, self.x)
        n0 = float(self.K0.norm())
        rec = {
            "t": step / N,
            "D": float(dlt.norm()) / math.sqrt(N),
            "D_c": float(dlt[:N].norm()) / math.sqrt(N),
            "D_w": float(dlt[N:N + N * d].norm()) / math.sqrt(N),
            "D_b": float(dlt[N + N * d:].norm()) / math.sqrt(N),
            "drift": float((K - self.K0).norm()) / n0,
            "odd": float(((K - Km) / 2).norm()) / n0,
            "even": float(((K + Km) / 2 - self.K0).norm()) / n0,
        }
        for k, v in rec.items():
            self.hist.setdefault(k, []).append(v)
        if any(abs(rec["t"] - t) < 1e-9 for t in T_READ):
            self.dK[round(rec["t"], 6)] = (K - self.K0, n0)


def _split(dks: list, norms: list) -> tuple[float, float]:
    """(coherent, fluctuating) parts of the drift over ensemble members: M = mean ΔK_e,
    S² = Σ‖ΔK_e − M‖²/(E−1); coherent² = ‖M‖² − S²/E (unbiased), both over mean ‖K_0‖."""
    E = len(dks)
    M = sum(dks) / E
    S2 = sum(float((d - M).norm()) ** 2 for d in dks) / (E - 1)
    c2 = float(M.norm()) ** 2 - S2 / E
    n0 = float(np.mean(norms))
    return math.copysign(math.sqrt(abs(c2)), c2) / n0, math.sqrt(S2) / n0


def ensemble_split(pars: list) -> dict:
    """Coherent/fluctuating split of K_t − K_0 at the read times, with leave-one-out values
    (jackknife over members)."""
    out = {}
    cbs = [p[0] for p in pars if p]
    if len(cbs) < 3:
        return out
    for t in cbs[0].dK:
        dks = [cb.dK[t][0] for cb in cbs]
        ns = [cb.dK[t][1] for cb in cbs]
        full = _split(dks, ns)
        loo = [_split(dks[:i] + dks[i + 1:], ns[:i] + ns[i + 1:]) for i in range(len(dks))]
        out[str(t)] = {"coherent": full[0], "fluct": full[1],
                       "coherent_loo": [x[0] for x in loo], "fluct_loo": [x[1] for x in loo]}
    return out


def run_one(beta: float, alpha: float, N: int, seeds: int, lin: bool, p: dict,
            recurrence: str = "diagonal") -> dict:
    cbs = [NTKCallback(every_t=EVERY_T, n_probes=p["n_probes"], probe_length=p["L"],
                       limit=False, image_every_n_steps=0, histogram_every_n_steps=0, top_k=1,
                       probe_seed=PROBE_SEED)]
    if recurrence == "diagonal":
        cbs.append(ParityCallback(EVERY_T, p["n_probes"], p["L"]))
    if lin:
        cbs.append(LinearizedCallback(every_t=EVERY_T, n_probes=p["n_probes"],
                                      probe_length=p["L"], probe_seed=PROBE_SEED))
    init = FEEDBACK_INIT if recurrence == "feedback" else None
    model = MeanFieldRNN(input_dim=1, width=N, beta=beta, recurrence=recurrence, init=init,
                         dtype=torch.float64)
    t0 = time.perf_counter()
    tr = Trainer(model=model, data=VAR1(), alpha=alpha, horizon=HORIZON, callbacks=cbs, seed=0,
                 run_dir=None, ensemble_size=seeds)
    tr.fit()
    wall = time.perf_counter() - t0
    members = []
    for m in tr.members:
        h = m.history
        rec = {"seed": m.seed}
        for tag in ("ntk/drift_from_init", "ntk/per_block/drift_c", "ntk/per_block/drift_w",
                    "ntk/per_block/drift_b", "lazy/output_gap", "lazy/param_gap",
                    "lazy/output_change"):
            if tag in h:
                rec[tag] = [[s / N, v] for s, v in h[tag]]
        par = [cb for cb in m.callbacks if isinstance(cb, ParityCallback)]
        if par:
            rec["parity"] = par[0].hist
        members.append(rec)
    coh = ensemble_split([[cb for cb in m.callbacks if isinstance(cb, ParityCallback)]
                          for m in tr.members]) if recurrence == "diagonal" else {}
    return {"coherent": coh, "beta": beta, "alpha": alpha, "N": N, "recurrence": recurrence,
            "lin": lin, "wall_s": wall, "members": members}


def collect(mode: str) -> None:
    p = MODES[mode]
    RES.mkdir(parents=True, exist_ok=True)
    out = RES / f"drift_{mode}.json"
    data = {"mode": mode, "params": p, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}
    t_start = time.perf_counter()
    cost: dict[bool, float] = {}  # seconds per (N² · seeds), measured on the largest run so far

    def save():
        data["wall_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(data))

    # Model F: the window-kernel drift curve at several N (issue item 3), α = 4, β = 0.75
    for N in p["fb_widths"]:
        t0 = time.perf_counter()
        r = run_one(0.75, 4.0, N, p["seeds"], False, p, recurrence="feedback")
        data["runs"].append(r)
        save()
        print(f"feedback N={N}: {time.perf_counter() - t0:.1f}s", flush=True)
    for N in p["widths"]:
        for beta in p["betas"]:
            for alpha in p["alphas"]:
                lin = N <= p["lin_max"]
                left = p["budget"] - (time.perf_counter() - t_start)
                est = cost.get(lin, 0.0) * N * N * p["seeds"]
                if est > left:
                    print(f"skip N={N} β={beta} α={alpha}: ~{est:.0f}s > {left:.0f}s left",
                          flush=True)
                    data.setdefault("skipped", []).append([beta, alpha, N])
                    continue
                r = run_one(beta, alpha, N, p["seeds"], lin, p)
                cost[lin] = max(cost.get(lin, 0.0), r["wall_s"] / (N * N * p["seeds"]))
                if not lin:
                    cost[True] = max(cost.get(True, 0.0), cost[False])
                data["runs"].append(r)
                save()
                d2 = np.mean([m["ntk/drift_from_init"][-1][1] for m in r["members"]])
                print(f"N={N} β={beta} α={alpha} lin={lin}: {r['wall_s']:.1f}s "
                      f"drift(t=2)={d2:.4g}", flush=True)
    save()
    print(f"collect: {data['wall_s']:.0f}s -> {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--full", action="store_true")
    ap.add_argument("--analyze-only", action="store_true")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--first-order", action="store_true",
                    help="only the first-order check of the kernel change (first_order_check)")
    ap.add_argument("--feedback-limit", action="store_true",
                    help="(re)compute Model F's limit window-kernel drift before the analysis")
    a = ap.parse_args()
    mode = "full" if a.full else "quick"
    torch.set_num_threads(1)
    if a.first_order:
        first_order_check(mode, widths=(64, 128) if mode == "quick" else (512, 2048, 8192))
        return
    if not a.analyze_only:
        collect(mode)
    if not a.collect_only:
        if a.feedback_limit or not a.analyze_only:
            feedback_limit(mode)
        analyze(mode)



# --- analysis -------------------------------------------------------------------------------
def _tq(n: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, max(n - 1, 1)))


def _slope(x, y) -> float:
    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def _ci(vals) -> tuple[float, float]:
    v = np.asarray([x for x in vals if np.isfinite(x)])
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), _tq(len(v)) * float(v.std(ddof=1)) / math.sqrt(len(v))


def _table(runs: list) -> dict:
    """{(β, α): {N: run}} for the diagonal runs."""
    tab: dict = {}
    for r in runs:
        if r["recurrence"] == "diagonal":
            tab.setdefault((r["beta"], r["alpha"]), {})[r["N"]] = r
    return tab


def _series(m: dict, key: str, t: float) -> float:
    """value of a member's quantity at time t (parity keys or lazy/ntk tags)."""
    if key in m.get("parity", {}):
        ts = m["parity"]["t"]
        for i, tt in enumerate(ts):
            if abs(tt - t) < 1e-9:
                return m["parity"][key][i]
        return float("nan")
    for tt, v in m.get(key, []):
        if abs(tt - t) < 1e-9:
            return v
    return float("nan")


def slope_in_N(byN: dict, key: str, t: float, Ns=None) -> dict:
    """Per-seed least-squares slope of log(key at t) on log N; mean ± 95% t-interval."""
    Ns = sorted(byN) if Ns is None else [n for n in sorted(byN) if n in Ns]
    E = min(len(byN[n]["members"]) for n in Ns)
    per = []
    for e in range(E):
        y = [_series(byN[n]["members"][e], key, t) for n in Ns]
        per.append(_slope(Ns, y))
    s, h = _ci(per)
    return {"slope": s, "ci": h, "Ns": Ns, "per_seed": per}


def coherent_slope(byN: dict, part: str, t: float) -> dict:
    """Slope of the ensemble's coherent (or fluct) drift in N; ± jackknife over members."""
    Ns = [n for n in sorted(byN) if str(t) in byN[n].get("coherent", {})]
    if len(Ns) < 2:
        return {"slope": float("nan"), "ci": float("nan"), "Ns": Ns}
    y = [byN[n]["coherent"][str(t)][part] for n in Ns]
    full = _slope(Ns, [v if v > 0 else float("nan") for v in y])
    E = len(byN[Ns[0]]["coherent"][str(t)][part + "_loo"])
    loo = [_slope(Ns, [max(byN[n]["coherent"][str(t)][part + "_loo"][i], 1e-300) for n in Ns])
           for i in range(E)]
    loo = np.asarray(loo)
    se = math.sqrt((E - 1) / E * float(((loo - loo.mean()) ** 2).sum()))
    return {"slope": full, "ci": _tq(E) * se, "Ns": Ns, "values": y}


def _points(tab: dict, key: str = "drift"):
    """Pooled points (β, α, t, N, seed, D, eps, y) over every run, member and logged t."""
    rows = []
    for (beta, alpha), byN in tab.items():
        for N, r in byN.items():
            for e, m in enumerate(r["members"]):
                p = m["parity"]
                for i, t in enumerate(p["t"]):
                    rows.append((beta, alpha, t, N, e, p["D"][i], alpha * t * N ** (beta - 1),
                                 p[key][i]))
    return np.asarray(rows, float)


def power_fit(P: np.ndarray, xcol: int, seeds_boot: int = 200, rng_seed: int = 0) -> dict:
    """log y = log a + p log x + q log N over the pooled points; bootstrap over seeds (each
    resample draws members with replacement, the same draw for every run)."""
    def fit(rows):
        A = np.c_[np.ones(len(rows)), np.log(rows[:, xcol]), np.log(rows[:, 3])]
        y = np.log(rows[:, 7])
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        return coef, float(np.sqrt(np.mean((A @ coef - y) ** 2)))
    ok = (P[:, 7] > 0) & (P[:, xcol] > 0)
    P = P[ok]
    coef, rms = fit(P)
    E = int(P[:, 4].max()) + 1
    rng = np.random.default_rng(rng_seed)
    boots = []
    for _ in range(seeds_boot):
        pick = rng.integers(0, E, E)
        rows = np.concatenate([P[P[:, 4] == k] for k in pick])
        boots.append(fit(rows)[0])
    boots = np.asarray(boots)
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    return {"a": float(np.exp(coef[0])), "p": float(coef[1]), "q": float(coef[2]),
            "p_ci": [float(lo[1]), float(hi[1])], "q_ci": [float(lo[2]), float(hi[2])],
            "rms_log": rms, "n_points": int(len(P))}


def collapse_quality(P: np.ndarray, xcol: int) -> float:
    """rms of log y about a quadratic in log x pooled over everything (smaller = collapses)."""
    ok = (P[:, 7] > 0) & (P[:, xcol] > 0)
    x, y = np.log(P[ok, xcol]), np.log(P[ok, 7])
    c = np.polyfit(x, y, 2)
    return float(np.sqrt(np.mean((np.polyval(c, x) - y) ** 2)))


def two_term_fit(P: np.ndarray, xcol: int = 5) -> dict:
    """drift² = (A x N^{-1/2})² + (B x²)² (theory §5's two terms, exponents fixed) — least squares
    in log; returns A, B, the rms and x*(N) = (A/B) N^{-1/2} where the terms cross."""
    from scipy.optimize import least_squares
    ok = (P[:, 7] > 0) & (P[:, xcol] > 0)
    x, N, y = P[ok, xcol], P[ok, 3], P[ok, 7]

    def res(v):
        A, B = np.exp(v)
        return 0.5 * np.log((A * x) ** 2 / N + (B * x * x) ** 2) - np.log(y)
    s = least_squares(res, [0.0, 0.0])
    A, B = np.exp(s.x)
    return {"A": float(A), "B": float(B), "rms_log": float(np.sqrt(np.mean(s.fun ** 2)))}


def parts_fit(tab: dict) -> dict:
    """Power fits log y = log a + p log D + q log N of the ensemble's coherent and fluctuating
    drift at the read times (D = mean over members), ± jackknife over members (95%)."""
    rows = []
    for (beta, alpha), byN in tab.items():
        for N, r in byN.items():
            for t, v in r.get("coherent", {}).items():
                D = float(np.mean([_series(m, "D", float(t)) for m in r["members"]]))
                rows.append((beta, alpha, float(t), N, D, v["coherent"], v["fluct"],
                             v["coherent_loo"], v["fluct_loo"]))
    if not rows:
        return {}
    out = {}
    for name, j, jl in (("coherent", 5, 7), ("fluct", 6, 8)):
        def fit(ys):
            ok = [i for i, y in enumerate(ys) if y > 0]
            A = np.asarray([[1.0, math.log(rows[i][4]), math.log(rows[i][3])] for i in ok])
            y = np.log([ys[i] for i in ok])
            coef, *_ = np.linalg.lstsq(A, y, rcond=None)
            return coef, float(np.sqrt(np.mean((A @ coef - y) ** 2))), len(ok)
        coef, rms, n = fit([r[j] for r in rows])
        E = len(rows[0][jl])
        loo = np.asarray([fit([r[jl][i] for r in rows])[0] for i in range(E)])
        se = np.sqrt((E - 1) / E * ((loo - loo.mean(0)) ** 2).sum(0))
        out[name] = {"a": float(np.exp(coef[0])), "p": float(coef[1]), "q": float(coef[2]),
                     "p_ci": float(_tq(E) * se[1]), "q_ci": float(_tq(E) * se[2]),
                     "rms_log": rms, "n_points": n}
        # with the theory's exponents fixed: coherent = B D², fluct = A D N^{-1/2}
        pe, qe = (2.0, 0.0) if name == "coherent" else (1.0, -0.5)
        ys = np.asarray([r[j] for r in rows])
        ok = ys > 0
        Dv, Nv = np.asarray([r[4] for r in rows]), np.asarray([r[3] for r in rows])
        lg = np.log(ys[ok]) - pe * np.log(Dv[ok]) - qe * np.log(Nv[ok])
        out[name]["fixed_exponents"] = {"p": pe, "q": qe, "coef": float(np.exp(lg.mean())),
                                        "rms_log": float(lg.std())}
    out["rows"] = [list(r[:7]) for r in rows]
    return out


def _figname(stem: str, mode: str) -> str:
    """full mode: experiments/figures/<stem>.png; other modes: <stem>_<mode>.png."""
    return f"{stem}.png" if mode == "full" else f"{stem}_{mode}.png"


def analyze(mode: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((RES / f"drift_{mode}.json").read_text())
    tab = _table(data["runs"])
    betas = sorted({b for b, _ in tab})
    alphas = sorted({a for _, a in tab})
    fits: dict = {"mode": mode, "collect_wall_s": data.get("wall_s"), "slopes": [],
                  "skipped": data.get("skipped", [])}
    # --- slopes in N, by (β, α, t) ----------------------------------------------------------
    for (beta, alpha), byN in sorted(tab.items()):
        for t in T_READ:
            row = {"beta": beta, "alpha": alpha, "t": t, "Ns": sorted(byN),
                   "eps_range": [alpha * t * n ** (beta - 1) for n in (min(byN), max(byN))]}
            for key in ("drift", "D", "even", "odd"):
                row[key] = slope_in_N(byN, key, t)
                row[key + "_mean"] = [
                    float(np.mean([_series(m, key, t) for m in byN[n]["members"]]))
                    for n in sorted(byN)]
            for part in ("coherent", "fluct"):
                row[part] = coherent_slope(byN, part, t)
            Ns = sorted(byN)
            half = Ns[len(Ns) // 2 - 1:]
            row["drift_upper"] = slope_in_N(byN, "drift", t, half)
            row["drift_lower"] = slope_in_N(byN, "drift", t, Ns[:len(Ns) // 2 + 1])
            linN = [n for n in Ns if byN[n]["lin"]]
            if len(linN) >= 2:
                for key in ("lazy/output_gap", "lazy/param_gap", "lazy/output_change"):
                    row[key] = slope_in_N(byN, key, t, linN)
                    row[key + "_mean"] = [float(np.mean([_series(m, key, t)
                                                         for m in byN[n]["members"]]))
                                          for n in linN]
            fits["slopes"].append(row)
    # --- collapse and power fits --------------------------------------------------------------
    P = _points(tab, "drift")
    fits["collapse_rms_log"] = {"eps": collapse_quality(P, 6), "D": collapse_quality(P, 5)}
    fits["power_fit"] = {"eps": power_fit(P, 6), "D": power_fit(P, 5)}
    fits["power_fit_by_beta"] = {str(b): power_fit(P[P[:, 0] == b], 5) for b in betas}
    small = P[P[:, 5] < np.median(P[:, 5])]
    large = P[P[:, 5] >= np.median(P[:, 5])]
    fits["power_fit_D_small"] = power_fit(small, 5)
    fits["power_fit_D_large"] = power_fit(large, 5)
    fits["two_term"] = two_term_fit(P, 5)
    fits["parts"] = parts_fit(tab)
    # D vs eps: is D ∝ α t N^{β−1}?
    fits["D_vs_eps"] = power_fit(np.c_[P[:, :7], P[:, 5]], 6)  # log D = a + p log eps + q log N
    # --- figures ----------------------------------------------------------------------------
    FIG.mkdir(parents=True, exist_ok=True)
    cols = {b: c for b, c in zip(betas, ["tab:blue", "tab:orange", "tab:green", "tab:red"])}
    marks = {a: m for a, m in zip(alphas, ["v", "o", "s", "^"])}
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    for (beta, alpha), byN in tab.items():
        for N, r in byN.items():
            D = np.mean([m["parity"]["D"] for m in r["members"]], 0)
            y = np.mean([m["parity"]["drift"] for m in r["members"]], 0)
            ts = np.asarray(r["members"][0]["parity"]["t"])
            eps = alpha * ts * N ** (beta - 1)
            kw = dict(color=cols[beta], marker=marks[alpha], s=8 + 3 * math.log2(N) - 20, alpha=0.6)
            ax[0].scatter(eps, y, **kw)
            ax[1].scatter(D, y, **kw)
            ax[2].scatter(D, y / D ** 2, **kw)
    for a_, lab in zip(ax, ["ε = α t N^(β−1)", "D = ‖θ_t − θ_0‖/√N (measured)",
                            "D (measured)"]):
        a_.set_xscale("log"), a_.set_yscale("log"), a_.set_xlabel(lab)
    ax[0].set_ylabel("kernel drift ‖K_t − K_0‖/‖K_0‖")
    ax[1].set_ylabel("kernel drift")
    ax[2].set_ylabel("drift / D²")
    for b in betas:
        ax[0].scatter([], [], color=cols[b], label=f"β = {b}")
    for a in alphas:
        ax[0].scatter([], [], color="gray", marker=marks[a], label=f"α = {a}")
    ax[0].legend(fontsize=8)
    ax[0].set_title(f"collapse rms(log) = {fits['collapse_rms_log']['eps']:.2f}")
    ax[1].set_title(f"collapse rms(log) = {fits['collapse_rms_log']['D']:.2f}")
    ax[2].set_title("second order: flat; first order: ∝ 1/D")
    fig.suptitle("Model D kernel drift at t = 0.25 … 2 (marker size ∝ log N; 4-seed means)")
    fig.tight_layout()
    fig.savefig(FIG / _figname("drift_collapse", mode), dpi=110)
    plt.close(fig)
    # drift and its coherent / fluctuating parts vs N, at t = 2 and t = 0.25
    fig, ax = plt.subplots(2, len(betas), figsize=(5 * len(betas), 8), squeeze=False)
    for j, beta in enumerate(betas):
        for i, t in enumerate((T_READ[0], T_READ[-1])):
            a_ = ax[i, j]
            for alpha in alphas:
                byN = tab.get((beta, alpha))
                if not byN:
                    continue
                Ns = sorted(byN)
                y = [np.mean([_series(m, "drift", t) for m in byN[n]["members"]]) for n in Ns]
                a_.plot(Ns, y, marker=marks[alpha], label=f"α={alpha} total")
                co = [byN[n].get("coherent", {}).get(str(t), {}).get("coherent", np.nan)
                      for n in Ns]
                fl = [byN[n].get("coherent", {}).get(str(t), {}).get("fluct", np.nan)
                      for n in Ns]
                c = a_.lines[-1].get_color()
                a_.plot(Ns, np.where(np.asarray(co) > 0, co, np.nan), ls="--", color=c, lw=1)
                a_.plot(Ns, fl, ls=":", color=c, lw=1)
            Ns = np.asarray(sorted({n for a in alphas for n in tab.get((beta, a), {})}), float)
            ref = a_.lines[0].get_ydata()[0] if a_.lines else 1
            a_.plot(Ns, ref * (Ns / Ns[0]) ** (2 * beta - 2), "k-", lw=0.8, alpha=0.5,
                    label=f"N^{2 * beta - 2:.1f} (2β−2)")
            a_.plot(Ns, ref * (Ns / Ns[0]) ** (beta - 1.5), "k-.", lw=0.8, alpha=0.5,
                    label=f"N^{beta - 1.5:.2f} (β−3/2)")
            a_.set_xscale("log", base=2), a_.set_yscale("log")
            a_.set_title(f"β = {beta}, t = {t}: total (—), coherent (--), fluct. (··)")
            a_.set_xlabel("N")
            if j == 0:
                a_.set_ylabel("‖K_t − K_0‖/‖K_0‖")
            if i == 0 and j == 0:
                a_.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG / _figname("drift_vs_N", mode), dpi=110)
    plt.close(fig)
    # local slope vs displacement
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    loc = []
    for (beta, alpha), byN in tab.items():
        Ns = sorted(byN)
        for t in T_READ:
            for k in range(len(Ns) - 2):
                w = Ns[k:k + 3]
                s = slope_in_N(byN, "drift", t, w)
                Dm = float(np.mean([_series(m, "D", t) for n in w for m in byN[n]["members"]]))
                cs = coherent_slope({n: byN[n] for n in w}, "coherent", t)
                loc.append((beta, alpha, t, w[1], Dm, s["slope"], s["ci"], cs["slope"]))
                ax[0].errorbar(Dm, s["slope"] / (beta - 1), yerr=s["ci"] / abs(beta - 1),
                               color=cols[beta], marker=marks[alpha], ms=4, alpha=0.6, lw=0.6)
                if np.isfinite(cs["slope"]):
                    ax[1].scatter(Dm, cs["slope"] / (beta - 1), color=cols[beta],
                                  marker=marks[alpha], s=14, alpha=0.6)
    fits["local_slopes"] = [dict(zip(("beta", "alpha", "t", "N_mid", "D", "slope", "ci",
                                      "coherent_slope"), r)) for r in loc]
    for a_, title in zip(ax, ["total drift", "coherent part (ensemble mean)"]):
        a_.axhline(2, color="k", lw=0.8, label="2: slope 2β−2 (second order, coherent)")
        a_.axhline(1, color="k", lw=0.8, ls=":", label="1: slope β−1")
        a_.set_xscale("log")
        a_.set_ylim(-1, 6)
        a_.set_xlabel("D = ‖θ_t − θ_0‖/√N (mean over the 3 widths)")
        a_.set_ylabel("local slope d log drift / d log N, divided by (β − 1)")
        a_.set_title(title + " (3 consecutive N)")
    for b in betas:
        ax[0].plot([], [], color=cols[b], marker="o", ls="", label=f"β = {b}: (β−3/2)/(β−1) = "
                   f"{(b - 1.5) / (b - 1):.1f}")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG / _figname("drift_local_slope", mode), dpi=110)
    plt.close(fig)
    # lazy gaps
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    for (beta, alpha), byN in sorted(tab.items()):
        Ns = [n for n in sorted(byN) if byN[n]["lin"]]
        if len(Ns) < 2:
            continue
        for a_, key in zip(ax, ("lazy/output_gap", "lazy/param_gap")):
            y = [np.mean([_series(m, key, 2.0) for m in byN[n]["members"]]) for n in Ns]
            a_.plot(Ns, y, color=cols[beta], marker=marks[alpha], lw=0.8,
                    label=f"β={beta}, α={alpha}")
    for a_, key in zip(ax, ("lazy/output_gap (t = 2)", "lazy/param_gap (t = 2)")):
        a_.set_xscale("log", base=2), a_.set_yscale("log"), a_.set_xlabel("N")
        a_.set_title(key)
    ax[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(FIG / _figname("lazy_gap_vs_N", mode), dpi=110)
    plt.close(fig)
    # --- Model F --------------------------------------------------------------------------
    fb = [r for r in data["runs"] if r["recurrence"] == "feedback"]
    limf = RES / f"feedback_window_limit_{mode}.json"
    if fb:
        fits["feedback"] = {}
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        for r in sorted(fb, key=lambda r: r["N"]):
            ts = np.asarray([t for t, _ in r["members"][0]["ntk/drift_from_init"]])
            Y = np.asarray([[v for _, v in m["ntk/drift_from_init"]] for m in r["members"]])
            ax.errorbar(ts, Y.mean(0), yerr=Y.std(0, ddof=1), marker="o", ms=3, capsize=2,
                        label=f"N = {r['N']} (β = {r['beta']}, {len(Y)} seeds)")
            fits["feedback"][str(r["N"])] = {"t": ts.tolist(), "mean": Y.mean(0).tolist(),
                                             "sd": Y.std(0, ddof=1).tolist()}
        if limf.exists():
            L = json.loads(limf.read_text())
            ax.plot(L["t"], L["drift"], "k-", lw=2, label="limit K^∞_win,t (coupled limit)")
            fits["feedback"]["limit"] = L
        ax.set_xlabel("t")
        ax.set_ylabel("window-NTK drift ‖K_t − K_0‖/‖K_0‖")
        ax.set_title("Model F (α = 4): window kernel moves O(1)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(FIG / _figname("feedback_window_drift", mode), dpi=110)
        plt.close(fig)
    (RES / f"drift_{mode}_fits.json").write_text(json.dumps(fits, indent=1, default=float))
    _print_summary(fits)
    return fits


def _print_summary(f: dict) -> None:
    print(f"collapse rms(log): {f['collapse_rms_log']}")
    for k in ("power_fit", "power_fit_by_beta"):
        print(k, json.dumps(f[k], default=float))
    print("small D:", f["power_fit_D_small"], "\nlarge D:", f["power_fit_D_large"])
    print("parts:", json.dumps({k: v for k, v in f.get("parts", {}).items() if k != "rows"},
                                default=float))
    print("two-term:", f["two_term"], "\nD vs eps:", f["D_vs_eps"])
    for r in f["slopes"]:
        s = lambda k: f"{r[k]['slope']:+.3f}±{r[k]['ci']:.3f}" if k in r else "  n/a  "  # noqa
        print(f"β={r['beta']} α={r['alpha']} t={r['t']}: drift {s('drift')} (lo {s('drift_lower')}"
              f" hi {s('drift_upper')}) coh {s('coherent')} fl {s('fluct')} D {s('D')} "
              f"gap {s('lazy/output_gap')} pgap {s('lazy/param_gap')}")


def feedback_limit(mode: str, M: int = 512, J: int = 2 ** 10, dt: float = 0.1) -> None:
    """The limit window-kernel drift of Model F on the NTK callback's probes
    (ntk_rnn.limit.window), μ0 of conf/model/feedback.yaml, α = 4, rtrl:
    experiments/results/feedback_window_limit_<mode>.json."""
    from ntk_rnn.limit.feedback import FeedbackLimit, limit_cell_ntk
    from ntk_rnn.limit.window import limit_window_ntk, window_drift_curve

    p = MODES[mode]
    if mode == "quick":
        M, J, dt = 128, 256, 0.25
    t0 = time.perf_counter()
    model = MeanFieldRNN(input_dim=1, width=8, beta=0.75, recurrence="feedback",
                         init=FEEDBACK_INIT, dtype=torch.float64)
    src = VAR1()
    probes, _ = src.windows(p["n_probes"], p["L"], generator_from_seed(PROBE_SEED))
    X, Y = src.windows(M, p["L"], generator_from_seed(4242))
    # the quadrature kernel K_J against the limit cell kernel at t = 0 (last step, memory 0)
    lim0 = FeedbackLimit.from_model(model, J)
    a = torch.cat([probes[:, -1].double(), torch.zeros(len(probes), 1, dtype=torch.float64)], 1)
    Kq = limit_cell_ntk(model, a, tol=1e-7).value
    KJ = limit_window_ntk(lim0, probes.double(), cell="features")
    out = window_drift_curve(model, X.double(), Y.double(), probes.double(), 4.0,
                             [0.0] + [EVERY_T * k for k in range(1, int(HORIZON / EVERY_T) + 1)],
                             dt=dt, n_features=J, cell="features")
    out.update(M=M, J=J, dt=dt, wall_s=time.perf_counter() - t0,
               KJ_vs_quadrature_t0=float((KJ - Kq).norm() / Kq.norm()))
    (RES / f"feedback_window_limit_{mode}.json").write_text(json.dumps(out, indent=1))
    print("feedback limit:", json.dumps(out), flush=True)


class _Keep(Callback):
    """Keeps θ_0 and θ at the end of the run (for first_order_check)."""

    name = "keep"

    def on_train_start(self, state) -> None:
        self.theta0 = flat(state.model)

    def on_train_end(self, state) -> None:
        self.theta = flat(state.model)
        self.model = copy.deepcopy(state.model).requires_grad_(False)


def first_order_check(mode: str, beta: float = 0.9, alpha: float = 1.0, t: float = 2.0,
                      widths=(512, 2048, 8192), h: float = 1e-3) -> dict:
    """The first-order kernel change dK = d/ds K(θ_0 + sΔ)|_{s=0} (central difference, float64)
    of trained networks, per parameter group (Δ restricted to c, w or b), split over the ensemble
    into its coherent and fluctuating parts: theory §5 says the coherent part of dK is 0 (every
    first-order term is odd in c), so |dK| should fall like D N^{-1/2}."""
    p = MODES[mode]
    x, _ = VAR1().windows(p["n_probes"], p["L"], generator_from_seed(PROBE_SEED))
    x = x.double()
    out = {"beta": beta, "alpha": alpha, "t": t, "h": h, "rows": []}
    for N in widths:
        cbs = [_Keep()]
        tr = Trainer(model=MeanFieldRNN(input_dim=1, width=N, beta=beta, dtype=torch.float64),
                     data=VAR1(), alpha=alpha, horizon=t, callbacks=cbs, seed=0, run_dir=None,
                     ensemble_size=p["seeds"])
        tr.fit()
        row = {"N": N}
        for grp in ("all", "c", "w", "b"):
            dks, d2ks, ns, Ds = [], [], [], []
            for m in tr.members:
                k = [cb for cb in m.callbacks if isinstance(cb, _Keep)][0]
                dl = k.theta - k.theta0
                if grp != "all":
                    mask = torch.zeros_like(dl)
                    sl = {"c": slice(0, N), "w": slice(N, 2 * N), "b": slice(2 * N, 3 * N)}[grp]
                    mask[sl] = 1
                    dl = dl * mask
                mod = k.model
                load_flat(mod, k.theta0)
                K0 = kernel(mod, x)
                load_flat(mod, k.theta0 + h * dl)
                Kp = kernel(mod, x)
                load_flat(mod, k.theta0 - h * dl)
                Km = kernel(mod, x)
                dks.append((Kp - Km) / (2 * h))
                d2ks.append((Kp + Km - 2 * K0) / (2 * h * h))
                ns.append(float(K0.norm()))
                Ds.append(float(dl.norm()) / math.sqrt(N))
            c1, f1 = _split(dks, ns)
            c2, f2 = _split(d2ks, ns)
            row[grp] = {"D": float(np.mean(Ds)), "first_coherent": c1, "first_fluct": f1,
                        "second_coherent": c2, "second_fluct": f2}
        out["rows"].append(row)
        print("first-order check", json.dumps(row), flush=True)
    (RES / f"drift_{mode}_first_order.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
