/* bptt.c: online SGD by truncated backpropagation through the last W elements of the stream for
   ElmanRNN and GRURNN (ntk_rnn/online/bptt.py's "kernel" engine; its module docstring says exactly
   what each step computes). The input dimension d is a run-time argument here (the -DD the loader
   passes is not used); σ and the precision come from ntk_rnn.h. */
#include <string.h>
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif

#include "ntk_rnn.h"

/* y[i] = sum_l M[i, l] v[l] for i < m (rows of length N); four rows share each load of v */
INL void mv(long m, long N, const real *restrict M, const real *restrict v, real *restrict y) {
    long i = 0;
    for (; i + 4 <= m; i += 4) {
        const real *restrict r0 = M + i * N, *restrict r1 = r0 + N, *restrict r2 = r1 + N,
                 *restrict r3 = r2 + N;
        real a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        #pragma omp simd reduction(+:a0, a1, a2, a3)
        for (long l = 0; l < N; l++) {
            const real x = v[l];
            a0 += r0[l] * x; a1 += r1[l] * x; a2 += r2[l] * x; a3 += r3[l] * x;
        }
        y[i] = a0; y[i + 1] = a1; y[i + 2] = a2; y[i + 3] = a3;
    }
    for (; i < m; i++) {
        const real *restrict r0 = M + i * N;
        real a0 = 0;
        #pragma omp simd reduction(+:a0)
        for (long l = 0; l < N; l++) a0 += r0[l] * v[l];
        y[i] = a0;
    }
}

/* y[l] += sum_i a[i] M[i, l] over i < m: four rows per pass over y */
INL void mtv(long m, long N, const real *restrict M, const real *restrict a, real *restrict y) {
    long i = 0;
    for (; i + 4 <= m; i += 4) {
        const real *restrict r0 = M + i * N, *restrict r1 = r0 + N, *restrict r2 = r1 + N,
                 *restrict r3 = r2 + N;
        const real c0 = a[i], c1 = a[i + 1], c2 = a[i + 2], c3 = a[i + 3];
        #pragma omp simd
        for (long l = 0; l < N; l++) y[l] += c0 * r0[l] + c1 * r1[l] + c2 * r2[l] + c3 * r3[l];
    }
    for (; i < m; i++) {
        const real *restrict r0 = M + i * N;
        const real c0 = a[i];
        #pragma omp simd
        for (long l = 0; l < N; l++) y[l] += c0 * r0[l];
    }
}

/* row[l] -= sum_j coef[j] V[j, l] over j < n: four rank-one terms per pass over the row */
INL void rowupd(long n, long N, real *restrict row, const real *restrict coef,
                   const real *restrict V) {
    long j = 0;
    for (; j + 4 <= n; j += 4) {
        const real *restrict v0 = V + j * N, *restrict v1 = v0 + N, *restrict v2 = v1 + N,
                 *restrict v3 = v2 + N;
        const real c0 = coef[j], c1 = coef[j + 1], c2 = coef[j + 2], c3 = coef[j + 3];
        #pragma omp simd
        for (long l = 0; l < N; l++) row[l] -= c0 * v0[l] + c1 * v1[l] + c2 * v2[l] + c3 * v3[l];
    }
    for (; j < n; j++) {
        const real *restrict v0 = V + j * N;
        const real c0 = coef[j];
        #pragma omp simd
        for (long l = 0; l < N; l++) row[l] -= c0 * v0[l];
    }
}

/* ElmanRNN, T steps of one member (see the Python module docstring).
   work: S (W+1)N | DS W N | DL W N | Z N | CF W */
