/* fast.c: many exact online SGD steps per call (theory §3 Model D, §6 Model F), for
   ntk_rnn/online/fast.py's "kernel" backend.

   An ensemble of E members shares N and D; member e reads X + e*xs (T, D), Y + e*ys (T,) and
   writes the predictions to out + e*os (xs = 0: one shared stream). Per step k: the reduction
   Ŷ_k over the units, then ONE fused pass over the units doing {the update of step k, the forward
   and RTRL recursion of step k+1} (they share only the scalar Ŷ_k). Step k uses the parameters
   after step k-1, as the reference (online/rtrl.py, online/feedback.py) does. */
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "ntk_rnn.h"
#define NOINL static __attribute__((noinline))

/* Model D: the step of unit i (the shared recursion spq_step), returns c_i S'_i. grad: 0 exact
   (RTRL), 1 truncated. P and Q are stored as themselves after every step (spq_step from Dl = 1,
   then P = Dl U, Q = Dl V): carrying U, V across steps would save D products per unit but round
   differently at a call boundary than inside a call, so a run's result would depend on where the
   trainer's events cut it, and resume would no longer be bit-identical. */
INL real dfwd(const int grad, long i, const real *restrict c, const real *restrict w,
              const real *restrict b, real *restrict S, real *restrict Dl, real *restrict P,
              real *restrict Q, const real *restrict x) {
    real dl = 1; /* (a register: the step from P, Q themselves) */
    spq_step(w + i * D, 1, b[i], grad ? (real)0 : b[i], x, S + i, &dl, P + i * D, Q + i, 1);
    for (int j = 0; j < D; j++) P[i * D + j] *= dl;
    Q[i] *= dl;
    (void)Dl;
    return c[i] * S[i];
}

/* θ_i += g (S_i, c_i P_i, c_i Q_i), g = α_N N^{-β} (Y - Ŷ), with c from before the step */
INL void dupd(long i, real g, real *restrict c, real *restrict w, real *restrict b,
              const real *restrict S, const real *restrict Dl, const real *restrict P,
              const real *restrict Q) {
    (void)Dl;
    real gc = g * c[i];
    for (int j = 0; j < D; j++) w[i * D + j] += gc * P[i * D + j];
    b[i] += gc * Q[i];
    c[i] += g * S[i];
}

INL void dmember(const int grad, long N, long T, real *restrict c, real *restrict w,
                 real *restrict b, real *restrict S, real *restrict P, real *restrict Q,
                 real *restrict Dl, const real *restrict X, const real *restrict Y,
                 real *restrict out, real eta, real sc) {
    if (T <= 0) return;
    real acc = 0;
#pragma omp simd reduction(+ : acc)
    for (long i = 0; i < N; i++) {
        acc += dfwd(grad, i, c, w, b, S, Dl, P, Q, X);
    }
    for (long k = 0; k < T; k++) {
        const real yh = acc * sc;
        out[k] = yh;
        const real g = (Y[k] - yh) * eta;
        if (k + 1 < T) {
            const real *restrict x = X + (k + 1) * D;
            acc = 0;
#pragma omp simd reduction(+ : acc)
            for (long i = 0; i < N; i++) {
                dupd(i, g, c, w, b, S, Dl, P, Q);
                acc += dfwd(grad, i, c, w, b, S, Dl, P, Q, x);
            }
        } else {
#pragma omp simd
            for (long i = 0; i < N; i++) dupd(i, g, c, w, b, S, Dl, P, Q);
        }
    }
}

/* Model F: H = σ(w·x + b m), Ŷ = N^{-β} Σ c H; RTRL G = D + g ∂m/∂θ, g = N^{-β} Σ c σ' b */
INL void ffwd(long i, const real *restrict c, const real *restrict w, const real *restrict b,
              real *restrict H, real *restrict dH, const real *restrict x, real m, real *ay,
              real *ag) {
    real z = b[i] * m;
    for (int j = 0; j < D; j++) z += w[i * D + j] * x[j];
    real h, dh;
    act_eval(z, &h, &dh);
    H[i] = h;
    dH[i] = dh;
    *ay = c[i] * h;
    *ag = c[i] * dh * b[i];
}

