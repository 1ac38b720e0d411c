/* ntk_rnn.h: what the compiled kernels of ntk_rnn share (fast.c: online training, theory §3, §6;
   features.c: the per-unit features of the structured NTK, theory §4; bptt.c: truncated BPTT of
   ElmanRNN and GRURNN, which uses σ and the precision only).

   Compile-time parameters, passed as -D by ntk_rnn/csrc/loader.py:
     D          input dimension (>= 1)
     ACT        the activation σ: 0 tanh, 1 sigmoid, 2 erf
     NTK_FLOAT  build the float32 variant (default: float64); the exported names end in _f32/_f64
     USE_MVEC   declare glibc's vector math (libmvec), so that `omp simd` loops vectorise σ
   The loader compiles each kernel file once per precision and links both into one shared object.
*/
#ifndef NTK_RNN_H
#define NTK_RNN_H

#include <math.h>
#include <stdlib.h>

#ifndef D
#error "compile with -DD=<input dimension>"
#endif
#ifndef ACT
#error "compile with -DACT=<0 tanh | 1 sigmoid | 2 erf>"
#endif
#if ACT < 0 || ACT > 2
#error "ACT must be 0 (tanh), 1 (sigmoid) or 2 (erf)"
#endif

#ifdef NTK_FLOAT
typedef float real;
#define SFX f32
#define R_TANH tanhf
#define R_EXP expf
#define R_ERF erff
#else
typedef double real;
#define SFX f64
#define R_TANH tanh
#define R_EXP exp
#define R_ERF erf
#endif

#define NTK_CAT_(a, b) a##_##b
#define NTK_CAT(a, b) NTK_CAT_(a, b)
/* an exported function: EXPORT(features) is features_f32 or features_f64 */
#define EXPORT(name) NTK_CAT(name, SFX)
#define INL static inline __attribute__((always_inline))

#ifdef USE_MVEC
#pragma omp declare simd notinbranch
extern double tanh(double);
#pragma omp declare simd notinbranch
extern float tanhf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double erf(double);
#pragma omp declare simd notinbranch
extern float erff(float);
#endif

#if ACT == 0 && defined(NTK_FLOAT) && defined(NTK_RATIONAL_TANH)
/* tanh in float32 registers, no call: the rational minimax approximation x P(x²)/Q(x²) of Eigen
   and XLA (odd degree 13 over even degree 6) on |x| ≤ 7.9053 (where it reaches 1), |error|
   ≤ 4e-7 (the torch path's 2·sigmoid(2x) − 1 in float32: 2e-7). A kernel that is latency-bound
   on σ (features.c) defines NTK_RATIONAL_TANH; libm's tanhf is a call that spills registers. */
INL float tanh_rational(float x) {
    const float c = 7.90531110763549805f;
    x = x < c ? x : c; /* (this form maps to vminps/vmaxps) */
    x = x > -c ? x : -c;
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
}
#undef R_TANH
#define R_TANH tanh_rational
#endif

/* σ(z) and σ'(z) */
INL void act_eval(real z, real *s, real *ds) {
#if ACT == 0
    real v = R_TANH(z);
    *s = v;
    *ds = (real)1 - v * v;
#elif ACT == 1
    real v = (real)1 / ((real)1 + R_EXP(-z));
    *s = v;
    *ds = v * ((real)1 - v);
#else
    *s = R_ERF(z);
    *ds = (real)1.1283791670955126 * R_EXP(-z * z); /* 2/√π e^{-z²} */
#endif
}

/* Model D, one unit, one step: the forward pass and its RTRL recursion (theory §3), written once
   for fast.c and features.c. The textbook form (the torch reference, spq_step of
   ntk_rnn/models/recurrence.py) is

       z = w·x + b S,   S ← σ(z),   P ← σ'(z) (x + g P),   Q ← σ'(z) (S + g Q)

   (old S on the right; g = b for the exact gradient, 0 for the truncated one). Here P and Q are
   carried as P = Dl·U, Q = Dl·V with Dl = σ'(z) of the step before, which needs no σ' product
   per coordinate of P:

       z = w·x + b S,   h = g·Dl,   U ← x + h U,   V ← S + h V,   S ← σ(z),   Dl ← σ'(z)

   after which P = Dl·U and Q = Dl·V. From given P, Q: U = P, V = Q, Dl = 1; from the zero state:
   U = V = 0 (and any finite Dl). w_j = w[j * st] and U_j = U[j * st] (st = 1: a unit's row of
   w (N, D); st = the lane count: a block of units stored by input coordinate). with_u = 0 skips
   U (the features kernel's coefficient mode). with_u must be a constant at each call site, and
   a g the compiler knows to be 0 (the truncated variants) drops the h terms at compile time
   (0·U is not foldable in IEEE arithmetic; the truncated state is then exactly U = x, V = S). */
INL void spq_step(const real *restrict w, long st, real b, real g, const real *restrict x,
                  real *restrict S, real *restrict Dl, real *restrict U, real *restrict V,
                  const int with_u) {
    real z = b * *S;
    for (int j = 0; j < D; j++) z += w[j * st] * x[j];
    if (__builtin_constant_p(g) && g == 0) {
        *V = *S;
        if (with_u)
            for (int j = 0; j < D; j++) U[j * st] = x[j];
    } else {
        const real h = g * *Dl;
        *V = *S + h * *V;
        if (with_u)
            for (int j = 0; j < D; j++) U[j * st] = x[j] + h * U[j * st];
    }
    act_eval(z, S, Dl);
}

#endif /* NTK_RNN_H */