static void member(long N, long d, long W, long T, long cnt,
                      real *restrict c, real *restrict w, real *restrict A, real *restrict mem,
                      real *restrict buf, const real *restrict X, const real *restrict Y,
                      real *restrict out, real lr, real so, real g, real *restrict work) {
    real *restrict S = work;
    real *restrict DS = S + (W + 1) * N;
    real *restrict DL = DS + W * N;
    real *restrict Z = DL + W * N;
    real *restrict CF = Z + N;
    for (long t = 0; t < T; t++) {
        const long n = cnt + 1;
        for (long p = 0; p < d; p++) buf[(n - 1) * d + p] = X[t * d + p];
        memcpy(S, mem, (size_t)N * sizeof(real));
        /* forward: z_j = w x_j + g A S_j, S_{j+1} = s(z_j), DS_j = s'(z_j) */
        for (long j = 0; j < n; j++) {
            const real *restrict xj = buf + j * d;
            real *restrict Sn = S + (j + 1) * N;
            real *restrict dsj = DS + j * N;
            mv(N, N, A, S + j * N, Z);
            for (long i = 0; i < N; i++) {
                real u = 0;
                for (long p = 0; p < d; p++) u += w[i * d + p] * xj[p];
                Z[i] = u + g * Z[i];
            }
            #pragma omp simd
            for (long i = 0; i < N; i++) {
                real s, ds;
                act_eval(Z[i], &s, &ds);
                Sn[i] = s;
                dsj[i] = ds;
            }
        }
        const real *restrict SL = S + n * N;
        real acc = 0;
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < N; i++) acc += c[i] * SL[i];
        const real yh = acc * so;
        out[t] = yh;
        const real es = (yh - Y[t]) * so; /* dL/dyhat * N^-beta */
        /* backward: DL_{n-1} = es c s'(z_{n-1}); DL_{j-1} = g (A^T DL_j) s'(z_{j-1}) */
        {
            real *restrict dl = DL + (n - 1) * N;
            const real *restrict ds = DS + (n - 1) * N;
            #pragma omp simd
            for (long i = 0; i < N; i++) dl[i] = es * c[i] * ds[i];
        }
        for (long j = n - 1; j > 0; j--) {
            real *restrict dp = DL + (j - 1) * N;
            const real *restrict dsp = DS + (j - 1) * N;
            for (long l = 0; l < N; l++) dp[l] = 0;
            mtv(N, N, A, DL + j * N, dp);
            #pragma omp simd
            for (long l = 0; l < N; l++) dp[l] *= g * dsp[l];
        }
        /* update with the gradients at theta_k: c -= lr es S_n, w -= lr sum_j DL_j x_j^T,
           A -= lr g sum_j DL_j S_j^T */
        #pragma omp simd
        for (long i = 0; i < N; i++) c[i] -= lr * (es * SL[i]);
        for (long i = 0; i < N; i++) {
            for (long j = 0; j < n; j++) CF[j] = lr * (g * DL[j * N + i]);
            rowupd(n, N, A + i * N, CF, S);
            for (long p = 0; p < d; p++) {
                real gw = 0;
                for (long j = 0; j < n; j++) gw += DL[j * N + i] * buf[j * d + p];
                w[i * d + p] -= lr * gw;
            }
        }
        if (n == W) { /* the oldest input leaves; the memory moves past it */
            memcpy(mem, S + N, (size_t)N * sizeof(real));
            memmove(buf, buf + d, (size_t)((W - 1) * d) * sizeof(real));
            cnt = W - 1;
        } else {
            cnt = n;
        }
    }
}

/* GRURNN (gates r, z, n as nn.GRUCell; W_hh enters as g W_hh), T steps of one member.
   work: H (W+1)N | R, Z, NN, QN: W N each | DA W 3N | DH N | A3, Q3, DQ: 3N each | CF W */
