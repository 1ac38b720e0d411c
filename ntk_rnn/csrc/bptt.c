/* bptt.c: online SGD by truncated backpropagation through the last W elements of the stream for
   ElmanRNN and GRURNN (ntk_rnn/online/bptt.py's "kernel" engine; its module docstring says exactly
   what each step computes). The input dimension d is a run-time argument here (the -DD the loader
   passes is not used); σ and the precision come from ntk_rnn.h. Each member's units are split
   over a team of POSIX threads (team_range: the result is bit-identical for any team). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
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

/* y[l] += sum_i a[i] M[i, l] over i < m, l < len (rows of stride ld): four rows per pass over y */
INL void mtv(long m, long len, long ld, const real *restrict M, const real *restrict a,
             real *restrict y) {
    long i = 0;
    for (; i + 4 <= m; i += 4) {
        const real *restrict r0 = M + i * ld, *restrict r1 = r0 + ld, *restrict r2 = r1 + ld,
                 *restrict r3 = r2 + ld;
        const real c0 = a[i], c1 = a[i + 1], c2 = a[i + 2], c3 = a[i + 3];
        #pragma omp simd
        for (long l = 0; l < len; l++) y[l] += c0 * r0[l] + c1 * r1[l] + c2 * r2[l] + c3 * r3[l];
    }
    for (; i < m; i++) {
        const real *restrict r0 = M + i * ld;
        const real c0 = a[i];
        #pragma omp simd
        for (long l = 0; l < len; l++) y[l] += c0 * r0[l];
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

/* A team of threads inside one kernel call: a barrier that spins (the waits are a few
   microseconds apart, far too short for a sleeping barrier), then yields (after ~0.1-0.2 ms:
   4000 pauses). Meant for a team no larger than the CPUs the process may use (the caller caps
   it): on fewer CPUs the spinning slows everyone down. */
typedef struct {
    atomic_uint count, gen;
    unsigned n;
} team_barrier;

static void team_wait(team_barrier *b) {
    if (b->n == 1) return;
    const unsigned g = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->gen, g + 1, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&b->gen, memory_order_acquire) == g; spins++) {
        if (spins > 4000) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
    }
}

/* each thread's row of update coefficients: W entries, padded to 64 bytes (no false sharing) */
#define CF_STRIDE(W) (((W) * (long)sizeof(real) + 63) / 64 * 64 / (long)sizeof(real))

/* Thread tid of nth owns units [lo, hi): cuts on multiples of 64, so that every unit goes through
   the same code path (4-row blocks, vector body or remainder) as with one thread, and the result
   is bit-identical for any thread count. This relies on the compiler's vector loops: no peeling
   for alignment and body/epilogue widths that divide 64 (GCC here: 16 and 8 floats); a compiler
   that did otherwise could send a unit through the scalar σ on one team and the vector σ on
   another. tests/test_bptt.py checks it for the compiler in use. */
INL void team_range(long N, int tid, int nth, long *lo, long *hi) {
    const long per = (N / nth) / 64 * 64;
    *lo = tid * per;
    *hi = tid == nth - 1 ? N : (tid + 1) * per;
}

/* The start of a step shared by both models: the new input X_t appended to the window buffer
   (n inputs now), the window's initial state H0 = the kept memory (each thread its units), then
   a barrier. */
INL void step_start(long n, long d, const real *restrict xt, real *restrict buf,
                    real *restrict H0, const real *restrict mem, long lo, long hi, int tid,
                    team_barrier *bar) {
    if (tid == 0)
        for (long p = 0; p < d; p++) buf[(n - 1) * d + p] = xt[p];
    memcpy(H0 + lo, mem + lo, (size_t)(hi - lo) * sizeof(real));
    team_wait(bar);
}

/* The end of a step: once everyone is done with the step's states H and buf, a full window
   (n = W) drops its oldest input and the memory moves to H1, the state after it. Returns the
   inputs kept for the next step. */
INL long step_end(long n, long d, long W, real *restrict buf, real *restrict mem,
                  const real *restrict H1, long lo, long hi, int tid, team_barrier *bar) {
    team_wait(bar);
    if (n < W) return n;
    memcpy(mem + lo, H1 + lo, (size_t)(hi - lo) * sizeof(real));
    if (tid == 0) memmove(buf, buf + d, (size_t)((W - 1) * d) * sizeof(real));
    return W - 1;
}