INL void fupd(const int grad, long i, real g, real err, real sc, real m_old, real *restrict c,
              real *restrict w, real *restrict b, real *restrict dc, real *restrict dw,
              real *restrict db, const real *restrict H, const real *restrict dH,
              const real *restrict x) {
    real cd = c[i] * dH[i] * sc;
    if (grad == 0) {
        dc[i] = g * dc[i] + sc * H[i];
        for (int j = 0; j < D; j++) dw[i * D + j] = g * dw[i * D + j] + cd * x[j];
        db[i] = g * db[i] + cd * m_old;
    } else {
        dc[i] = sc * H[i];
        for (int j = 0; j < D; j++) dw[i * D + j] = cd * x[j];
        db[i] = cd * m_old;
    }
    c[i] += err * dc[i];
    for (int j = 0; j < D; j++) w[i * D + j] += err * dw[i * D + j];
    b[i] += err * db[i];
}

/* The forward pass of every unit and the sums Ŷ = Σ c H, g = Σ c σ' b: one function, used at a
   call's start and after every update inside it, so the rounding (vector σ, the reduction order)
   and thus a run's result do not depend on where calls cut the stream (bit-identical resume) */
NOINL void fforward(long N, const real *restrict c, const real *restrict w,
                    const real *restrict b, real *restrict H, real *restrict dH,
                    const real *restrict x, real m, real *ay, real *ag) {
    real sy = 0, sg = 0;
#pragma omp simd reduction(+ : sy, sg)
    for (long i = 0; i < N; i++) {
        real a, q;
        ffwd(i, c, w, b, H, dH, x, m, &a, &q);
        sy += a;
        sg += q;
    }
    *ay = sy;
    *ag = sg;
}

INL void fmember(const int grad, long N, long T, real *restrict c, real *restrict w,
                 real *restrict b, real *restrict dc, real *restrict dw, real *restrict db,
                 real *restrict mp, real *restrict H, real *restrict dH, const real *restrict X,
                 const real *restrict Y, real *restrict out, real lr, real sc) {
    if (T <= 0) return;
    real m = *mp, ay = 0, ag = 0;
    fforward(N, c, w, b, H, dH, X, m, &ay, &ag);
    for (long k = 0; k < T; k++) {
        const real yh = ay * sc;
        const real g = ag * sc;
        out[k] = yh;
        const real err = (Y[k] - yh) * lr;
        const real m_old = m;
        const real *restrict x = X + k * D;
        m = yh;
        ay = 0;
        ag = 0;
        if (k + 1 < T) {
            const real *restrict xn = X + (k + 1) * D;
#pragma omp simd
            for (long i = 0; i < N; i++)
                fupd(grad, i, g, err, sc, m_old, c, w, b, dc, dw, db, H, dH, x);
            fforward(N, c, w, b, H, dH, xn, m, &ay, &ag);
        } else {
#pragma omp simd
            for (long i = 0; i < N; i++)
                fupd(grad, i, g, err, sc, m_old, c, w, b, dc, dw, db, H, dH, x);
        }
    }
    *mp = m;
}

/* Exported: E members, parameters (E, N), (E, N, D), (E, N); per-member lr and scale (float64).
   diag_{rtrl,trunc}: state S, P, Q and scratch Dl (E, N). fb_{rtrl,trunc}: state dc, dw, db,
   m (E,) and scratch H, dH. */
#define DARGS                                                                                  \
    long E, long N, long T, real *c, real *w, real *b, real *S, real *P, real *Q, real *Dl,     \
        const real *X, long xs, const real *Y, long ys, real *out, long os, const double *lr,  \
        const double *scale
#define DLOOP(G)                                                                               \
    for (long e = 0; e < E; e++)                                                               \
    dmember(G, N, T, c + e * N, w + e * N * D, b + e * N, S + e * N, P + e * N * D, Q + e * N, \
            Dl + e * N, X + e * xs, Y + e * ys, out + e * os, (real)(lr[e] * scale[e]),        \
            (real)scale[e])
void EXPORT(diag_rtrl)(DARGS) { DLOOP(0); }
void EXPORT(diag_trunc)(DARGS) { DLOOP(1); }

#define FARGS                                                                                  \
    long E, long N, long T, real *c, real *w, real *b, real *dc, real *dw, real *db, real *m,   \
        real *H, real *dH, const real *X, long xs, const real *Y, long ys, real *out, long os, \
        const double *lr, const double *scale
#define FLOOP(G)                                                                               \
    for (long e = 0; e < E; e++)                                                               \
    fmember(G, N, T, c + e * N, w + e * N * D, b + e * N, dc + e * N, dw + e * N * D,          \
            db + e * N, m + e, H + e * N, dH + e * N, X + e * xs, Y + e * ys, out + e * os,    \
            (real)lr[e], (real)scale[e])
void EXPORT(fb_rtrl)(FARGS) { FLOOP(0); }
void EXPORT(fb_trunc)(FARGS) { FLOOP(1); }
