"""LinearizedCallback: a linearized shadow model trained beside the network (laziness, directly).

What it computes
----------------
θ = (c, w, b) flattened in that order (P = N (d + 2) numbers), θ_0 the parameters at step 0. The
shadow is the first-order Taylor model of the network's output map at θ_0,

    f^lin_θ(x̄) = f_{θ_0}(x̄) + ∇f_{θ_0}(x̄) · (θ − θ_0),

trained online on the same stream, with the same learning rate (``state.lr`` = α_N) and the same
gradient mode (``cfg.train.gradient``) as the network. Along the stream, Ŷ_k(θ) is the output at
step k of the network that read the whole stream from step 0 (zero memory) with parameters θ;
Ŷ^(0)_k = Ŷ_k(θ_0) and G^(0)_k = ∂Ŷ_k/∂θ at θ_0 come from a frozen copy of θ_0 run along the
stream with its exact RTRL recursion (theory §3 with θ frozen: S, P, Q at θ_0, one more O(N d)
recursion per step), and

    Ŷ^lin_k = Ŷ^(0)_k + G^(0)_k · (θ^lin − θ_0),     θ^lin ← θ^lin + α_N (Y_k − Ŷ^lin_k) U^(0)_k,

U^(0)_k = G^(0)_k under ``gradient=rtrl``; under ``gradient=one_step`` U^(0)_k is the one-step
gradient at θ_0 (the network's update direction frozen at θ_0) while the prediction still uses the
exact G^(0)_k: the shadow is the network's training rule with every θ-dependent quantity expanded
to first order about θ_0 (predicting with the truncated features instead would be wrong at first
order). ``on_segment`` advances it through every element. Within a block of B elements the
recursion for the errors e_k = Y_k − Ŷ^lin_k is the unit lower-triangular system
(I + α_N tril(G Uᵀ, −1)) e = Y − Ŷ^(0) − G (θ^lin − θ_0), solved at once (exact, not an
approximation), then θ^lin += α_N Uᵀ e; the frozen network itself must be stepped element by
element (its memory is nonlinear), so the callback costs about one reference-stepper step per
element (more than the compiled training kernel): a diagnostic, exact first.

Model D: G^(0)_k = N^{-β} (S_{k+1}, c_0 P_{k+1}, c_0 Q_{k+1}) at θ_0; truncated U drops b P, b Q.
Model F (output feedback): what is linearised is the whole stream map θ ↦ Ŷ_k(θ), memory
included: the shadow's memory is m^(0)_k, the frozen θ_0 network's own fed-back output (not the
shadow's output), and G^(0)_k = D_k + g_k ∂m_k/∂θ at θ_0 (`ntk_rnn.online.feedback`), U^(0)
= D_k for ``truncated``. The probe gap then compares window maps x̄ ↦ f_θ(x̄) (feedback from m = 0)
with their Taylor model at θ_0. Other models: ConfigError naming
callbacks.linearized (their shadow model is not implemented).

Logged (``every_n_steps`` / ``every_t``; ``n_probes`` stationary windows of ``probe_length``,
drawn like the NTK callback's and fixed at the start; f(x̄) is the output at a window's last step):

- ``lazy/output_gap``    rms over probes of f_{θ_t}(x̄) − f^lin_t(x̄) (f^lin_t = f^lin at θ^lin_t)
- ``lazy/param_gap``     ‖θ_t − θ^lin_t‖ / ‖θ_t − θ_0‖ (Euclidean over all of θ; not at step 0)
- ``lazy/output_change`` rms over probes of f_{θ_t}(x̄) − f_{θ_0}(x̄), the scale of the gap
- ``lazy/stream_gap``    rms of Ŷ_k − Ŷ^lin_k over the stream elements since the last event

Final values go to ``state.metrics`` as ``lazy_output_gap``, ``lazy_param_gap``, … .
``state_dict`` carries θ_0, θ^lin − θ_0, the θ_0 network's stream state, the probes and the
accumulators: a resumed run continues the shadow exactly.

Predicted scaling with N (a prediction to be measured, not a result)
--------------------------------------------------------------------
Model D, fixed α, t, β ∈ (1/2, 1), default μ0 (c symmetric about 0, independent of (w, b)). Each
step moves unit i's parameters by α_N (Y − Ŷ) N^{-β} φ_i = O(α N^{β−2}) and the drift is coherent
over the N t steps, so θ_i(t) − θ_i(0) = ε v_i + …, ε = α t N^{β−1}, with v_i = (v_c, c u_w, c u_b)
a function of the unit's own initial parameters: v_c = E_π[(Y − h) S] does not involve c_i, while
the (w, b) velocities carry one factor c_i. Expanding the unit's output c_i S(x̄; w_i, b_i) in ε,
the order-n term has parity (−1)^{n+1} in c_i (order 0: c S, odd; order 1: Δc S + c ∇S·Δ(w, b),
even; order 2 odd; order 3 even). Summed over units with the factor N^{−β}, even terms add
coherently (N^{1−β} ε^n) and odd ones average out to their √N fluctuation (N^{1/2−β} ε^n). Order 1
is the O(α t) output change the shadow reproduces; the Hessian is block-diagonal over units, so
the gap starts at order 2, which is odd:

    lazy/output_gap ≈ A (αt)² N^{β−3/2}  +  B (αt)³ N^{2β−2}            (A, B = O(1))
                      (order 2, odd, √N)     (order 3, even, coherent)

Equivalently, in function space the gap obeys ∂_t δ = −α K_0 δ + α E_π[(Y − f_t)(K_t − K_0)], so it
is α t times the kernel drift, whose first-order part is odd (ε N^{−1/2} = α t N^{β−3/2}) and whose
second-order part is coherent (ε² = (αt)² N^{2β−2}): the two terms above again, and the same two
exponents as ``ntk/drift_from_init`` (theory §5), each with its own coefficients (so their ratio is
N-independent only where one term dominates both). Since β − 3/2 < 2β − 2 for β > 1/2, the coherent
term wins at large N: the predicted asymptotic slope of lazy/output_gap in N is 2β − 2 (−0.8, −0.5,
−0.2 at β = 0.6, 0.75, 0.9), reached from the steeper β − 3/2 (−0.9, −0.75, −0.6) beyond the
crossover N* ≈ (A / (B α t))^{1/(β−1/2)}; at small α t (or tiny learning rates, the tests' check)
the order-2 term dominates and the gap is quadratic in α. (At β = 0.6 the two slopes differ by only
0.1.) Corrections from the random initial output (N^{1/2−β}) and SGD noise enter at relative orders
N^{1/2−β} and N^{−1/2}, i.e. as (αt)² N^{−1} and α² t^{3/2} N^{β−2}: subleading. If μ0 gives c a
nonzero odd moment (E c ≠ 0 or E c³ ≠ 0), order 2 is coherent and the gap becomes (αt)² N^{β−1}
(−0.4, −0.25, −0.1). ``lazy/param_gap``: per unit θ − θ^lin comes from the change of the gradient,
O(ε) relative, a norm with no sign cancellation, so lazy/param_gap ≈ C α t N^{β−1} (slopes −0.4,
−0.25, −0.1): a direct reading of the displacement scale ε. The same holds under
``gradient=one_step`` (its directions have the same parity in c).

Model F: the window map's gradient D_k + g_k ∂m_k/∂θ involves g = ∂_s f, O(N^{1/2−β}) at θ_0 but
∂_s h_t = O(1) after training, and the memory m itself moves O(1); its window kernel moves O(1)
(the project's width sweeps: ≈ 0.4 at t = 2). Prediction: the window-level gap does not vanish
with N (slope 0); Model F is lazy in its cell f_θ(x, s), not in its window map.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor

from .. import tags as T
from ..errors import ConfigError
from ..models.family import family_of
from ..models.init import generator_from_seed
from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import ONLINE_GRADIENTS, spq_step
from .base import Callback, TrainState, check_probes

MAX_BLOCK = 64  # elements solved at once (auto block size)
BLOCK_BUDGET = 2 ** 17  # entries of one (B, P) feature block (auto block size)


def flat_params(model: MeanFieldRNN) -> Tensor:
    """θ = (c, w, b) as one vector (N (d + 2),), detached copy."""
    return torch.cat([model.c.detach(), model.w.detach().reshape(-1), model.b.detach()])


class LinearizedCallback(Callback):
    """Trains the first-order Taylor model of the network at θ_0 on the same stream and logs
    ``lazy/*`` (module docstring: exact definitions and the predicted N-scaling)."""

    name = "linearized"

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        n_probes: int = 64,
        probe_length: int = 24,
        every_t: Optional[float] = 0.125,
        probe_seed: Optional[int] = None,
        block_size: int = 0,
    ) -> None:
        super().__init__(every_n_steps, every_t)
        self.n_probes, self.probe_length = int(n_probes), int(probe_length)
        self.probe_seed = probe_seed
        self.block_size = int(block_size)
        self.probes: Optional[Tensor] = None
        self.probe_y: Optional[Tensor] = None
        self.theta0: Optional[Tensor] = None  # (P,)
        self.delta: Optional[Tensor] = None  # θ^lin − θ_0 (P,)
        self.feat: dict[str, Tensor] = {}  # θ_0 network's stream state: D {S, P, Q}, F {m, G}
        self.k = 0  # stream elements the shadow has consumed
        self.sq, self.count = 0.0, 0  # Σ (Ŷ − Ŷ^lin)² and count since the last event
        self.pending: Optional[int] = None  # an event asked for before its segment arrived
        self.last: dict[str, float] = {}
        self.last_step = -1
        self.y_lin: Optional[Tensor] = None  # Ŷ^lin of the last segment
        self.model0: Optional[MeanFieldRNN] = None
        self.J: Optional[Tensor] = None  # ∇f_{θ_0} on the probes (n, P)
        self.f0: Optional[Tensor] = None  # f_{θ_0} on the probes (n,)

    # --- validation, before any step --------------------------------------------------------
    def setup(self, state: TrainState) -> None:
        super().setup(state)
        f = f"callbacks.{self.name}"
        check_probes(state, self.name, self.n_probes, self.probe_length)
        if self.block_size < 0:
            raise ConfigError(f"{f}.block_size={self.block_size} must be >= 0 (0 = auto)")
        model = state.model
        if family_of(model).linearized is None:
            raise ConfigError(
                f"{f}: the linearized shadow model needs an ntk_rnn MeanFieldRNN (its stream "
                f"features at θ_0 are RTRL recursions); got {type(model).__name__}. Remove "
                f"{f} for this model")
        self.gradient = state.gradient  # (renamed spellings resolved by the config check)
        if self.gradient not in ONLINE_GRADIENTS:
            raise ConfigError(f"{f}: train.gradient={self.gradient!r} is not one of "
                              f"{list(ONLINE_GRADIENTS)}")
        self.dtype, self.device = model.c.dtype, model.c.device
        P = model.width * (model.input_dim + 2)
        self.B = self.block_size or max(1, min(MAX_BLOCK, BLOCK_BUDGET // P))
        gen = (state.generators["probe"] if self.probe_seed is None
               else generator_from_seed(self.probe_seed))
        X, Y = state.source.windows(self.n_probes, self.probe_length, gen)
        self.probes = X.to(self.device, self.dtype)
        self.probe_y = Y.to(self.device, self.dtype)

    # --- hooks ----------------------------------------------------------------------------
    def on_train_start(self, state: TrainState) -> None:
        model = state.model
        if self.theta0 is None:  # a fresh shadow
            if state.step != 0:
                raise ConfigError(
                    f"callbacks.{self.name}: the run resumes at step {state.step} from a "
                    "checkpoint without this callback's state; the shadow model starts from θ_0 "
                    f"at step 0, so start the run afresh (train.resume=false) to use it")
            self.theta0 = flat_params(model)
            self.delta = torch.zeros_like(self.theta0)
            self.feat = self._zero_features(model)
            self.k = 0
        elif self.theta0.numel() != model.width * (model.input_dim + 2):
            raise ConfigError(f"callbacks.{self.name}: the saved θ_0 has {self.theta0.numel()} "
                              "numbers, not the model's N (d + 2); a different model?")
        self.model0 = copy.deepcopy(model).requires_grad_(False)
        self._load_flat(self.model0, self.theta0)
        self.f0, self.J = self._probe_jacobian(self.model0, self.probes)
        if state.step == 0 and self.k == 0:
            self.log(state, 0)

    def on_segment(self, X: Tensor, Y: Tensor, y_hat: Tensor, state: TrainState) -> None:
        L = X.shape[0]
        if state.step - L != self.k:
            raise RuntimeError(
                f"callbacks.{self.name}: a segment of {L} elements ending at step {state.step} "
                f"does not follow the {self.k} elements seen so far (on_segment must cover the "
                "stream in order, each element once)")
        X = X.to(self.device, self.dtype)
        Y = Y.to(self.device, self.dtype).reshape(L)
        y_lin = torch.empty_like(Y)
        lr = float(state.lr)
        j = 0
        while j < L:
            n = min(self.B - self.k % self.B, L - j)
            y_lin[j:j + n] = self._advance(X[j:j + n], Y[j:j + n], lr)
            self.k += n
            j += n
        diff = y_hat.to(self.device, self.dtype).reshape(L) - y_lin
        self.sq += float(diff.square().sum())
        self.count += L
        self.y_lin = y_lin
        if self.pending is not None and self.pending == self.k:
            self.pending = None
            self.log(state, self.k)

    def on_step_end(self, step: int, state: TrainState) -> None:
        if step == self.k:
            self.log(state, step)
            return
        if self.pending is not None or step < self.k:
            raise RuntimeError(
                f"callbacks.{self.name}: event at step {step} but the shadow has seen {self.k} "
                "elements: the trainer must call on_segment with every element before the "
                "events of that step")
        self.pending = step

    def on_train_end(self, state: TrainState) -> None:
        if self.k != state.step:
            raise RuntimeError(
                f"callbacks.{self.name}: training ended at step {state.step} but the shadow saw "
                f"{self.k} elements (the trainer must call on_segment for every element)")
        if self.last_step != state.step:
            self.log(state, state.step)
        state.metrics.update({T.lazy_key(k): v for k, v in self.last.items()})

    # --- the θ_0 network along the stream and the shadow update -----------------------------
    def _zero_features(self, model: MeanFieldRNN) -> dict[str, Tensor]:
        N, d = model.width, model.input_dim
        z = model.c.detach().new_zeros
        if family_of(model).linearized == "feedback":
            return {"m": z(()), "G": z(N * (d + 2))}
        return {"S": z(N), "P": z(N, d), "Q": z(N)}

    def _advance(self, X: Tensor, Y: Tensor, lr: float) -> Tensor:
        """One block: the θ_0 network's outputs and features along X, then the shadow's
        predictions and update (exact, the triangular system of the module docstring)."""
        if family_of(self.model0).linearized == "feedback":
            y0, G, U = self._features_feedback(X)
        else:
            y0, G, U = self._features_diagonal(X)
        r = Y - y0 - G @ self.delta
        if X.shape[0] > 1:
            M = torch.tril(G @ U.T, diagonal=-1).mul_(lr)
            M.diagonal().add_(1.0)
            e = torch.linalg.solve_triangular(M, r.unsqueeze(1), upper=False,
                                              unitriangular=True).squeeze(1)
        else:
            e = r
        self.delta.addmv_(U.T, e, alpha=lr)
        return Y - e

    def _features_diagonal(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m0 = self.model0
        c0, w0, b0 = m0.c, m0.w, m0.b
        act, scale = m0.act, m0.output_scale
        B, N, d = X.shape[0], m0.width, m0.input_dim
        f = self.feat
        Sb, Pb, Qb, dsb = (X.new_empty(B, N), X.new_empty(B, N, d), X.new_empty(B, N),
                           X.new_empty(B, N))
        Sprev = torch.cat([f["S"].unsqueeze(0), Sb[:-1]])  # S_k; rows 1.. filled after the loop
        S, P, Q = f["S"], f["P"], f["Q"]
        for j in range(B):  # the θ_0 network's S, P, Q (theory §3), advanced in place
            dsb[j] = spq_step(act, w0, b0, X[j], S, P, Q)
            Sb[j], Pb[j], Qb[j] = S, P, Q
        Sprev[1:] = Sb[:-1]
        cs = c0 * scale
        y0 = Sb @ cs
        G = torch.cat([Sb * scale, (Pb * cs.view(1, N, 1)).reshape(B, N * d), Qb * cs], dim=1)
        if self.gradient != "one_step":
            return y0, G, G
        Pt = (dsb * cs).unsqueeze(2) * X.unsqueeze(1)  # N^{-β} c σ'(z) X_k
        U = torch.cat([Sb * scale, Pt.reshape(B, N * d), dsb * Sprev * cs], dim=1)
        return y0, G, U

    def _features_feedback(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m0 = self.model0
        c0, w0, b0 = m0.c, m0.w, m0.b
        act, scale = m0.act, m0.output_scale
        B, N, d = X.shape[0], m0.width, m0.input_dim
        cs = c0 * scale
        u = X @ w0.T
        Gbuf, y0 = u.new_empty(B, N * (d + 2)), u.new_empty(B)
        Hb, cdb = u.new_empty(B, N), u.new_empty(B, N)
        mb = torch.cat([self.feat["m"].view(1), y0[:-1]])  # m_k; rows 1.. filled after the loop
        m, G = self.feat["m"], self.feat["G"]
        for j in range(B):  # row j of Gbuf is ∂Ŷ_k/∂θ = D_k + g_k ∂m_k/∂θ (∂m_k/∂θ = row j−1)
            H, dH = act.value_and_deriv(torch.addcmul(u[j], b0, m))
            cd = torch.mul(cs, dH, out=cdb[j])  # N^{-β} c σ'(z)
            Gj = torch.mul(G, torch.dot(cd, b0), out=Gbuf[j])  # g = ∂f/∂s
            Gj[:N].add_(H, alpha=scale)
            Gj[N:N + N * d].view(N, d).addr_(cd, X[j])
            Gj[N + N * d:].addcmul_(cd, m)
            Hb[j] = H
            m = torch.dot(cs, H, out=y0[j])  # m_{k+1} = Ŷ^(0)_k
            G = Gj
        mb[1:] = y0[:-1]
        self.feat["m"].copy_(m)
        self.feat["G"].copy_(G)
        if self.gradient != "one_step":
            return y0, Gbuf, Gbuf
        U = torch.cat([Hb * scale, (cdb.unsqueeze(2) * X.unsqueeze(1)).reshape(B, N * d),
                       cdb * mb.unsqueeze(1)], dim=1)
        return y0, Gbuf, U

    # --- probes ---------------------------------------------------------------------------
    @staticmethod
    def _load_flat(model: MeanFieldRNN, theta: Tensor) -> None:
        N, d = model.width, model.input_dim
        with torch.no_grad():
            model.c.copy_(theta[:N])
            model.w.copy_(theta[N:N + N * d].view(N, d))
            model.b.copy_(theta[N + N * d:])

    @staticmethod
    @torch.no_grad()
    def _probe_jacobian(model: MeanFieldRNN, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f_θ(x̄), ∇_θ f_θ(x̄)) at the windows' last step, exact (RTRL with θ frozen):
        shapes (n,), (n, P)."""
        n, N, d = x.shape[0], model.width, model.input_dim
        scale, c = model.output_scale, model.c
        if family_of(model).linearized == "feedback":
            cs = c * scale
            m = x.new_zeros(n)
            Gc, Gw, Gb = x.new_zeros(n, N), x.new_zeros(n, N, d), x.new_zeros(n, N)
            u = x @ model.w.T  # (n, L, N)
            for k in range(x.shape[1]):
                H, dH = model.act.value_and_deriv(u[:, k] + m.unsqueeze(1) * model.b)
                cd = cs * dH
                g = (cd @ model.b).view(n, 1)
                Gc = g * Gc + H * scale
                Gw = g.unsqueeze(2) * Gw + cd.unsqueeze(2) * x[:, k].unsqueeze(1)
                Gb = g * Gb + cd * m.unsqueeze(1)
                m = H @ cs
            return m, torch.cat([Gc, Gw.reshape(n, N * d), Gb], dim=1)
        S, P, Q = model.unit_features(x)
        cs = c * scale
        J = torch.cat([S * scale, (P * cs.view(1, N, 1)).reshape(n, N * d), Q * cs], dim=1)
        return S @ cs, J

    def probe_outputs(self, model: MeanFieldRNN) -> tuple[Tensor, Tensor, Tensor]:
        """(f_{θ_t}, f^lin_t, f_{θ_0}) on the probes, f_{θ_t} from ``model`` as it is now."""
        with torch.no_grad():
            f_t = model(self.probes)[:, -1]
        return f_t, self.f0 + self.J @ self.delta, self.f0

    # --- logging --------------------------------------------------------------------------
    def log(self, state: TrainState, step: int) -> None:
        model = state.model
        f_t, f_lin, f0 = self.probe_outputs(model)
        s = {"output_gap": float((f_t - f_lin).square().mean().sqrt()),
             "output_change": float((f_t - f0).square().mean().sqrt())}
        disp = flat_params(model) - self.theta0
        dn = float(disp.norm())
        if dn > 0:
            s["param_gap"] = float((disp - self.delta).norm()) / dn
        if self.count:
            s["stream_gap"] = math.sqrt(self.sq / self.count)
            self.sq, self.count = 0.0, 0
        w = state.writer
        if w is not None:
            for k, v in s.items():
                w.add_scalar(T.lazy_tag(k), v, step)
        self.last.update(s)
        self.last_step = step

    # --- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.theta0 is None:
            return {}
        d = {"k": self.k, "theta0": self.theta0, "delta": self.delta, "feat": dict(self.feat),
             "probes": self.probes, "probe_y": self.probe_y, "sq": self.sq, "count": self.count,
             "pending": self.pending, "last": dict(self.last), "last_step": self.last_step,
             "gradient": self.gradient}
        cpu = lambda v: v.detach().cpu().clone() if isinstance(v, Tensor) else v  # noqa: E731
        d["feat"] = {k: cpu(v) for k, v in d["feat"].items()}
        return {k: cpu(v) for k, v in d.items()}

    def load_state_dict(self, d: dict) -> None:
        if not d:
            return
        if d.get("gradient", self.gradient) != self.gradient:
            raise ConfigError(f"callbacks.{self.name}: the checkpoint's shadow was trained with "
                              f"gradient={d['gradient']!r}, the run uses {self.gradient!r}")
        mv = lambda v: v.to(self.device, self.dtype).clone()  # noqa: E731
        self.k = int(d["k"])
        self.theta0, self.delta = mv(d["theta0"]), mv(d["delta"])
        self.feat = {k: mv(v) for k, v in d["feat"].items()}
        self.probes, self.probe_y = mv(d["probes"]), mv(d["probe_y"])
        self.sq, self.count = float(d["sq"]), int(d["count"])
        self.pending = d["pending"]
        self.last, self.last_step = dict(d["last"]), int(d["last_step"])