/* ElmanRNN, T steps of one member (see the Python module docstring), as thread tid of a team of
   nth (bar): each thread owns a range of units, i.e. rows of A and w for the forward mat-vecs and
   the update, and entries of the backward vectors for A^T δ (every row, its columns).
   work: S (W+1)N | DS W N | DL W N | Z N | CF CF_STRIDE(W) per thread */
static void member(long N, long d, long W, long T, long cnt,
                      real *restrict c, real *restrict w, real *restrict A, real *restrict mem,
                      real *restrict buf, const real *restrict X, const real *restrict Y,
                      real *restrict out, real lr, real so, real g, real *restrict work,
                      int tid, int nth, team_barrier *bar) {
    real *restrict S = work;
    real *restrict DS = S + (W + 1) * N;
    real *restrict DL = DS + W * N;
    real *restrict Z = DL + W * N;
    real *restrict CF = Z + N + tid * CF_STRIDE(W);
    long lo, hi;
    team_range(N, tid, nth, &lo, &hi);
    for (long t = 0; t < T; t++) {
        const long n = cnt + 1;
        step_start(n, d, X + t * d, buf, S, mem, lo, hi, tid, bar);
        /* forward: z_j = w x_j + g A S_j, S_{j+1} = s(z_j), DS_j = s'(z_j) */
        for (long j = 0; j < n; j++) {
            const real *restrict xj = buf + j * d;
            real *restrict Sn = S + (j + 1) * N;
            real *restrict dsj = DS + j * N;
            mv(hi - lo, N, A + lo * N, S + j * N, Z + lo);
            for (long i = lo; i < hi; i++) {
                real u = 0;
                for (long p = 0; p < d; p++) u += w[i * d + p] * xj[p];
                Z[i] = u + g * Z[i];
            }
            #pragma omp simd
            for (long i = lo; i < hi; i++) {
                real s, ds;
                act_eval(Z[i], &s, &ds);
                Sn[i] = s;
                dsj[i] = ds;
            }
            team_wait(bar);
        }
        const real *restrict SL = S + n * N;
        real acc = 0; /* every thread sums all units, in the same order */
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < N; i++) acc += c[i] * SL[i];
        const real yh = acc * so;
        if (tid == 0) out[t] = yh;
        const real es = (yh - Y[t]) * so; /* dL/dyhat * N^-beta */
        /* backward: DL_{n-1} = es c s'(z_{n-1}); DL_{j-1} = g (A^T DL_j) s'(z_{j-1}) */
        {
            real *restrict dl = DL + (n - 1) * N;
            const real *restrict ds = DS + (n - 1) * N;
            #pragma omp simd
            for (long i = lo; i < hi; i++) dl[i] = es * c[i] * ds[i];
        }
        team_wait(bar);
        for (long j = n - 1; j > 0; j--) {
            real *restrict dp = DL + (j - 1) * N;
            const real *restrict dsp = DS + (j - 1) * N;
            for (long l = lo; l < hi; l++) dp[l] = 0;
            mtv(N, hi - lo, N, A + lo, DL + j * N, dp + lo);
            #pragma omp simd
            for (long l = lo; l < hi; l++) dp[l] *= g * dsp[l];
            team_wait(bar);
        }
        /* update with the gradients at theta_k: c -= lr es S_n, w -= lr sum_j DL_j x_j^T,
           A -= lr g sum_j DL_j S_j^T */
        #pragma omp simd
        for (long i = lo; i < hi; i++) c[i] -= lr * (es * SL[i]);
        for (long i = lo; i < hi; i++) {
            for (long j = 0; j < n; j++) CF[j] = lr * (g * DL[j * N + i]);
            rowupd(n, N, A + i * N, CF, S);
            for (long p = 0; p < d; p++) {
                real gw = 0;
                for (long j = 0; j < n; j++) gw += DL[j * N + i] * buf[j * d + p];
                w[i * d + p] -= lr * gw;
            }
        }
        cnt = step_end(n, d, W, buf, mem, S + N, lo, hi, tid, bar);
    }
}

