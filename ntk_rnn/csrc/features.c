/* features.c: the per-unit features of the structured NTK of Model D (theory §4), for
   ntk_rnn/ntk/_features_c.py.

   For a block of units i and every window x̄ = (X_0..X_{L-1}) it computes, fused per (window,
   unit), φ_i = (S_L, c_i Q_L, c_i P_L) with the recursion of spq_step (ntk_rnn.h) from
   S_0 = P_0 = Q_0 = 0 — in the forward form, so the state of a chunk of units stays in L1 and
   nothing of length L is stored. With `coef` (the factorised P·P' term) the cP rows are skipped (left untouched) and
   the coefficients c_i a_{i,k} of P_L = Σ_k a_k X_k, Q_L = Σ_k a_k S_k go to coef (n, L, Nb):
   a_{L-1} = D_{L-1}, a_{k-1} = g D_{k-1} a_k, D_k = σ'(z_k); D_k is stored there going forward
   and turned into c a_k by the backward recursion in place.

   Units are processed in chunks of VL lanes (float32 tanh: 128, i.e. 8 AVX-512 vectors: the
   recursion is a chain through σ at every step, so several independent vectors keep the FP units
   busy; with σ a libm call, 2 vectors), each loop over the lanes of a chunk, so that `cc -O3`
   turns it into vector code.
   tanh in float32 is the inline rational approximation of ntk_rnn.h (NTK_RATIONAL_TANH: a libm
   call would spill the chunk's registers at every step). */
#if defined(__GNUC__) && !defined(__clang__)
/* GCC keeps the clamp of tanh_rational (x < c ? x : c) as a branch when comparisons may trap
   (its default -ftrapping-math), and only AVX-512's masked stores let it vectorise the lane loop
   anyway: on AVX2 (-march=x86-64-v3 or an AVX2 -march=native, GCC 12) the loop stayed scalar and
   the kernel ran slower than the torch path. Without trapping math the loops vectorise on AVX2
   too (only FP exception flags, which nothing reads, could differ); with finite math and no
   signed zeros the clamp is one vminps and one vmaxps instead of four compares and two blends
   (15% faster on AVX2; the clamp maps NaN to the bound either way, as the scalar code does).
   Clang does not trap by default. */
#pragma GCC optimize("no-trapping-math", "finite-math-only", "no-signed-zeros")
#endif
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
/* GCC's tuning for AVX-512 servers prefers 256-bit vectors (-mprefer-vector-width=256); this
   kernel is bound by its loads, stores and FMAs per unit and step, so 512-bit vectors halve them:
   the features of N = 4096, n = 128, L = 32, d = 4 went from 9.6 to 7.7 ms (Intel Xeon, 1 thread). */
#pragma GCC target("prefer-vector-width=512")
#endif
#define NTK_RATIONAL_TANH
#include "ntk_rnn.h"

#if defined(NTK_FLOAT) && ACT == 0
#define VL 128 /* σ inline (tanh_rational): 8 AVX-512 vectors in flight */
#elif defined(NTK_FLOAT)
#define VL 32 /* σ is a libmvec call, which spills the chunk's registers: 2 vectors */
#else
#define VL 16 /* float64: 2 vectors, σ a libmvec call */
#endif

/* One chunk of VL units, one window xr (L, D): out rows (stride ld) [S_L, c Q_L, c P_L]; with
   co != 0 (row stride ld) the P rows are skipped and co[k] = c a_k. trunc: the truncated
   gradient (g = 0: Q = D_{L-1} S_{L-1}, P = D_{L-1} X_{L-1}). */
