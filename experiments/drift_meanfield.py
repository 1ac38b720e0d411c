"""Issue 25, item 4: the coherent part of Model D's kernel drift from the deterministic
mean-field flow at a free displacement scale ε (the N → ∞ limit at fixed ε = N^{β−1}).

    nice python -m experiments.drift_meanfield            # ~15 min on one loaded core
    nice python -m experiments.drift_meanfield --check    # finer nodes, dτ/2, M = 256, MC

The finite-N network moves unit i by Δθ_i = ε ∫_0^τ E_π[(Y − Ŷ_u) φ_i] du + (SGD noise and the
initial output's fluctuation, O(N^{−1/2}) per unit), τ = α t, ε = N^{β−1}, φ = (S, cP, cQ).
Dropping the O(N^{−1/2}) terms leaves the characteristic flow of a population μ:

    dθ/dτ = ε E_π[(Y − Ŷ^ε) φ_θ(X̄)],   Ŷ^ε(x̄) = ε^{−1} E_μ[c S_θ(x̄)],

whose kernel change K^ε_τ − K_0 (K = E_μ[φ φᵀ] on the drift study's probes) is the ensemble mean
of the finite-N drift up to those terms: the *coherent* part. μ0 is represented by a weighted
tensor-product quadrature in (c, w, b), symmetric under c → −c (so Ŷ^ε_0 = 0 exactly); a Monte
Carlo population of 512 units was too noisy (two draws differ by up to 2× at small τ). It is
computed for a grid of ε and compared with the coherent parts measured in
experiments/results/drift_full.json.

Parity (theory §5, *The drift's coherent part*): with the population symmetric under c → −c the
flow gives δK(ε) = δK(−ε), so the coherent drift holds only even orders, ε² B_2(τ) + ε⁴ B_4(τ)
+ ...; this script measures the local exponent d log‖δK‖ / d log ε, which must → 2 as ε → 0.

Results: experiments/results/drift_meanfield.json, figure experiments/figures/drift_meanfield.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ntk_rnn import MeanFieldRNN
from ntk_rnn.data import VAR1
from ntk_rnn.limit import limit_ntk
from ntk_rnn.models.init import generator_from_seed

HERE = Path(__file__).resolve().parent
PROBE_SEED = 777  # the drift study's probes (32 windows of length 16)
# α t of the drift study: α ∈ {1/4, 1, 4}, t ∈ {1/4, 1, 2}
TAUS = (0.0625, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def features(c, w, b, x, act):
    """φ = (S, cP, cQ) at the windows' last step for populations c, w, b of shape (E, n)
    and windows x (M, L) (d = 1); returns S (E, M, n) and φ (E, M, 3n)."""
    E, n = c.shape
    M, L = x.shape
    S = x.new_zeros(E, M, n)
    P = x.new_zeros(E, M, n)
    Q = x.new_zeros(E, M, n)
    w_, b_ = w[:, None, :], b[:, None, :]
    for k in range(L):
        xk = x[None, :, k, None]
        S_new, ds = act.value_and_deriv(w_ * xk + b_ * S)
        P = ds * (xk + b_ * P)
        Q = ds * (S + b_ * Q)
        S = S_new
    return S, torch.cat([S, c[:, None, :] * P, c[:, None, :] * Q], dim=2)


def kernel(c, w, b, nu, x, act):
    """K = Σ_i ν_i φ_i φ_iᵀ on windows x, for each ε: (E, n, n)."""
    _, phi = features(c, w, b, x, act)
    return (phi * nu.repeat(3)) @ phi.transpose(1, 2)


def velocity(theta, nu, eps, X, Y, act):
    """dθ/dτ = ε E_M[(Y − Ŷ^ε) φ_θ], Ŷ^ε = ε^{−1} Σ_i ν_i c_i S_i."""
    c, w, b = theta
    S, phi = features(c, w, b, X, act)
    yhat = (c[:, None, :] * S * nu).sum(2) / eps[:, None]  # (E, M)
    r = Y[None, :] - yhat
    g = eps[:, None] * torch.einsum("em,emj->ej", r, phi) / X.shape[0]
    n = c.shape[1]
    return (g[:, :n], g[:, n:2 * n], g[:, 2 * n:]), float((r ** 2).mean())


def population(model, pairs=None, nodes=None):
    """Units (c, w, b) and weights ν (Σ ν = 1) representing μ0, symmetric under c → −c:
    ``pairs`` Monte Carlo draws of the model's law, each with its mirror (−c, w, b); or ``nodes``
    = (n_c, n_w, n_b), the tensor product of Gauss–Legendre in c ~ U[−s, s], Gauss–Legendre on
    [−7, 7] weighted by the density in w ~ N(0, s_w²) (tanh(w x) is steep in w: Gauss–Hermite
    with 24 nodes has K_0 off by 9%; with 128 Legendre nodes K_0 is within 0.25% but δK/ε² is
    still 25–55% off; 512 and 1024 nodes agree to 0.1%), Gauss–Legendre in
    b ~ U[−ρ, ρ] (d = 1; even n_c: mirror-symmetric nodes)."""
    if nodes is None:
        c0, w0, b0 = (model.c.detach()[:pairs], model.w.detach()[:pairs, 0],
                      model.b.detach()[:pairs])
        c, w, b = torch.cat([c0, -c0]), torch.cat([w0, w0]), torch.cat([b0, b0])
        return c, w, b, torch.full_like(c, 1.0 / len(c))
    law = model.init_law
    assert (law.c, law.w, law.b) == ("uniform", "normal", "uniform") and model.input_dim == 1
    xc, vc = np.polynomial.legendre.leggauss(nodes[0])
    xw, vw = np.polynomial.legendre.leggauss(nodes[1])  # on [−7, 7]: tanh(w x) is steep in w
    xw = 7.0 * xw
    vw = vw * np.exp(-xw ** 2 / 2)
    xb, vb = np.polynomial.legendre.leggauss(nodes[2])
    C, W, B = np.meshgrid(xc * law.c_scale, xw * law.w_scale, xb * law.b_bound, indexing="ij")
    V = np.einsum("i,j,k->ijk", vc / 2, vw / vw.sum(), vb / 2)
    return tuple(torch.tensor(a.ravel(), dtype=torch.float64) for a in (C, W, B, V))


def flow(eps, M, L, dtau, seed=0, pairs=None, nodes=None):
    """Heun steps of the characteristic flow for every ε at once; K and D at TAUS."""
    model = MeanFieldRNN(input_dim=1, width=max(2 * (pairs or 1), 8), dtype=torch.float64,
                         generator=generator_from_seed(seed))
    act = model.act
    c, w, b, nu = population(model, pairs, nodes)
    E = len(eps)
    c, w, b = (a.expand(E, -1).clone() for a in (c, w, b))
    src = VAR1()
    X, Y = src.windows(M, L, generator_from_seed(seed + 1))
    X, Y = X[..., 0].double(), Y.double()
    xp, _ = src.windows(32, 16, generator_from_seed(PROBE_SEED))
    xp = xp[..., 0].double()
    eps_t = torch.tensor(eps, dtype=torch.float64)
    # the model's own features must agree with this recursion
    S_ref, P_ref, Q_ref = model.unit_features(xp[..., None])
    S_me, phi_me = features(model.c.detach()[None], model.w.detach()[None, :, 0],
                            model.b.detach()[None], xp, act)
    assert torch.allclose(S_me[0], S_ref) and torch.allclose(
        phi_me[0, :, 2 * model.width:], model.c.detach() * Q_ref)
    theta0 = (c.clone(), w.clone(), b.clone())
    K0 = kernel(*theta0, nu, xp, act)
    n0 = K0.flatten(1).norm(dim=1)
    out = {str(t): {} for t in TAUS}
    theta, tau, losses = theta0, 0.0, []
    for t in TAUS:  # Heun steps of at most dτ from one read time to the next
        n = max(1, math.ceil((t - tau) / dtau - 1e-9))
        h = (t - tau) / n
        for _ in range(n):
            v1, loss = velocity(theta, nu, eps_t, X, Y, act)
            mid = tuple(p + h * v for p, v in zip(theta, v1))
            v2, _ = velocity(mid, nu, eps_t, X, Y, act)
            theta = tuple(p + h / 2 * (a + bb) for p, a, bb in zip(theta, v1, v2))
            losses.append(loss)
        tau = t
        K = kernel(*theta, nu, xp, act)
        dK = (K - K0).flatten(1).norm(dim=1) / n0
        D = torch.sqrt(sum((((p - p0) ** 2) * nu).sum(1) for p, p0 in zip(theta, theta0)))
        out[str(t)] = {"drift": dK.tolist(), "D": D.tolist()}
    out["K0"] = K0[0].tolist()
    return out


def local_slopes(eps, y):
    le, ly = np.log(eps), np.log(y)
    return ((ly[1:] - ly[:-1]) / (le[1:] - le[:-1])).tolist()


def measured():
    """The drift study's coherent parts: (β, α, t, N, ε = N^{β−1}, τ = α t, coherent, jackknife
    se, mean D)."""
    d = json.loads((HERE / "results" / "drift_full.json").read_text())
    rows = []
    for r in d["runs"]:
        if r.get("recurrence", "diagonal") != "diagonal" or not r.get("coherent"):
            continue
        N, beta, alpha = r["N"], r["beta"], r["alpha"]
        for t, v in r["coherent"].items():
            loo = np.array(v["coherent_loo"])
            E = len(loo)
            se = math.sqrt((E - 1) / E * ((loo - loo.mean()) ** 2).sum())
            Ds = [m["parity"]["D"][m["parity"]["t"].index(min(
                m["parity"]["t"], key=lambda u: abs(u - float(t))))] for m in r["members"]]
            rows.append((beta, alpha, float(t), N, N ** (beta - 1), alpha * float(t),
                         v["coherent"], se, float(np.mean(Ds))))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs=3, default=[4, 512, 4],
                   help="quadrature nodes in c, w, b (the population)")
    p.add_argument("--pairs", type=int, default=None,
                   help="a Monte Carlo population of this many mirror pairs instead")
    p.add_argument("--M", type=int, default=64, help="π-sample: training windows")
    p.add_argument("--eps-halves", type=int, nargs="+", default=[1, 3, 5, 7, 9, 11, 16],
                   help="ε = 2^(−k/2) for these k")
    p.add_argument("--L", type=int, default=24, help="their length")
    p.add_argument("--dtau", type=float, default=0.25)
    p.add_argument("--check", action="store_true",
                   help="ε = 1/2, 1/4, 1/16 with finer nodes, dτ/2, M = 256, and two Monte "
                        "Carlo populations of 256 pairs")
    p.add_argument("--nodes-convergence", action="store_true",
                   help="δK/ε² at ε = 2^−4, 2^−8, τ = 1/4, 1 for w-nodes 128..1024 (M = 128)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.nodes_convergence:
        global TAUS
        TAUS = (0.25, 1.0)
        ee = [2.0 ** -4, 2.0 ** -8]
        for nodes in [(4, 128, 4), (4, 256, 4), (4, 512, 4), (6, 256, 6), (4, 1024, 4)]:
            f = flow(ee, 128, args.L, args.dtau, nodes=nodes)
            f.pop("K0")
            print(nodes, {k: [round(x / e ** 2, 5) for x, e in zip(v["drift"], ee)]
                          for k, v in f.items()}, flush=True)
        return None
    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = dict(M=args.M, L=args.L, dtau=args.dtau, pairs=args.pairs,
                nodes=None if args.pairs else tuple(args.nodes))
    if args.check:
        sub = [0.5, 0.25, 0.0625]
        res = {"args": vars(args), "eps": sub, "runs": {}}
        path = HERE / "results" / "drift_meanfield_check.json"
        fine = tuple(int(round(n * 1.5)) for n in args.nodes)
        for key, kw in (("base", {}), ("dtau_half", dict(dtau=args.dtau / 2)),
                        ("nodes_x1.5", dict(nodes=fine)), ("M256", dict(M=256)),
                        ("mc256_seed0", dict(pairs=256, nodes=None)),
                        ("mc256_seed10", dict(pairs=256, nodes=None, seed=10))):
            kw = {**base, **kw}
            f = flow(sub, **kw)
            f.pop("K0")
            res["runs"][key] = {"kw": {k: v for k, v in kw.items()}, "flow": f}
            res["wall_seconds"] = time.time() - t0
            path.write_text(json.dumps(res, indent=1))
            print(key, {t: [round(x, 5) for x in v["drift"]] for t, v in f.items()}, flush=True)
        return
    eps = [2.0 ** (-k / 2) for k in args.eps_halves]
    f = flow(eps, **base)
    K0 = torch.tensor(f.pop("K0"))
    res = {"args": vars(args), "eps": eps, "flow": f}
    model = MeanFieldRNN(input_dim=1, width=8, dtype=torch.float64)
    xp, _ = VAR1().windows(32, 16, generator_from_seed(PROBE_SEED))
    Kq = limit_ntk(model, xp.double(), tol=1e-6).value
    res["K0_vs_limit_ntk"] = float((K0 - Kq).norm() / Kq.norm())
    res["wall_seconds"] = time.time() - t0
    name = "drift_meanfield"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))  # raw, first
    res["local_slope"] = {t: local_slopes(eps, res["flow"][t]["drift"]) for t in res["flow"]}
    res["delta_K_over_eps2"] = {t: [y / e ** 2 for y, e in zip(v["drift"], eps)]
                                for t, v in res["flow"].items()}
    res["measured"] = compare(res, measured())
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))
    figure(res, HERE / "figures" / f"{name}.png")
    print(json.dumps({t: [round(s, 3) for s in v] for t, v in res["local_slope"].items()}))
    print(json.dumps(res["measured"]["summary"], indent=1), "K0 vs limit_ntk",
          res["K0_vs_limit_ntk"], f"{res['wall_seconds']:.0f} s")


def interp(res, eps, tau, key="drift"):
    """The mean-field value at (ε, τ): linear in log-log between the ε grid points."""
    o = np.argsort(res["eps"])
    e = np.array(res["eps"])[o]
    y = np.array(res["flow"][str(tau)][key])[o]
    return float(np.exp(np.interp(np.log(eps), np.log(e), np.log(y))))


def compare(res, rows):
    """Measured coherent part against the mean-field value at the same (ε, τ)."""
    pts = []
    for beta, alpha, t, N, eps, tau, coh, se, D in rows:
        if tau not in TAUS:
            continue
        mf = interp(res, eps, tau)
        pts.append({"beta": beta, "alpha": alpha, "t": t, "N": N, "eps": eps, "tau": tau,
                    "coherent": coh, "se": se, "D": D, "mf_drift": mf,
                    "mf_D": interp(res, eps, tau, "D")})
    ok = [q for q in pts if q["coherent"] > 0]
    lr = np.log([q["coherent"] / q["mf_drift"] for q in ok])
    z = [(q["coherent"] - q["mf_drift"]) / q["se"] for q in pts if q["se"] > 0]
    # the drift study's power fit coherent = B D^p N^q, refitted on the mean-field values at
    # the same points with the mean-field D: what exponent does the grid alone produce?
    A = np.array([[1.0, math.log(q["mf_D"]), math.log(q["N"])] for q in pts])
    coef = np.linalg.lstsq(A, np.log([q["mf_drift"] for q in pts]), rcond=None)[0]
    A2 = np.array([[1.0, math.log(q["D"]), math.log(q["N"])] for q in pts])
    coef2 = np.linalg.lstsq(A2, np.log([q["mf_drift"] for q in pts]), rcond=None)[0]
    summary = {"points": len(pts), "positive": len(ok),
               "median_log_ratio_measured_over_mf": float(np.median(lr)),
               "rms_log_ratio": float(np.sqrt((lr ** 2).mean())),
               "median_abs_z": float(np.median(np.abs(z))),
               "mf_fit_p_q_vs_mf_D": [float(coef[1]), float(coef[2])],
               "mf_fit_p_q_vs_measured_D": [float(coef2[1]), float(coef2[2])]}
    return {"points": pts, "summary": summary}


def figure(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    eps = np.array(res["eps"])
    o = np.argsort(eps)
    for t in TAUS:
        y = np.array(res["flow"][str(t)]["drift"])
        ax[0].loglog(eps[o], y[o], ".-", label=f"τ = {t:g}")
        le = np.log(eps[o])
        ax[1].semilogx(np.exp((le[1:] + le[:-1]) / 2), np.diff(np.log(y[o])) / np.diff(le),
                       ".-", label=f"τ = {t:g}")
    ax[0].set(xlabel="ε = N^(β−1)", ylabel="‖K^ε_τ − K_0‖/‖K_0‖ (mean field)",
              title="coherent drift of the mean-field flow")
    ax[1].axhline(2, color="k", lw=0.8)
    ax[1].set(xlabel="ε", ylabel="local exponent d log δK / d log ε", ylim=(0, 3))
    ax[0].legend(fontsize=6)
    pts = res["measured"]["points"]
    for beta, mk in ((0.6, "o"), (0.75, "s"), (0.9, "^")):
        q = [x for x in pts if x["beta"] == beta]
        ax[2].errorbar([x["mf_drift"] for x in q], [x["coherent"] for x in q],
                       yerr=[x["se"] for x in q], fmt=mk, ms=3, lw=0.5, label=f"β = {beta}")
    lim = [1e-5, 1]
    ax[2].loglog(lim, lim, "k-", lw=0.8)
    ax[2].set(xlabel="mean-field coherent drift at (ε, τ)",
              ylabel="measured coherent part (4 seeds)", title="drift study vs mean field")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
