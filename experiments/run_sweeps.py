"""Width sweeps through the public CLI, then fits, figures and RESULTS.md (theory §5, §7).

    python -m experiments.run_sweeps --mode quick            # make experiment (≤ 15 min, 2 cores)
    python -m experiments.run_sweeps --mode full             # make experiment-full
    python -m experiments.run_sweeps --mode quick --aggregate-only

Each (N, β) is one `python -m ntk_rnn.train +experiment=width_sweep train.ensemble_size=S` job
launched as a Hydra multirun (joblib launcher): its S seeds train as one ensemble, member e being
exactly the single run with seed e (``--no-ensemble`` runs one job per seed instead). Every
number below is read back from the runs' metrics.json and output_tracking.npz. Nothing here
re-implements the model or the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "experiments"

MODES = {
    "quick": dict(widths=[2**k for k in range(8, 15)], betas=[0.6, 0.75, 0.9], seeds=4, M=2048),
    "full": dict(widths=[2**k for k in range(8, 17)], betas=[0.6, 0.75, 0.9], seeds=6, M=6000),
    "smoke": dict(widths=[16, 32, 64], betas=[0.75], seeds=2, M=64),  # the pipeline's test
}
# theory §5: drift O(N^{2β−2} + N^{β−3/2}) → the slower of the two exponents; initial kernel
# error N^{-1/2}; output error O(N^{1/2−β} + N^{β−1} + N^{−1/2}); initial output N^{1/2−β}.
THEORY = {
    "initial kernel error": lambda b: -0.5,
    "kernel drift (t=2)": lambda b: max(2 * b - 2, b - 1.5),
    "output error t∈[1,2]": lambda b: max(0.5 - b, b - 1, -0.5),
    "initial output (t=0)": lambda b: 0.5 - b,
}
# Model F (theory §6). The window NTK at θ0 is the cell kernel at (x_L, m_L) plus the feedback
# term ∂_s f · N^{2β−1}⟨∂m_L/∂θ, ∂f'/∂θ⟩ + (sym.), with ∂_s f = N^{−β} Σ c_i σ'(z_i) b_i =
# O(N^{1/2−β}) and m_L = Ŷ_{L−1} = O(N^{1/2−β}): so the initial kernel error to K_cell((x_L, 0))
# falls like N^{max(1/2−β, −1/2)}, not N^{−1/2}. During training the memory becomes h_t ≠ 0, so
# the window kernel's limit itself moves with π_t: its drift tends to a nonzero limit (slope 0).
# Output error: the same orders as Model D (initial output N^{1/2−β} and the fluctuations).
THEORY_F = dict(THEORY, **{
    "initial kernel error": lambda b: max(0.5 - b, -0.5),
    "kernel drift (t=2)": lambda b: 0.0,
})


def launch(mode: str, out: Path, jobs: int, model: str, ensemble: bool = True) -> float:
    p = MODES[mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NTK_RNN_CACHE=str(out / "cache"), PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "ntk_rnn.train", "+experiment=width_sweep", f"model={model}",
            f"callbacks.output.M={p['M']}"]
    t0 = time.perf_counter()
    # one tiny run first fills the cache of the limit kernel and the limit ODE (they do not
    # depend on N, β or the seed), so the parallel jobs only read it; it runs the sweep's horizon
    # (2 N = 16 steps), since Model F's cached limit is solved up to the horizon
    subprocess.run(base + ["model.width=8", f"hydra.run.dir={out}/warmup"],
                   env=env, check=True, cwd=ROOT)
    cmd = base[:3] + ["-m"] + base[3:] + [
        "model.width=" + ",".join(map(str, p["widths"])),
        "model.beta=" + ",".join(map(str, p["betas"])),
        *(["seed=0", f"train.ensemble_size={p['seeds']}"] if ensemble
          else ["seed=" + ",".join(map(str, range(p["seeds"])))]),
        "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={out}/runs",
    ]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, check=False, cwd=ROOT)
    return time.perf_counter() - t0


def collect(out: Path) -> list[dict]:
    rows = []
    runs = out / "runs"  # one job per run, or ensemble jobs of member runs
    paths = [*runs.glob("*/metrics.json"), *runs.glob("*/member_*/metrics.json")]
    for mpath in sorted(paths):
        m = json.loads(mpath.read_text())
        if not (mpath.parent / "config.yaml").exists():  # failed before the run was built
            rows.append({"dir": mpath.parent, **m, "status": m.get("status", "failed")})
            continue
        cfg = yaml.safe_load((mpath.parent / "config.yaml").read_text())
        rows.append({"dir": mpath.parent, "width": cfg["model"]["width"],
                     "beta": cfg["model"]["beta"], "seed": cfg["seed"], **m})
    return rows


def fit_slope(rows: list[dict], key: str) -> dict:
    """log q = a + s log N: per-seed OLS slopes → mean ± 95% t-interval; also the slope of the
    seed-mean curve."""
    seeds = sorted({r["seed"] for r in rows})
    slopes = []
    for s in seeds:
        pts = sorted((r["width"], r[key]) for r in rows if r["seed"] == s and r.get(key))
        if len(pts) >= 3:
            N, q = np.array(pts, dtype=float).T
            slopes.append(np.polyfit(np.log(N), np.log(q), 1)[0])
    slopes = np.array(slopes)
    half = (stats.t.ppf(0.975, len(slopes) - 1) * slopes.std(ddof=1) / np.sqrt(len(slopes))
            if len(slopes) > 1 else float("nan"))
    return {"slope": float(slopes.mean()) if len(slopes) else float("nan"), "ci": float(half),
            "n_seeds": int(len(slopes))}


def mean_by_width(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    widths = sorted({r["width"] for r in rows})
    vals = [[r[key] for r in rows if r["width"] == n and r.get(key) is not None] for n in widths]
    keep = [i for i, v in enumerate(vals) if v]
    N = np.array([widths[i] for i in keep], float)
    mu = np.array([np.mean(vals[i]) for i in keep])
    sd = np.array([np.std(vals[i], ddof=1) if len(vals[i]) > 1 else 0.0 for i in keep])
    return N, mu, sd


def figures(rows: list[dict], figdir: Path, tag: str, theory: dict = THEORY) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    betas = sorted({r["beta"] for r in rows})
    colors = dict(zip(betas, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    results: dict = {}

    def panel(ax, key, name, floor_key=None):
        for b in betas:
            rb = [r for r in rows if r["beta"] == b]
            N, mu, sd = mean_by_width(rb, key)
            if len(N) == 0:
                continue
            f = fit_slope(rb, key)
            results[(name, b)] = f
            ax.errorbar(N, mu, yerr=sd, fmt="o-", color=colors[b], ms=4, capsize=2,
                        label=f"β={b}: slope {f['slope']:.2f}±{f['ci']:.2f}")
            th = theory[name](b)
            ax.plot(N, mu[0] * (N / N[0]) ** th, ":", color=colors[b],
                    label=f"theory N^{th:.2f}")
            if floor_key:
                Nf, fl, _ = mean_by_width(rb, floor_key)
                ax.plot(Nf, fl, "--", color=colors[b], alpha=0.5, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width N")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)

    # 1. initial kernel error: per β where theory's slope depends on β (Model F), else pooled
    fig, ax = plt.subplots(figsize=(5, 4))
    N, mu, sd = mean_by_width(rows, "ntk_initial_distance_to_limit")
    results["sqrtN_scaled_initial_error"] = dict(zip(N.astype(int).tolist(),
                                                     (mu * np.sqrt(N)).tolist()))
    if theory["initial kernel error"](0.6) != theory["initial kernel error"](0.9):
        panel(ax, "ntk_initial_distance_to_limit", "initial kernel error")
    else:
        f = fit_slope([dict(r, seed=(r["seed"], r["beta"])) for r in rows],
                      "ntk_initial_distance_to_limit")
        results[("initial kernel error", "all")] = f
        ax.errorbar(N, mu, yerr=sd, fmt="o-", ms=4, capsize=2,
                    label=f"measured: slope {f['slope']:.3f}±{f['ci']:.3f}")
        ax.plot(N, mu[0] * (N / N[0]) ** -0.5, ":", label="theory N^-0.5")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width N")
        ax.legend(fontsize=8)
    ax.set_title("‖K^N_θ0 − K_∞‖_F / ‖K_∞‖_F", fontsize=10)
    fig.tight_layout()
    fig.savefig(figdir / f"{tag}initial_kernel_error.png", dpi=110)
    plt.close(fig)
    return _width_panels(rows, results, figdir, tag, panel, plt)


def _width_panels(rows, results, figdir, tag, panel, plt) -> dict:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panel(axes[0], "ntk_drift_from_init", "kernel drift (t=2)")
    panel(axes[1], "output_rmse_band", "output error t∈[1,2]", floor_key="output_h_error_band")
    panel(axes[2], "output_rmse_t0", "initial output (t=0)")
    axes[1].set_ylabel("rms_probes(Ŷ − h_t); dashed: limit-solver error")
    fig.tight_layout()
    fig.savefig(figdir / f"{tag}width_sweep.png", dpi=110)
    plt.close(fig)

    # 4. Ŷ against h_t on a few probes over time, beta = 0.75, seed 0, three widths
    sel = sorted([r for r in rows if r["beta"] == 0.75 and r["seed"] == 0],
                 key=lambda r: r["width"])
    sel = [sel[i] for i in sorted({0, len(sel) // 2, len(sel) - 1})] if sel else []
    if sel:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
        for j, ax in enumerate(axes):
            for r, ls in zip(sel, ["-", "--", "-."]):
                tr = np.load(r["dir"] / "output_tracking.npz")
                ax.plot(tr["t"], tr["y_net"][:, j], ls, label=f"Ŷ, N={r['width']}", lw=1.2)
            tr = np.load(sel[-1]["dir"] / "output_tracking.npz")
            ax.plot(tr["t"], tr["h"][:, j], "k:", lw=2, label="limit h_t")
            ax.set_xlabel("t = k / N")
            ax.set_title(f"probe {j}", fontsize=10)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figdir / f"{tag}tracking.png", dpi=110)
        plt.close(fig)
    return results


def write_results(rows, results, out: Path, mode: str, wall: float, model: str,
                  theory: dict = THEORY) -> str:
    p = MODES[mode]
    lines = [f"### Model {'D (diagonal)' if model == 'diagonal' else 'F (feedback)'} — "
             f"{mode} mode", "",
             f"{len(rows)} runs: N = {p['widths'][0]}..{p['widths'][-1]}, β ∈ {p['betas']}, "
             f"{p['seeds']} seeds, t ∈ [0, 2], α = 4, float64, limit ODE from M = {p['M']} "
             f"windows × 2 independent π-samples. Wall time {wall / 60:.1f} min on "
             f"{platform.node()} ({os.cpu_count()} CPUs).", "",
             "| quantity | β | fitted slope (95% CI over seeds) | theory "
             f"§{5 if model == 'diagonal' else 6} |",
             "|---|---|---|---|"]
    for (name, b), f in sorted(((k, v) for k, v in results.items() if isinstance(k, tuple)),
                               key=lambda kv: (kv[0][0], str(kv[0][1]))):
        th = theory[name](0.75 if b == "all" else b)
        lines.append(f"| {name} | {b} | {f['slope']:.3f} ± {f['ci']:.3f} | {th:.2f} |")
    sq = results.get("sqrtN_scaled_initial_error", {})
    flat = ("should be flat" if theory["initial kernel error"](0.6) == -0.5
            else "flat only where N^{-1/2} dominates")
    lines += ["", f"√N · ‖K^N_θ0 − K‖/‖K‖ by N ({flat}): " +
              ", ".join(f"{n}: {v:.3f}" for n, v in sq.items()), ""]
    floor = np.mean([r["output_h_error_band"] for r in rows if r.get("output_h_error_band")])
    kerr = np.mean([r["ntk_limit_error_estimate"] for r in rows
                    if r.get("ntk_limit_error_estimate")])
    lines.append(f"Limit-solver floor (rms π-sample error of h_t, t ∈ [1, 2]): {floor:.2e}; "
                 f"limit-kernel error estimate (max entry): {kerr:.1e}.")
    for b in sorted({r["beta"] for r in rows}):
        N, mu, _ = mean_by_width([r for r in rows if r["beta"] == b], "output_rmse_band")
        lines.append(f"- β = {b}: output error by N: " +
                     ", ".join(f"{int(n)}: {v:.4f}" for n, v in zip(N, mu)))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--model", choices=["diagonal", "feedback"], default="diagonal")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--no-ensemble", action="store_true", help="one job per seed")
    ap.add_argument("--figdir", type=Path, default=HERE / "figures")
    a = ap.parse_args(argv)
    tag = "" if a.model == "diagonal" else "feedback_"
    out = a.out or (HERE / "runs" / f"{tag}{a.mode}")
    wall_file = out / "wall_s.txt"
    if not a.aggregate_only:
        wall = launch(a.mode, out, a.jobs, a.model, ensemble=not a.no_ensemble)
        wall_file.write_text(str(wall))
    wall = float(wall_file.read_text()) if wall_file.exists() else float("nan")
    rows = collect(out)
    failed = [r for r in rows if r.get("status") != "completed"]
    rows = [r for r in rows if r.get("status") == "completed"]
    print(f"{len(rows)} completed runs, {len(failed)} failed")
    if not rows:
        sys.exit(f"no completed runs under {out}/runs: see the sweep's output above")
    theory = THEORY if a.model == "diagonal" else THEORY_F
    results = figures(rows, a.figdir, f"{tag}{a.mode}_", theory)
    text = write_results(rows, results, out, a.mode, wall, a.model, theory)
    (out / "results_section.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
