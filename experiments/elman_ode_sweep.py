"""Does a full-matrix Elman network follow its kernel ODE? Width sweep of ‖Ŷ − h_t‖ on probes
(issue 25, item 2), Elman with mean-field and NTK recurrent scaling beside Model D.

    nice python -m experiments.elman_ode_sweep --widths 256 512 1024 --seeds 4

Public API only: ``ntk_rnn.Trainer``, ``OutputTrackingCallback`` (which asks the model's family for
its limit: the closed-form Elman kernel of truncated BPTT, theory §9, or Model D's quadrature
kernel, §5) and ``ntk_rnn.limit``. For each (model, N, seed) one run of horizon T = 2 at α, β =
0.75; ``output/rmse_to_limit`` = rms over the probes of Ŷ_θ(x̄) − h_t(x̄) is read at t = 0.5, 1,
2. Slopes: least squares of log(seed-mean rmse) on log N, with a 95% interval from the per-seed
fits (mean ± t·sd/√S). The limit solution is computed once per model (cache_dir) and its own
error (π-sample spread, ``output/limit_error``) is recorded beside.

The window-length truncation of the limit (the stream's kept memory represented by training
windows of ``train_length`` steps): h_2 on the probes with train_length 24 and 48 (same M).

Results: ``experiments/results/elman_ode_<tag>.json`` (rewritten after every run), figure
``experiments/figures/elman_ode_<tag>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ntk_rnn import ElmanRNN, MeanFieldRNN, Trainer
from ntk_rnn.callbacks import OutputTrackingCallback
from ntk_rnn.data import VAR1
from ntk_rnn.limit import LimitODE, elman_limit_ntk

HERE = Path(__file__).resolve().parent
MODELS = {
    "diagonal": lambda N: MeanFieldRNN(input_dim=1, width=N),
    "elman_mf": lambda N: ElmanRNN(input_dim=1, width=N, recurrent_scaling="mean_field"),
    "elman_ntk": lambda N: ElmanRNN(input_dim=1, width=N, recurrent_scaling="ntk"),
}
TIMES = (0.5, 1.0, 2.0)


def run_one(name, N, seed, args, cache):
    cb = OutputTrackingCallback(every_n_steps=max(1, N // 4), n_probes=args.probes,
                                probe_length=args.probe_length, M=args.M, samples=2,
                                limit_tol=1e-3, probe_seed=12345, cache_dir=cache,
                                train_length=args.train_length)
    tr = Trainer(model=MODELS[name](N), data=VAR1(), alpha=args.alpha, horizon=max(TIMES),
                 callbacks=[cb], seed=seed, run_dir=None, bptt_window=args.bptt_window)
    t0 = time.time()
    metrics = tr.fit()
    hist = dict(tr.history["output/rmse_to_limit"])
    herr = dict(tr.history["output/limit_error"])
    out = {"rmse": {str(t): hist.get(int(round(t * N))) for t in TIMES},
           "limit_error": {str(t): herr.get(int(round(t * N))) for t in TIMES},
           "rmse_t0": hist.get(0), "kernel_error": metrics.get("limit_ode_kernel_error"),
           "seconds": time.time() - t0}
    return out


def fit(widths, per_seed):
    """per_seed: (S, W) rmse. Pooled slope of the seed mean; per-seed slopes' mean ± 95% t;
    and the least-squares slope of all S·W points log rmse = a + b log N with its 95% t
    interval (``ols``, ``ols_ci95``; S·W − 2 degrees of freedom)."""
    x = np.log(widths)
    pooled = float(np.polyfit(x, np.log(per_seed.mean(0)), 1)[0])
    slopes = np.array([np.polyfit(x, np.log(r), 1)[0] for r in per_seed])
    S = len(slopes)
    half = float(stats.t.ppf(0.975, S - 1) * slopes.std(ddof=1) / math.sqrt(S)) if S > 1 else \
        float("nan")
    ols = stats.linregress(np.tile(x, S), np.log(per_seed).ravel())
    ols_half = float(stats.t.ppf(0.975, per_seed.size - 2) * ols.stderr)
    return {"pooled": pooled, "mean": float(slopes.mean()), "ci95": half, "seeds": S,
            "ols": float(ols.slope), "ols_ci95": ols_half}


def truncation(name, args):
    """h_2(probes) from training windows of 24 and of 48 steps (theory §9: the stream memory),
    paired: the 24-step windows are the last 24 steps of the 48-step ones (same targets), so the
    π-sample noise largely cancels in the difference; its spread over ``samples`` = 2 draws is
    the difference's own error."""
    model = MODELS[name](8)
    src = VAR1()
    probes, _ = src.windows(args.probes, args.probe_length, torch.Generator().manual_seed(12345))
    gen = torch.Generator().manual_seed(7)
    h = {24: [], 48: []}
    for _ in range(2):
        X, Y = src.windows(args.M, 48, gen)
        for L in (24, 48):
            x = X[:, -L:]
            K = elman_limit_ntk(model, x, tol=1e-3, window=args.bptt_window).value
            Kx = elman_limit_ntk(model, probes, x, tol=1e-3, window=args.bptt_window).value
            h[L].append(LimitODE.from_kernels([K], [Y], [Kx], args.alpha).h(2.0)[0])
    d = [a - b for a, b in zip(h[24], h[48])]
    diff = float(((d[0] + d[1]) / 2).pow(2).mean().sqrt())
    se = float(((d[0] - d[1]) / 2).pow(2).mean().sqrt())  # std of the mean of 2 draws
    spread = float(((h[24][0] - h[24][1]) / 2).pow(2).mean().sqrt())
    return {"rms_h24_minus_h48": diff, "difference_error": se, "h24_sampling_error": spread,
            "paired": True}