/* GRURNN (gates r, z, n as nn.GRUCell; W_hh enters as g W_hh), T steps of one member, as thread
   tid of a team of nth (bar): each thread owns a range of units, i.e. their three gate rows of
   W_hh, W_ih and the biases, and their entries of the backward vector DH.
   work: H (W+1)N | R, Z, NN, QN: W N each | DA W 3N | DH N | A3, Q3, DQ: 3N each |
   CF CF_STRIDE(W) per thread */
static void gru_member(long N, long d, long W, long T, long cnt, long bias,
                          real *restrict c, real *restrict Wi, real *restrict Wh, real *restrict bi,
                          real *restrict bh, real *restrict mem, real *restrict buf,
                          const real *restrict X, const real *restrict Y, real *restrict out,
                          real lr, real so, real g, real *restrict work, int tid, int nth,
                          team_barrier *bar) {
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
    real *restrict CF = DQ + N3 + tid * CF_STRIDE(W);
    long lo, hi;
    team_range(N, tid, nth, &lo, &hi);
    for (long t = 0; t < T; t++) {
        const long n = cnt + 1;
        step_start(n, d, X + t * d, buf, H, mem, lo, hi, tid, bar);
        /* forward */
        for (long j = 0; j < n; j++) {
            const real *restrict xj = buf + j * d;
            const real *restrict hj = H + j * N;
            real *restrict hn = H + (j + 1) * N;
            for (long q = 0; q < 3; q++) { /* the rows of this thread's units in gate q */
                const long r0 = q * N + lo, r1 = q * N + hi;
                mv(r1 - r0, N, Wh + r0 * N, hj, Q3 + r0);
                for (long i = r0; i < r1; i++) {
                    real u = bias ? bi[i] : (real)0;
                    for (long p = 0; p < d; p++) u += Wi[i * d + p] * xj[p];
                    A3[i] = u;
                    Q3[i] = g * Q3[i] + (bias ? bh[i] : (real)0);
                }
            }
            #pragma omp simd
            for (long i = lo; i < hi; i++) {
                const real r = (real)1 / ((real)1 + R_EXP(-(A3[i] + Q3[i])));
                const real z = (real)1 / ((real)1 + R_EXP(-(A3[N + i] + Q3[N + i])));
                const real v = R_TANH(A3[2 * N + i] + r * Q3[2 * N + i]);
                Rg[j * N + i] = r;
                Zg[j * N + i] = z;
                Ng[j * N + i] = v;
                Qn[j * N + i] = Q3[2 * N + i];
                hn[i] = v + z * (hj[i] - v);
            }
            team_wait(bar);
        }
        const real *restrict HL = H + n * N;
        real acc = 0; /* every thread sums all units, in the same order */
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < N; i++) acc += c[i] * HL[i];
        const real yh = acc * so;
        if (tid == 0) out[t] = yh;
        const real es = (yh - Y[t]) * so;
        /* backward: DH = dL/dh_{j+1}; DA_j = dL/d(gate pre-activations) [r, z, n] */
        #pragma omp simd
        for (long i = lo; i < hi; i++) DH[i] = es * c[i];
        for (long j = n - 1; j >= 0; j--) {
            const real *restrict hj = H + j * N;
            real *restrict da = DA + j * N3;
            #pragma omp simd
            for (long i = lo; i < hi; i++) {
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
                for (long q = 0; q < 2; q++) {
                    #pragma omp simd
                    for (long i = q * N + lo; i < q * N + hi; i++) DQ[i] = g * da[i];
                }
                team_wait(bar);
                mtv(N3, hi - lo, N, Wh + lo, DQ, DH + lo);
            }
            team_wait(bar);
        }
        /* update with the gradients at theta_k */
        #pragma omp simd
        for (long i = lo; i < hi; i++) c[i] -= lr * (es * HL[i]);
        for (long q = 0; q < 3; q++)
            for (long i = q * N + lo; i < q * N + hi; i++) {
                real sa = 0, sq = 0;
                for (long j = 0; j < n; j++) {
                    const real a = DA[j * N3 + i];
                    const real qv = i < 2 * N ? a : a * Rg[j * N + i - 2 * N];
                    sa += a;
                    sq += qv;
                    CF[j] = lr * (g * qv);
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
        cnt = step_end(n, d, W, buf, mem, H + N, lo, hi, tid, bar);
    }
}

typedef struct {
    team_barrier bar; /* bar.n: the threads that run */
    atomic_int go;    /* 0: wait, 1: run */
} team_t;

/* the arguments of one kernel call (gru: the GRU, else Elman with w = Wi, A = Wh) */
typedef struct {
    int gru;
    long E, N, d, W, T, cnt, bias;
    real *c, *Wi, *Wh, *bi, *bh, *mem, *buf;
    const real *X, *Y;
    long xs, ys, os;
    real *out;
    const double *lr;
    double so, g;
    real *work;
    int tid;
    team_t *team;
} job_t;

static void *team_main(void *arg) {
    const job_t *j = (const job_t *)arg;
    team_t *team = j->team;
    while (!atomic_load_explicit(&team->go, memory_order_acquire)) sched_yield();
    const long N = j->N, d = j->d, W = j->W, nth = (long)team->bar.n;
    for (long e = 0; e < j->E; e++) {
        const real lr = (real)j->lr[e];
        if (j->gru)
            gru_member(N, d, W, j->T, j->cnt, j->bias, j->c + e * N, j->Wi + e * 3 * N * d,
                       j->Wh + e * 3 * N * N, j->bias ? j->bi + e * 3 * N : j->bi,
                       j->bias ? j->bh + e * 3 * N : j->bh, j->mem + e * N, j->buf + e * W * d,
                       j->X + e * j->xs, j->Y + e * j->ys, j->out + e * j->os, lr, (real)j->so,
                       (real)j->g, j->work, j->tid, (int)nth, &team->bar);
        else
            member(N, d, W, j->T, j->cnt, j->c + e * N, j->Wi + e * N * d, j->Wh + e * N * N,
                   j->mem + e * N, j->buf + e * W * d, j->X + e * j->xs, j->Y + e * j->ys,
                   j->out + e * j->os, lr, (real)j->so, (real)j->g, j->work, j->tid, (int)nth,
                   &team->bar);
    }
    return 0;
}

/* Runs job on up to nth threads (fewer when N is small or a thread cannot be started): this
   one and nth - 1 new ones. Returns how many ran. */
static long run_team(job_t job, long nth) {
    enum { MAX_TEAM = 64 };
    if (nth > MAX_TEAM) nth = MAX_TEAM;
    if (nth > job.N / 64) nth = job.N / 64;
    if (nth < 1) nth = 1;
    team_t team;
    atomic_init(&team.bar.count, 0);
    atomic_init(&team.bar.gen, 0);
    atomic_init(&team.go, 0);
    job_t jobs[MAX_TEAM];
    pthread_t th[MAX_TEAM];
    for (int t = 0; t < nth; t++) {
        jobs[t] = job;
        jobs[t].tid = t;
        jobs[t].team = &team;
    }
    int started = 1;
    while (started < nth && !pthread_create(&th[started], 0, team_main, &jobs[started]))
        started++;
    team.bar.n = (unsigned)started; /* (read by the team only after go) */
    atomic_store_explicit(&team.go, 1, memory_order_release);
    team_main(&jobs[0]);
    for (int t = 1; t < started; t++) pthread_join(th[t], 0);
    return started;
}

/* The exported kernels: E members, each on a team of up to nth threads sharing its units
   (team_range); the result does not depend on the team. work: see member / gru_member (CF once
   per thread). Return the number of threads that ran. */
long EXPORT(gru_bptt)(long E, long N, long d, long W, long T, long cnt, long bias, real *c,
                      real *Wi, real *Wh, real *bi, real *bh, real *mem, real *buf, const real *X,
                      long xs, const real *Y, long ys, real *out, long os, const double *lr,
                      double so, double g, real *work, long nth) {
    const job_t job = {1, E, N, d, W, T, cnt, bias, c, Wi, Wh, bi, bh, mem, buf, X, Y, xs, ys,
                       os, out, lr, so, g, work, 0, 0};
    return run_team(job, nth);
}

long EXPORT(elman_bptt)(long E, long N, long d, long W, long T, long cnt, real *c, real *w,
                        real *A, real *mem, real *buf, const real *X, long xs, const real *Y,
                        long ys, real *out, long os, const double *lr, double so, double g,
                        real *work, long nth) {
    const job_t job = {0, E, N, d, W, T, cnt, 0, c, w, A, 0, 0, mem, buf, X, Y, xs, ys, os, out,
                       lr, so, g, work, 0, 0};
    return run_team(job, nth);
}