static void gru_member(long N, long d, long W, long T, long cnt, long bias,
                          real *restrict c, real *restrict Wi, real *restrict Wh, real *restrict bi,
                          real *restrict bh, real *restrict mem, real *restrict buf,
                          const real *restrict X, const real *restrict Y, real *restrict out,
                          real lr, real so, real g, real *restrict work) {
    const long N3 = 3 * N;
    real *restrict H = work;
    real *restrict Rg = H + (W + 1) * N;
    real *restrict Zg = Rg + W * N;
    real *restrict Ng = Zg + W * N;
    real *restrict Qn = Ng + W * N;
    real *restrict DA = Qn + W * N;
    real *restrict DH = DA + W * N3;
    real *restrict A3 = DH + N;
    real *restrict Q3 = A3 + N3;
    real *restrict DQ = Q3 + N3;
    real *restrict CF = DQ + N3;
    for (long t = 0; t < T; t++) {
        const long n = cnt + 1;
        for (long p = 0; p < d; p++) buf[(n - 1) * d + p] = X[t * d + p];
        memcpy(H, mem, (size_t)N * sizeof(real));
        /* forward */
        for (long j = 0; j < n; j++) {
            const real *restrict xj = buf + j * d;
            const real *restrict hj = H + j * N;
            real *restrict hn = H + (j + 1) * N;
            mv(N3, N, Wh, hj, Q3);
            for (long i = 0; i < N3; i++) {
                real u = bias ? bi[i] : (real)0;
                for (long p = 0; p < d; p++) u += Wi[i * d + p] * xj[p];
                A3[i] = u;
                Q3[i] = g * Q3[i] + (bias ? bh[i] : (real)0);
            }
            #pragma omp simd
            for (long i = 0; i < N; i++) {
                const real r = (real)1 / ((real)1 + R_EXP(-(A3[i] + Q3[i])));
                const real z = (real)1 / ((real)1 + R_EXP(-(A3[N + i] + Q3[N + i])));
                const real v = R_TANH(A3[2 * N + i] + r * Q3[2 * N + i]);
                Rg[j * N + i] = r;
                Zg[j * N + i] = z;
                Ng[j * N + i] = v;
                Qn[j * N + i] = Q3[2 * N + i];
                hn[i] = v + z * (hj[i] - v);
            }
        }
        const real *restrict HL = H + n * N;
        real acc = 0;
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < N; i++) acc += c[i] * HL[i];
        const real yh = acc * so;
        out[t] = yh;
        const real es = (yh - Y[t]) * so;
        /* backward: DH = dL/dh_{j+1}; DA_j = dL/d(gate pre-activations) [r, z, n] */
        #pragma omp simd
        for (long i = 0; i < N; i++) DH[i] = es * c[i];
        for (long j = n - 1; j >= 0; j--) {
            const real *restrict hj = H + j * N;
            real *restrict da = DA + j * N3;
            #pragma omp simd
            for (long i = 0; i < N; i++) {
                const real r = Rg[j * N + i], z = Zg[j * N + i], v = Ng[j * N + i];
                const real dh = DH[i];
                const real dan = dh * ((real)1 - z) * ((real)1 - v * v);
                const real dr = dan * Qn[j * N + i];
                da[i] = dr * r * ((real)1 - r);
                da[N + i] = dh * (hj[i] - v) * z * ((real)1 - z);
                da[2 * N + i] = dan;
                DH[i] = dh * z;
                DQ[2 * N + i] = g * (dan * r);
            }
            if (j > 0) { /* DH += g W_hh^T dq, dq = [da_r, da_z, da_n r] */
                #pragma omp simd
                for (long i = 0; i < 2 * N; i++) DQ[i] = g * da[i];
                mtv(N3, N, Wh, DQ, DH);
            }
        }
        /* update with the gradients at theta_k */
        #pragma omp simd
        for (long i = 0; i < N; i++) c[i] -= lr * (es * HL[i]);
        for (long i = 0; i < N3; i++) {
            real sa = 0, sq = 0;
            for (long j = 0; j < n; j++) {
                const real a = DA[j * N3 + i];
                const real q = i < 2 * N ? a : a * Rg[j * N + i - 2 * N];
                sa += a;
                sq += q;
                CF[j] = lr * (g * q);
            }
            rowupd(n, N, Wh + i * N, CF, H);
            for (long p = 0; p < d; p++) {
                real gw = 0;
                for (long j = 0; j < n; j++) gw += DA[j * N3 + i] * buf[j * d + p];
                Wi[i * d + p] -= lr * gw;
            }
            if (bias) {
                bi[i] -= lr * sa;
                bh[i] -= lr * sq;
            }
        }
        if (n == W) {
            memcpy(mem, H + N, (size_t)N * sizeof(real));
            memmove(buf, buf + d, (size_t)((W - 1) * d) * sizeof(real));
            cnt = W - 1;
        } else {
            cnt = n;
        }
    }
}

void EXPORT(gru_bptt)(long E, long N, long d, long W, long T, long cnt, long bias, real *c, real *Wi,
                 real *Wh, real *bi, real *bh, real *mem, real *buf, const real *X, long xs, const real *Y,
                 long ys, real *out, long os, const double *lr, double so, double g, real *work) {
    for (long e = 0; e < E; e++)
        gru_member(N, d, W, T, cnt, bias, c + e * N, Wi + e * 3 * N * d, Wh + e * 3 * N * N,
                      bias ? bi + e * 3 * N : bi, bias ? bh + e * 3 * N : bh, mem + e * N,
                      buf + e * W * d, X + e * xs, Y + e * ys, out + e * os, (real)lr[e],
                      (real)so, (real)g, work);
}

void EXPORT(elman_bptt)(long E, long N, long d, long W, long T, long cnt, real *c, real *w, real *A,
                   real *mem, real *buf, const real *X, long xs, const real *Y, long ys, real *out,
                   long os, const double *lr, double so, double g, real *work) {
    for (long e = 0; e < E; e++)
        member(N, d, W, T, cnt, c + e * N, w + e * N * d, A + e * N * N, mem + e * N,
                  buf + e * W * d, X + e * xs, Y + e * ys, out + e * os, (real)lr[e], (real)so,
                  (real)g, work);
}