def _reusable(args):
    """The earlier results of ``--reuse`` if they were made with the same limit and data."""
    if args.reuse is None:
        return {}
    old = json.loads(args.reuse.read_text())
    same = ("alpha", "bptt_window", "train_length", "probes", "probe_length", "M")
    diff = [k for k in same if old["args"].get(k) != getattr(args, k)]
    if diff:
        raise SystemExit(f"--reuse {args.reuse}: made with other {', '.join(diff)}")
    return old


def fits(res, args, widths=None):
    """Slopes per model and time over ``widths`` (default all) and the seeds complete at every
    one of them (at least 2)."""
    widths = widths or args.widths
    out = {}
    for name in args.models:
        seeds = [s for s in range(args.seeds)
                 if all(f"{name}/{N}/{s}" in res["runs"] for N in widths)]
        if len(seeds) < 2:
            continue
        for t in TIMES:
            arr = np.array([[res["runs"][f"{name}/{N}/{s}"]["rmse"][str(t)] for N in widths]
                            for s in seeds])
            out[f"{name}/t={t}"] = fit(np.array(widths, float), arr)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--bptt-window", type=int, default=16)
    p.add_argument("--train-length", type=int, default=24)
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--probe-length", type=int, default=24)
    p.add_argument("--M", type=int, default=256)
    p.add_argument("--tag", default="sweep")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier results JSON: its runs (and truncation check) with the same "
                        "alpha, windows, probes and M are copied, not rerun")
    p.add_argument("--seed-block", type=int, default=4,
                   help="seeds run in blocks of this size, every width and model per block, so "
                        "a cut-short sweep has complete blocks")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--analyze-only", action="store_true",
                   help="refit and redraw elman_ode_<tag>.json; also fit the widths below the "
                        "largest with every seed they have (fits_narrow)")
    p.add_argument("--truncation-only", action="store_true",
                   help="only the window-length check (train windows 24 vs 48) at --M, written "
                        "to elman_ode_<tag>.json")
    args = p.parse_args(argv)
    if args.analyze_only:
        return analyze(args)
    if args.truncation_only:
        torch.set_num_threads(args.threads)
        t0 = time.time()
        out = {"args": vars(args), "truncation": {}}
        for name in args.models:
            if name != "diagonal":
                out["truncation"][name] = truncation(name, args)
                out["truncation"][name]["seconds"] = time.time() - t0
                (HERE / "results" / f"elman_ode_{args.tag}.json").write_text(
                    json.dumps(out, indent=1))
                print(name, out["truncation"][name], flush=True)
        return None
    torch.set_num_threads(args.threads)
    out_path = HERE / "results" / f"elman_ode_{args.tag}.json"
    cache = tempfile.mkdtemp(prefix="elman_ode_")
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "runs": {}, "fits": {}, "truncation": {}, "reused": []}
    old = _reusable(args)
    start = time.time()

    def save():
        res["wall_seconds"] = time.time() - start
        out_path.write_text(json.dumps(res, indent=1))

    for name in args.models:
        if name != "diagonal":
            res["truncation"][name] = old.get("truncation", {}).get(name) or \
                truncation(name, args)
    for lo in range(0, args.seeds, args.seed_block):
        for N in args.widths:
            for name in args.models:
                for s in range(lo, min(lo + args.seed_block, args.seeds)):
                    key = f"{name}/{N}/{s}"
                    if key in old.get("runs", {}):
                        res["runs"][key] = old["runs"][key]
                        res["reused"].append(key)
                        continue
                    res["runs"][key] = run_one(name, N, s, args, cache)
                    res["fits"] = fits(res, args)
                    save()
                    print(key, res["runs"][key]["rmse"], f"{res['runs'][key]['seconds']:.0f} s",
                          flush=True)
    res["fits"] = fits(res, args)
    save()
    figure(res, HERE / "figures" / f"elman_ode_{args.tag}.png")
    print(json.dumps(res["fits"], indent=1), json.dumps(res["truncation"], indent=1))


def analyze(args):
    path = HERE / "results" / f"elman_ode_{args.tag}.json"
    res = json.loads(path.read_text())
    res["fits"] = fits(res, args)
    res["fits_narrow"] = fits(res, args, sorted(args.widths)[:-1])
    path.write_text(json.dumps(res, indent=1))
    figure(res, HERE / "figures" / f"elman_ode_{args.tag}.png")
    print(json.dumps({"fits": res["fits"], "fits_narrow": res["fits_narrow"]}, indent=1))


def figure(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TIMES), figsize=(4 * len(TIMES), 3.4), sharey=True)
    for ax, t in zip(axes, TIMES):
        for name in res["args"]["models"]:
            ws = sorted({int(k.split("/")[1]) for k in res["runs"] if k.startswith(name + "/")})
            v = [[r["rmse"][str(t)] for k, r in res["runs"].items()
                  if k.startswith(f"{name}/{N}/")] for N in ws]
            m = [np.mean(x) for x in v]
            se = [np.std(x, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0 for x in v]
            f = res["fits"].get(f"{name}/t={t}")
            lab = name + (f" ({f['ols']:.2f}±{f['ols_ci95']:.2f})" if f and "ols" in f else "")
            ax.errorbar(ws, m, yerr=se, fmt="o-", capsize=2, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"t = {t}")
        ax.set_xlabel("N")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("rms(Ŷ − h_t) on probes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
