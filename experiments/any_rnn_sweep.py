"""Beyond the paper: width sweep of full-matrix Elman (mean-field and NTK recurrent scaling) and
GRU networks trained online, beside Model D (issues 16 and 20).

    python -m experiments.any_rnn_sweep --quick     # N = 2^6..2^8, horizon 1: a smoke run (~1 min)
    python -m experiments.any_rnn_sweep --full      # N = 2^6..2^10 (Model D to 2^11), horizon 2

One process, Python API (``ntk_rnn.Trainer``), each (model, N) one ensemble run of ``--seeds``
members trained in lockstep. Per member it records, at t = 0 and t = T:

- kernel drift ‖K_t − K_0‖_F / ‖K_0‖_F on fixed probes (``ntk/drift_from_init``);
- distance to the limit ‖K_t − K_∞‖_F / ‖K_∞‖_F (``ntk/distance_to_limit``) with K_∞ from the
  model's family (``ntk_rnn.limit.limit_ntk``): exact for Model D (quadrature) and both Elman
  scalings (closed form, theory §9); for the GRU the Monte-Carlo limit (R draws at width N′, its
  1/N′ bias estimated from N′/2 and included in its stated relative error), computed once on the
  callback's probes and reused for every N and seed;
- the running MSE over the last N steps (t ∈ [T − 1, T]), and its ratio to Model D's on the same
  seed (same data stream).

``--init-widths`` adds, without training, the distance at initialisation ‖K_0 − K_∞‖/‖K_∞‖ for
the exact-limit models at wider N (the NTK alone is cheap where training is not: BPTT costs
O(N²) per step, a run O(N³)).

Slopes: least squares of log(quantity) on log N. Reported: the pooled fit of the seed-mean curve
with a 95% bootstrap interval (seeds resampled with replacement, whole curves), and the
per-seed fits' mean ± 95% t-interval (the convention of RESULTS.md's earlier sections).
Results go to ``experiments/results/any_rnn_<mode>.json`` (rewritten after every run, so a cut
sweep keeps what it finished), figures to ``experiments/figures/any_rnn_<mode>_*.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ntk_rnn import NTKCallback, Trainer, empirical_ntk
from ntk_rnn.data import VAR1
from ntk_rnn.limit import is_exact, limit_ntk
from ntk_rnn.models import GRURNN, ElmanRNN, MeanFieldRNN

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FIGURES = HERE / "figures"

MODELS = {
    "diagonal": ("Model D (diagonal, RTRL)", lambda N: MeanFieldRNN(input_dim=1, width=N)),
    "elman_mf": ("Elman, mean-field N^-1 A", lambda N: ElmanRNN(input_dim=1, width=N,
                                                                recurrent_scaling="mean_field")),
    "elman_ntk": ("Elman, NTK N^-1/2 A", lambda N: ElmanRNN(input_dim=1, width=N,
                                                            recurrent_scaling="ntk")),
    "gru": ("GRU (N^-1/2 W_hh)", lambda N: GRURNN(input_dim=1, width=N)),
}

MODES = {
    # widths per model; horizon T; NTK probes; MC limit width N' and draws R
    "quick": dict(widths={"diagonal": [64, 128, 256], "elman_mf": [64, 128, 256],
                          "elman_ntk": [64, 128, 256], "gru": [64, 128, 256]},
                  horizon=1.0, limit_width=256, limit_draws=4),
    "full": dict(widths={"diagonal": [64, 128, 256, 512, 1024, 2048],
                         "elman_mf": [64, 128, 256, 512, 1024],
                         "elman_ntk": [64, 128, 256, 512, 1024],
                         "gru": [64, 128, 256, 512, 1024]},
                 horizon=2.0, limit_width=512, limit_draws=8),
}
ALPHA = 4.0
N_PROBES, PROBE_LENGTH, PROBE_SEED = 16, 12, 777

# limits, computed once per model on the probes of its first run (keyed by the probes' hash)
_LIMITS: dict[tuple[str, str], dict] = {}


class SharedLimitNTK(NTKCallback):
    """NTKCallback whose limit is computed once per model by this script and shared by every
    width and seed (the limit does not depend on N or the seed); ``limit_info`` records it."""

    model_key: str = ""
    limit_info: dict | None = None

    def limit_kernel(self, state):
        probes = self.probes.detach().cpu().contiguous()
        key = (self.model_key, hashlib.sha256(probes.numpy().tobytes()).hexdigest())
        if key not in _LIMITS:
            t0 = time.perf_counter()
            d = super().limit_kernel(state)
            d["wall_s"] = time.perf_counter() - t0
            d["exact"] = is_exact(state.model)
            if not d["exact"]:
                d["width"], d["draws"] = self._mc_width(state.model), self.limit_draws
            _LIMITS[key] = d
            print(f"  limit {self.model_key}: {d['method']}, relative error "
                  f"{d['relative_error']:.3g}, {d['wall_s']:.1f}s", flush=True)
        d = _LIMITS[key]
        type(self).limit_info = {k: v for k, v in d.items() if k != "value"}
        return d


def run_one(name: str, N: int, mode: dict, seeds: int, dtype: torch.dtype) -> dict:
    cb = SharedLimitNTK(every_t=mode["horizon"] / 2, n_probes=N_PROBES,
                        probe_length=PROBE_LENGTH, probe_seed=PROBE_SEED,
                        image_every_n_steps=0, histogram_every_n_steps=0,
                        limit_width=mode["limit_width"], limit_draws=mode["limit_draws"])
    cb.model_key = name
    SharedLimitNTK.limit_info = None
    model = MODELS[name][1](N).to(dtype)
    t0 = time.perf_counter()
    tr = Trainer(model=model, data=VAR1(), alpha=ALPHA, horizon=mode["horizon"],
                 callbacks=[cb], seed=0, run_dir=None, ensemble_size=seeds, tensorboard=False)
    tr.fit()
    wall = time.perf_counter() - t0
    members = []
    for m in tr.members:
        h = m.history
        drift = dict(h["ntk/drift_from_init"])
        dist = dict(h.get("ntk/distance_to_limit", []))
        n_steps = max(drift)
        members.append({
            "member": m.e, "seeds": {k: int(v) for k, v in m.seeds.items()},
            "status": m.metrics.get("status"),
            "drift_final": float(drift[n_steps]),
            "drift_mid": float(drift.get(n_steps // 2, float("nan"))),
            "distance_to_limit_initial": float(dist.get(0, float("nan"))),
            "distance_to_limit_final": float(dist.get(n_steps, float("nan"))),
            "running_mse": float(m.metrics["running_mse"]),
            "limit_error_estimate": m.metrics.get("ntk_limit_error_estimate"),
            "limit_relative_error": m.metrics.get("ntk_limit_relative_error"),
        })
    return {"model": name, "N": N, "horizon": mode["horizon"], "alpha": ALPHA,
            "gradient": tr.gradient, "backend": tr.members[0].metrics.get("backend"),
            "wall_s": wall, "stepper_s": tr.stepper_s, "members": members,
            "limit": SharedLimitNTK.limit_info}


def init_distances(name: str, widths: list[int], seeds: int, dtype: torch.dtype) -> list[dict]:
    """‖K_0 − K_∞‖/‖K_∞‖ at initialisation (no training) on the sweep's probes, ``seeds`` networks
    per width drawn with ``at_width`` (the family's own constructor), K_∞ exact."""
    base = MODELS[name][1](8).to(dtype)
    g = torch.Generator().manual_seed(PROBE_SEED)
    X, _ = VAR1().windows(N_PROBES, PROBE_LENGTH, g)
    X = X.to(dtype)
    Kinf = limit_ntk(base, X).value
    rows = []
    for N in widths:
        t0 = time.perf_counter()
        d = [float((empirical_ntk(base.at_width(N, 1000 + s), X).double() - Kinf).norm()
                   / Kinf.norm()) for s in range(seeds)]
        rows.append({"model": name, "N": N, "distances": d, "wall_s": time.perf_counter() - t0})
        print(f"  init distance {name} N={N}: mean {np.mean(d):.4g} ({rows[-1]['wall_s']:.1f}s)",
              flush=True)
    return rows


# --- analysis -----------------------------------------------------------------------------
def _table(runs: list[dict], name: str, q: str) -> tuple[np.ndarray, np.ndarray]:
    rs = sorted([r for r in runs if r["model"] == name], key=lambda r: r["N"])
    Ns = np.array([r["N"] for r in rs], float)
    Y = np.array([[mb[q] for mb in r["members"]] for r in rs], float)  # (n_N, seeds)
    return Ns, Y


def fit_slope(Ns: np.ndarray, Y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Slope of log Y on log N: pooled fit of the seed-mean log curve with a bootstrap over seeds
    (95% percentile interval), and per-seed fits' mean ± 95% t half-width."""
    ok = np.all(np.isfinite(Y) & (Y > 0), axis=1)
    Ns, Y = Ns[ok], Y[ok]
    if len(Ns) < 2:
        return {"slope": float("nan")}
    x, L = np.log(Ns), np.log(Y)
    slope = lambda m: float(np.polyfit(x, m, 1)[0])  # noqa: E731
    s = slope(L.mean(axis=1))
    rng = np.random.default_rng(seed)
    S = L.shape[1]
    boots = [slope(L[:, rng.integers(0, S, S)].mean(axis=1)) for _ in range(n_boot)]
    per = np.array([slope(L[:, j]) for j in range(S)])
    from scipy import stats
    tq = float(stats.t.ppf(0.975, S - 1)) if S > 1 else float("nan")
    return {"slope": s, "boot_lo": float(np.percentile(boots, 2.5)),
            "boot_hi": float(np.percentile(boots, 97.5)),
            "per_seed_mean": float(per.mean()),
            "per_seed_ci": float(tq * per.std(ddof=1) / math.sqrt(S)) if S > 1 else float("nan"),
            "N_range": [int(Ns.min()), int(Ns.max())]}


def analyse(runs: list[dict]) -> dict:
    # output error relative to Model D on the same seed (same data stream), where D ran that N
    D = {r["N"]: r for r in runs if r["model"] == "diagonal"}
    for r in runs:
        for j, mb in enumerate(r["members"]):
            d = D.get(r["N"])
            mb["mse_ratio_to_D"] = (mb["running_mse"] / d["members"][j]["running_mse"]
                                    if d is not None else float("nan"))
    out = {}
    for name in MODELS:
        if not any(r["model"] == name for r in runs):
            continue
        out[name] = {}
        for q in ("drift_final", "distance_to_limit_initial", "distance_to_limit_final",
                  "running_mse", "mse_ratio_to_D"):
            Ns, Y = _table(runs, name, q)
            out[name][q] = {"N": Ns.astype(int).tolist(), "mean": np.nanmean(Y, 1).tolist(),
                            "min": np.nanmin(Y, 1).tolist(), "max": np.nanmax(Y, 1).tolist(),
                            "fit": fit_slope(Ns, Y)}
    return out


def plot(runs: list[dict], summary: dict, tag: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("drift_final", "kernel drift ‖K_T − K_0‖/‖K_0‖"),
              ("distance_to_limit_final", "distance to limit ‖K_T − K_∞‖/‖K_∞‖"),
              ("running_mse", "running MSE over t ∈ [T−1, T]")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"diagonal": "k", "elman_mf": "C0", "elman_ntk": "C1", "gru": "C2"}
    T = runs[0]["horizon"]
    for ax, (q, title) in zip(axes, panels):
        for name, s in summary.items():
            d = s[q]
            N = np.array(d["N"])
            mean = np.exp(np.nanmean(np.log(np.array(_table(runs, name, q)[1])), axis=1))
            f = d["fit"]
            lab = f"{MODELS[name][0]}: slope {f['slope']:+.2f} [{f.get('boot_lo', np.nan):+.2f}, " \
                  f"{f.get('boot_hi', np.nan):+.2f}]"
            ax.plot(N, mean, "o-", color=colors[name], label=lab)
            ax.fill_between(N, d["min"], d["max"], color=colors[name], alpha=0.2)
            if q == "distance_to_limit_final":
                lim = next((r["limit"] for r in runs if r["model"] == name and r.get("limit")),
                           None)
                if lim:
                    ax.axhline(lim["relative_error"], color=colors[name], ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width N")
        ax.set_title(title + f" (t = T = {T:g})" if q != "running_mse" else title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[1].text(0.98, 0.98, "K_inf: exact for Model D and Elman, Monte Carlo for the GRU;\n"
                 "dotted: the limit's stated relative error (the floor)",
                 transform=axes[1].transAxes, fontsize=7, ha="right", va="top")
    fig.suptitle(f"Elman / GRU / Model D width sweep — VAR(1), α = {ALPHA:g}, β = 0.75, "
                 f"{len(runs[0]['members'])} seeds (band: min–max over seeds)", fontsize=11)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"any_rnn_{tag}_width_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="N = 2^6..2^8, horizon 1 (default)")
    g.add_argument("--full", action="store_true", help="N = 2^6..2^10 (D: 2^11), horizon 2")
    ap.add_argument("--seeds", type=int, default=4, help="ensemble size (seeds), default 4")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--max-width", type=int, default=None, help="cut the grid at this N")
    ap.add_argument("--float64", action="store_true", help="float64 (default float32)")
    ap.add_argument("--replot", action="store_true", help="re-analyse the saved JSON only")
    ap.add_argument("--init-widths", default=None,
                    help="comma-separated widths for the untrained distance ‖K_0 − K_∞‖ of the "
                         "exact-limit Elman models (full mode default: 2^6..2^12)")
    a = ap.parse_args(argv)
    tag = "full" if a.full else "quick"
    mode = MODES[tag]
    dtype = torch.float64 if a.float64 else torch.float32
    torch.set_num_threads(max(1, torch.get_num_threads()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"any_rnn_{tag}.json"
    if a.replot:
        data = json.loads(out_path.read_text())
        runs = data["runs"]
    else:
        names = [n for n in a.models.split(",") if n]
        grid = sorted({(N, n) for n in names for N in mode["widths"][n]
                       if a.max_width is None or N <= a.max_width},
                      key=lambda p: (p[0], list(MODELS).index(p[1])))
        runs, t_start = [], time.perf_counter()
        data = {"mode": tag, "alpha": ALPHA, "beta": 0.75, "data": "VAR1 default",
                "n_probes": N_PROBES, "probe_length": PROBE_LENGTH, "probe_seed": PROBE_SEED,
                "dtype": str(dtype).replace("torch.", ""), "seeds": a.seeds,
                "bptt_window": 32, **{k: v for k, v in mode.items() if k != "widths"},
                "machine": f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                "command": " ".join([sys.executable.split('/')[-1], "-m",
                                     "experiments.any_rnn_sweep", *(argv or sys.argv[1:])])}
        for N, name in grid:
            print(f"[{time.perf_counter() - t_start:7.1f}s] {name} N={N} ...", flush=True)
            r = run_one(name, N, mode, a.seeds, dtype)
            runs.append(r)
            print(f"    wall {r['wall_s']:.1f}s (stepper {r['stepper_s']:.1f}s): drift "
                  f"{np.mean([m['drift_final'] for m in r['members']]):.4g}, dist "
                  f"{np.mean([m['distance_to_limit_final'] for m in r['members']]):.4g}, mse "
                  f"{np.mean([m['running_mse'] for m in r['members']]):.4g}", flush=True)
            data["runs"] = runs
            data["total_wall_s"] = time.perf_counter() - t_start
            out_path.write_text(json.dumps(data, indent=1))
    data["summary"] = analyse(runs)
    iw = a.init_widths or ("64,128,256,512,1024,2048,4096" if a.full else "")
    if iw and not a.replot:
        t0 = time.perf_counter()
        rows = [r for name in ("elman_mf", "elman_ntk") if name in a.models.split(",")
                for r in init_distances(name, [int(w) for w in iw.split(",")], a.seeds, dtype)]
        data["init_distances"] = {"rows": rows, "wall_s": time.perf_counter() - t0}
    for name in ("elman_mf", "elman_ntk"):
        rows = [r for r in data.get("init_distances", {}).get("rows", []) if r["model"] == name]
        if rows:
            Ns = np.array([r["N"] for r in rows], float)
            Y = np.array([r["distances"] for r in rows], float)
            f = fit_slope(Ns, Y)
            data.setdefault("init_summary", {})[name] = {
                "N": Ns.astype(int).tolist(), "mean": Y.mean(1).tolist(), "fit": f}
            print(f"{name:10s} untrained ‖K_0 − K_∞‖/‖K_∞‖ slope {f['slope']:+.3f} boot95 "
                  f"[{f['boot_lo']:+.3f}, {f['boot_hi']:+.3f}] per-seed {f['per_seed_mean']:+.3f}"
                  f" ± {f['per_seed_ci']:.3f}  means {np.round(Y.mean(1), 5).tolist()}")
    out_path.write_text(json.dumps(data, indent=1))
    fig = plot(runs, data["summary"], tag)
    print(f"wrote {out_path} and {fig}")
    for name, s in data["summary"].items():
        for q, d in s.items():
            f = d["fit"]
            lo, hi = f.get("boot_lo", np.nan), f.get("boot_hi", np.nan)
            pm, pc = f.get("per_seed_mean", np.nan), f.get("per_seed_ci", np.nan)
            print(f"{name:10s} {q:26s} slope {f['slope']:+.3f} boot95 [{lo:+.3f}, {hi:+.3f}]"
                  f"  per-seed {pm:+.3f} ± {pc:.3f}  means {np.round(d['mean'], 5).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