INL void chunk(long L, int trunc, const real *restrict xr, const real *restrict wt, long ldw,
               const real *restrict bt, const real *restrict ct, real *restrict out,
               real *restrict co, long ld) {
    /* W, U: coordinate j of lane v at [j * VL + v]; P = Dl U, Q = Dl V (spq_step) */
    real W[D * VL], B[VL], G[VL], S[VL], Dl[VL], U[D * VL], V[VL];
    for (int v = 0; v < VL; v++) {
        for (int j = 0; j < D; j++) {
            W[j * VL + v] = wt[j * ldw + v];
            U[j * VL + v] = 0;
        }
        B[v] = bt[v];
        G[v] = trunc ? 0 : bt[v];
        S[v] = 0;
        Dl[v] = 0;
        V[v] = 0;
    }
    for (long k = 0; k < L; k++) {
        const real *restrict xk = xr + k * D;
        if (co) { /* keep D_k for the coefficients */
#pragma omp simd
            for (int v = 0; v < VL; v++) {
                spq_step(W + v, VL, B[v], G[v], xk, S + v, Dl + v, U + v, V + v, 0);
                co[k * ld + v] = Dl[v];
            }
        } else {
#pragma omp simd
            for (int v = 0; v < VL; v++)
                spq_step(W + v, VL, B[v], G[v], xk, S + v, Dl + v, U + v, V + v, 1);
        }
    }
#pragma omp simd
    for (int v = 0; v < VL; v++) {
        const real cd = ct[v] * Dl[v];
        out[v] = S[v];
        out[ld + v] = cd * V[v];
        if (!co)
            for (int j = 0; j < D; j++) out[(2 + j) * ld + v] = cd * U[j * VL + v];
    }
    if (co) { /* a_{L-1} = D_{L-1}, a_{k-1} = g D_{k-1} a_k; then c a_k */
        for (int v = 0; v < VL; v++) co[(L - 1) * ld + v] *= ct[v];
        for (long k = L - 2; k >= 0; k--) {
#pragma omp simd
            for (int v = 0; v < VL; v++) co[k * ld + v] *= G[v] * co[(k + 1) * ld + v];
        }
    }
}

/* Windows r0..r1-1 of x (n, L, D), units 0..Nb-1 (wT (D, ldw), b, c (Nb)) into phi (n, D+2, Nb)
   and coef (n, L, Nb) or 0 (see chunk). Units go in chunks of VL; a last partial chunk works on
   zero-padded copies. Returns 0, or -1 when its scratch buffer cannot be allocated. */
int EXPORT(features)(long r0, long r1, long L, long Nb, int trunc, const real *restrict x,
                     const real *restrict wT, long ldw, const real *restrict b,
                     const real *restrict c, real *restrict phi, real *restrict coef) {
    const long full = Nb - Nb % VL, rem = Nb - full;
    real *tmp = 0, pw[D * VL], pb[VL], pc[VL];
    if (rem) {
        tmp = (real *)malloc(sizeof(real) * (D + 2 + L) * VL);
        if (!tmp) return -1;
        for (int v = 0; v < VL; v++) {
            for (int j = 0; j < D; j++) pw[j * VL + v] = v < rem ? wT[j * ldw + full + v] : 0;
            pb[v] = v < rem ? b[full + v] : 0;
            pc[v] = v < rem ? c[full + v] : 0;
        }
    }
    for (long r = r0; r < r1; r++) {
        const real *restrict xr = x + r * L * D;
        real *restrict ph = phi + r * (D + 2) * Nb;
        real *restrict co = coef ? coef + r * L * Nb : 0;
        for (long u = 0; u < full; u += VL)
            chunk(L, trunc, xr, wT + u, ldw, b + u, c + u, ph + u, co ? co + u : 0, Nb);
        if (rem) {
            chunk(L, trunc, xr, pw, VL, pb, pc, tmp, co ? tmp + (D + 2) * VL : 0, VL);
            for (long row = 0; row < (co ? 2 : D + 2); row++)
                for (long v = 0; v < rem; v++) ph[row * Nb + full + v] = tmp[row * VL + v];
            if (co)
                for (long k = 0; k < L; k++)
                    for (long v = 0; v < rem; v++)
                        co[k * Nb + full + v] = tmp[(D + 2 + k) * VL + v];
        }
    }
    free(tmp);
    return 0;
}
