/* ntk_rnn.h: what the compiled kernels of ntk_rnn share (fast.c: online training, theory §3, §6;
   features.c: the per-unit features of the structured NTK, theory §4).

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
   for both kernels:

       z = w·x + b S,   S ← σ(z),   Q ← σ'(z) (S + g Q),   P_j ← σ'(z) (x_j + g P_j),

   with the S from before the step on the right; g = b for the exact gradient, 0 for the truncated
   one. w_j = w[j * st] and P_j = P[j * st] (st = 1: a unit's row of w (N, D); st = the lane
   count: a block of units stored by input coordinate). P = 0 skips the P update (the features
   kernel's coefficient mode). Returns σ'(z). */
INL real spq_step(const real *restrict w, long st, real b, real g, const real *restrict x,
                  real *restrict S, real *restrict P, real *restrict Q) {
    real z = b * *S;
    for (int j = 0; j < D; j++) z += w[j * st] * x[j];
    real s, ds;
    act_eval(z, &s, &ds);
    *Q = ds * (*S + g * *Q);
    if (P)
        for (int j = 0; j < D; j++) P[j * st] = ds * (x[j] + g * P[j * st]);
    *S = s;
    return ds;
}

#endif /* NTK_RNN_H */
