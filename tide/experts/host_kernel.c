/* One SwiGLU expert on the host, for the host tier (tide/experts/host_kernels.py builds and loads it).

   y = down(silu(gate x) * up x) with x [n, H], gate_up [2I, H] (gate rows, then up rows), down [H, I], row-major.
   bf16 (tide_swiglu_bf16): the same rounding points as torch's bf16 `swiglu`: each GEMM sums in fp32 and rounds
   its output to bf16, silu and the product are computed in fp32 and each rounded to bf16. fp32
   (tide_swiglu_f32): no rounding between the steps. Only the summation order of the dot products differs from
   torch, and each output row depends on its own input row only, so the same rows give the same bits.

   One source, four builds (host_kernels.py passes the flags; tide_build() names the one loaded):
   - "avx512" (AVX-512F/BW/VL/BF16, AMX-TILE/BF16): all four GEMMs below;
   - "avx512f" (AVX-512F/BW/VL): the FMA GEMMs on 16 lanes (zmm) and on 8 lanes;
   - "avx2" (AVX2 + FMA): the FMA GEMMs, 8 lanes on ymm and 16 lanes on pairs of ymm;
   - "scalar" (no flags): the FMA GEMMs on 8-float structs with fmaf, the same operations in the same order as
     the vector builds, so their results are the same bits: it tests the FMA kernels' logic on any machine.
   The GEMMs (`gemm` argument of tide_swiglu_bf16; tide_swiglu_f32 takes 0 or 3):
   - 0 and 3, FMA on 8 or 16 fp32 lanes: bf16 weights widened to fp32 in registers (even and odd elements of a
     run of 16 or 32, by shift and mask), blocks of weight rows x up to a few token rows of fp32 accumulators
     (FMA_GEMM: the tiles per lane width), the token rows pre-widened once per call in the same even/odd order
     into rows padded apart;
   - 1, AVX512-BF16 `vdpbf16ps`: blocks of four weight rows against up to six token rows;
   - 2, AMX tiles: 32 weight rows x 32 values loaded straight from the row-major weights against two groups of up
     to 16 token rows repacked in pairs.
   GEMMs 0, 1 and 3 prefetch the next block of weight rows into L2 while a block computes, spread over all its
   token groups (a block's later groups compute from L1, and without it memory would idle meanwhile); GEMM 2
   prefetches each weight row a few k steps ahead of its tile loads.
   Why: at a few tokens per expert the host tier is a weight-streaming job; these read each weight once, from the
   host master as it lies, with no per-call repacking of the weights. H and I must be multiples of 32 (checked by
   the caller). Single-threaded: the executor's workers give the parallelism. Also here, for the host-tier study:
   tide_read_bytes (the read-bandwidth yardstick) and tide_fma_peak (the FMA GEMMs' compute yardstick). */

#include <cpuid.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AMX_BF16__)
#define BUILD "avx512"
#elif defined(__AVX512F__)
#define BUILD "avx512f"
#elif defined(__AVX2__) && defined(__FMA__)
#define BUILD "avx2"
#else
#define BUILD "scalar"
#endif

typedef uint16_t bf16_t;
typedef uint32_t __attribute__((may_alias)) pair_t; /* two bf16 moved as one */

const char *tide_build(void) { return BUILD; }

/* ---- CPU features ---------------------------------------------------------------------------------------- */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static uint64_t xcr0(void) { /* the register state the OS saves (needs OSXSAVE, checked by the caller) */
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}

/* Bits: 1 AVX512-BF16 usable (with AVX512F/BW/VL), 2 AMX-BF16 usable (the kernel granted this process the tile
   state), 4 AVX2 + FMA usable, 8 AVX512F/BW/VL usable; "usable": the CPU has the instructions and the OS saves
   their registers. Call once per process before the kernels (the AMX grant is per process). */
int tide_cpu_features(void) {
    unsigned a, b, c, d, a7 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0, b71, c71, d71;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return 0; /* OSXSAVE */
    int fma = c >> 12 & 1;
    uint64_t saved = xcr0();
    int ymm = (saved & 0x6) == 0x6, zmm = ymm && (saved & 0xe0) == 0xe0;
    if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return 0;
    if (a7 >= 1) __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
    int avx2 = ymm && fma && (b7 >> 5 & 1);
    int avx512 = avx2 && zmm && (b7 >> 16 & 1) && (b7 >> 30 & 1) && (b7 >> 31 & 1); /* F, BW, VL */
    int avx512_bf16 = avx512 && (a71 >> 5 & 1);
    int amx = avx512_bf16 && (d7 >> 24 & 1) && (d7 >> 22 & 1) /* AMX-TILE, AMX-BF16 */
              && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return avx512_bf16 | amx << 1 | avx2 << 2 | avx512 << 3;
}

/* ---- bf16 -------------------------------------------------------------------------------------------------- */

static inline float bf16_to_float(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t float_to_bf16(float f) { /* round to nearest even, NaN kept quiet (as c10::BFloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* ---- 8 fp32 lanes: ymm with AVX2 + FMA, else a struct with the same operations, lane by lane ------------------ */

#if defined(__AVX2__) && defined(__FMA__)
typedef __m256 v8;
static inline v8 v8_zero(void) { return _mm256_setzero_ps(); }
static inline v8 v8_set1(float f) { return _mm256_set1_ps(f); }
static inline v8 v8_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v8_store(float *p, v8 v) { _mm256_storeu_ps(p, v); }
static inline v8 v8_fma(v8 a, v8 b, v8 c) { return _mm256_fmadd_ps(a, b, c); } /* a * b + c, one rounding */
static inline v8 v8_add(v8 a, v8 b) { return _mm256_add_ps(a, b); }
static inline v8 v8_mul(v8 a, v8 b) { return _mm256_mul_ps(a, b); }
static inline v8 v8_div(v8 a, v8 b) { return _mm256_div_ps(a, b); }
static inline v8 v8_min(v8 a, v8 b) { return _mm256_min_ps(a, b); }
static inline v8 v8_max(v8 a, v8 b) { return _mm256_max_ps(a, b); }
static inline v8 v8_round(v8 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v8 v8_scale2(v8 p, v8 n) { /* p * 2^n for integral n keeping p's exponent in range: exponent add */
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
static inline v8 v8_bf16_even(const bf16_t *p) { /* p[0], p[2], ..., p[14] as fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
}
static inline v8 v8_bf16_odd(const bf16_t *p) { /* p[1], p[3], ..., p[15] as fp32 */
    __m256i u = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline void v8_keep(v8 *v) { __asm__("" : "+x"(*v)); } /* v stays in a register: not re-read from memory */
static inline float v8_sum(v8 v) { /* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) */
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#else
typedef struct { float f[8]; } v8;
#define LANES(expr) do { for (int l = 0; l < 8; l++) { expr; } } while (0)
static inline v8 v8_zero(void) { v8 r; LANES(r.f[l] = 0.0f); return r; }
static inline v8 v8_set1(float f) { v8 r; LANES(r.f[l] = f); return r; }
static inline v8 v8_load(const float *p) { v8 r; memcpy(r.f, p, sizeof r.f); return r; }
static inline void v8_store(float *p, v8 v) { memcpy(p, v.f, sizeof v.f); }
static inline v8 v8_fma(v8 a, v8 b, v8 c) { v8 r; LANES(r.f[l] = fmaf(a.f[l], b.f[l], c.f[l])); return r; }
static inline v8 v8_add(v8 a, v8 b) { v8 r; LANES(r.f[l] = a.f[l] + b.f[l]); return r; }
static inline v8 v8_mul(v8 a, v8 b) { v8 r; LANES(r.f[l] = a.f[l] * b.f[l]); return r; }
static inline v8 v8_div(v8 a, v8 b) { v8 r; LANES(r.f[l] = a.f[l] / b.f[l]); return r; }
static inline v8 v8_min(v8 a, v8 b) { v8 r; LANES(r.f[l] = a.f[l] < b.f[l] ? a.f[l] : b.f[l]); return r; }
static inline v8 v8_max(v8 a, v8 b) { v8 r; LANES(r.f[l] = a.f[l] > b.f[l] ? a.f[l] : b.f[l]); return r; }
static inline v8 v8_round(v8 a) { v8 r; LANES(r.f[l] = nearbyintf(a.f[l])); return r; }
static inline v8 v8_scale2(v8 p, v8 n) {
    v8 r;
    for (int l = 0; l < 8; l++) {
        uint32_t u;
        memcpy(&u, &p.f[l], sizeof u);
        u += (uint32_t)((int32_t)n.f[l] * (1 << 23));
        memcpy(&r.f[l], &u, sizeof u);
    }
    return r;
}
static inline v8 v8_bf16_even(const bf16_t *p) { v8 r; LANES(r.f[l] = bf16_to_float(p[2 * l])); return r; }
static inline v8 v8_bf16_odd(const bf16_t *p) { v8 r; LANES(r.f[l] = bf16_to_float(p[2 * l + 1])); return r; }
static inline void v8_keep(v8 *v) { (void)v; }
static inline float v8_sum(v8 v) {
    float q0 = v.f[0] + v.f[4], q1 = v.f[1] + v.f[5], q2 = v.f[2] + v.f[6], q3 = v.f[3] + v.f[7];
    return (q0 + q2) + (q1 + q3);
}
#endif

/* exp(x) for x in [-87, 88] (clamped there): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7
   (truncation below 6e-9 relative, under half an fp32 ulp), times 2^n. Within a few fp32 ulps of expf. */
static inline v8 v8_exp(v8 x) {
    x = v8_min(v8_max(x, v8_set1(-87.0f)), v8_set1(88.0f));
    v8 n = v8_round(v8_mul(x, v8_set1(1.44269504f)));
    v8 r = v8_fma(n, v8_set1(-0.693145752f), x); /* ln2 in two parts: the first times n is exact */
    r = v8_fma(n, v8_set1(-1.42860677e-6f), r);
    v8 p = v8_set1(1.0f / 5040.0f);
    p = v8_fma(p, r, v8_set1(1.0f / 720.0f));
    p = v8_fma(p, r, v8_set1(1.0f / 120.0f));
    p = v8_fma(p, r, v8_set1(1.0f / 24.0f));
    p = v8_fma(p, r, v8_set1(1.0f / 6.0f));
    p = v8_fma(p, r, v8_set1(0.5f));
    p = v8_fma(p, r, v8_set1(1.0f));
    p = v8_fma(p, r, v8_set1(1.0f));
    return v8_scale2(p, n);
}

static inline v8 v8_silu(v8 g) { /* g / (1 + e^-g) */
    return v8_div(g, v8_add(v8_set1(1.0f), v8_exp(v8_mul(g, v8_set1(-1.0f)))));
}

/* Exposed for the tests: y[i] = exp(x[i]) and silu(x[i]) as the kernels compute them (n a multiple of 8). */
void tide_exp_silu(const float *x, float *e, float *s, int64_t n) {
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        v8_store(e + i, v8_exp(v8_load(x + i)));
        v8_store(s + i, v8_silu(v8_load(x + i)));
    }
}

/* ---- 16 fp32 lanes: zmm with AVX-512F, else a pair of v8 (lanes 0-7, 8-15) with the same operations ---------- */

#if defined(__AVX512F__)
typedef __m512 v16;
static inline v16 v16_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline v16 v16_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v16_bf16_even(const bf16_t *p) { /* p[0], p[2], ..., p[30] as fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
}
static inline v16 v16_bf16_odd(const bf16_t *p) { /* p[1], p[3], ..., p[31] as fp32 */
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32((int)0xffff0000u)));
}
static inline void v16_keep(v16 *v) { __asm__("" : "+v"(*v)); }
static inline float v16_sum(v16 v) { /* v8_sum of (lanes 0-7 + lanes 8-15) */
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return v8_sum(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}
#else
typedef struct { v8 lo, hi; } v16;
static inline v16 v16_zero(void) { return (v16){v8_zero(), v8_zero()}; }
static inline v16 v16_load(const float *p) { return (v16){v8_load(p), v8_load(p + 8)}; }
static inline v16 v16_fma(v16 a, v16 b, v16 c) { return (v16){v8_fma(a.lo, b.lo, c.lo), v8_fma(a.hi, b.hi, c.hi)}; }
static inline v16 v16_bf16_even(const bf16_t *p) { return (v16){v8_bf16_even(p), v8_bf16_even(p + 16)}; }
static inline v16 v16_bf16_odd(const bf16_t *p) { return (v16){v8_bf16_odd(p), v8_bf16_odd(p + 16)}; }
static inline void v16_keep(v16 *v) { v8_keep(&v->lo), v8_keep(&v->hi); }
static inline float v16_sum(v16 v) { return v8_sum(v8_add(v.lo, v.hi)); }
#endif

/* ---- GEMMs 0 and 3: FMA on 8 or 16 fp32 lanes ---------------------------------------------------------------- */

/* L2 prefetch of `bytes` bytes from p on. */
static inline void prefetch(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 2);
}

/* The next weight block (the ROWS rows after this block's, contiguous) is prefetched into L2 while this block
   computes, spread evenly over all its token groups' k steps, so memory streams while every group computes (a
   block's later groups read it from L1). ahead(g, groups, ...): where token group g starts prefetching, each of its
   k steps taking `step` bytes; NULL past the last block or past the next block's end. */
static inline int64_t ahead_step(int64_t block_bytes, int64_t groups, int64_t k_steps) {
    return (block_bytes / groups / k_steps + 63) / 64 * 64;
}
static inline const char *ahead(const char *next, int64_t block_bytes, int64_t g, int64_t step, int64_t k_steps) {
    return next && g * step * k_steps < block_bytes ? next + g * step * k_steps : NULL;
}

/* One FMA GEMM per lane width V, named by its lane count L: per k step each of the block's weight rows is widened
   once (even and odd halves held in registers) and each token row's x vectors are loaded once, so a bf16 step loads
   rows + 2 x tokens vectors for 2 x rows x tokens FMAs:
   - widen_L: xs [n, K] bf16 -> xw [n, K + XPAD] fp32, each run of 2L values stored as its L even then its L odd
     elements (the order in which the GEMM widens bf16 weights); copy_L: the same layout for fp32 x; K a multiple
     of 2L. XPAD: token rows 2^k bytes apart would share L1 sets (and alias at 4 KB);
   - block_bf16_L / block_f32_L: out[t, o0 + r] = sum_k w[o0 + r, k] x[t0 + t, k] for r < rows, t < tokens (both
     compile-time constants), bf16 w against xw, or fp32 w against fp32 x. KEEP: an empty asm holds each x vector in
     its register, where the compiler would otherwise re-read it as a memory operand of every FMA that uses it (the
     v8 GEMM then issued more loads than FMAs);
   - matmul_bf16_L / matmul_f32_L: out [n, O] fp32 = x [n, K] @ w[O, K]^T, O a multiple of 32, K of 2L; weight blocks
     of ROWS rows (ROWS1 when n is 1, FROWS for fp32 weights), token rows in groups of at most TOKENS (FTOKENS) of
     near-equal size inside each block, which is read from memory once and reused from L1 by the later groups.
   Tiles: v16 4 x 5 (20 accumulators + 8 weight + 2 x vectors in the 32 zmm registers), its loop as measured on
   AVX-512 hosts; v8 bf16 2 x 4 (8 + 4 + 2 + the odd mask: the 16 ymm registers; 4 x 3 spilled and, with KEEP and
   XPAD, measured 10-20% slower at 4-8 tokens on a Zen 3 core), 4 rows for one token (4 accumulator chains in flight),
   fp32 4 x 3 (no widening: 12 + 4 + 1 fit). */
#define FMA_GEMM(V, L, ROWS, ROWS1, TOKENS, FROWS, FTOKENS, XPAD, KEEP)                                           \
    static void widen_##L(const bf16_t *xs, float *xw, int64_t n, int64_t K) {                                   \
        for (int64_t t = 0; t < n; t++)                                                                          \
            for (int64_t j = 0; j < K; j += 2 * L)                                                               \
                for (int l = 0; l < L; l++)                                                                      \
                    xw[t * (K + XPAD) + j + l] = bf16_to_float(xs[t * K + j + 2 * l]),                           \
                    xw[t * (K + XPAD) + j + L + l] = bf16_to_float(xs[t * K + j + 2 * l + 1]);                   \
    }                                                                                                            \
    static void copy_##L(const float *xs, float *xw, int64_t n, int64_t K) {                                     \
        for (int64_t t = 0; t < n; t++) memcpy(xw + t * (K + XPAD), xs + t * K, sizeof(float) * K);              \
    }                                                                                                            \
    static inline __attribute__((always_inline)) void block_bf16_##L(                                           \
        const bf16_t *w, const float *xw, float *out, int64_t O, int64_t K, int64_t o0, int64_t t0,              \
        const int rows, const int tokens, const char *pre, int64_t step) {                                       \
        V acc[ROWS > ROWS1 ? ROWS : ROWS1][TOKENS];                                                              \
        for (int r = 0; r < rows; r++)                                                                           \
            for (int t = 0; t < tokens; t++) acc[r][t] = V##_zero();                                             \
        const bf16_t *ws = w + o0 * K;                                                                           \
        const float *xs = xw + t0 * (K + XPAD);                                                                  \
        for (int64_t k = 0; k < K; k += 2 * L) {                                                                 \
            if (pre) prefetch(pre + k / (2 * L) * step, step);                                                   \
            V even[ROWS > ROWS1 ? ROWS : ROWS1], odd[ROWS > ROWS1 ? ROWS : ROWS1];                               \
            for (int r = 0; r < rows; r++)                                                                       \
                even[r] = V##_bf16_even(ws + r * K + k), odd[r] = V##_bf16_odd(ws + r * K + k);                  \
            for (int t = 0; t < tokens; t++) {                                                                   \
                V xe = V##_load(xs + t * (K + XPAD) + k), xo = V##_load(xs + t * (K + XPAD) + k + L);            \
                if (KEEP) V##_keep(&xe), V##_keep(&xo);                                                          \
                for (int r = 0; r < rows; r++) acc[r][t] = V##_fma(odd[r], xo, V##_fma(even[r], xe, acc[r][t])); \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < rows; r++)                                                                           \
            for (int t = 0; t < tokens; t++) out[(t0 + t) * O + o0 + r] = V##_sum(acc[r][t]);                   \
    }                                                                                                            \
    static inline __attribute__((always_inline)) void block_f32_##L(                                            \
        const float *w, const float *xw, float *out, int64_t O, int64_t K, int64_t o0, int64_t t0,               \
        const int rows, const int tokens, const char *pre, int64_t step) {                                       \
        V acc[FROWS][FTOKENS];                                                                                   \
        for (int r = 0; r < rows; r++)                                                                           \
            for (int t = 0; t < tokens; t++) acc[r][t] = V##_zero();                                             \
        const float *ws = w + o0 * K, *xs = xw + t0 * (K + XPAD);                                                \
        for (int64_t k = 0; k < K; k += L) {                                                                     \
            if (pre) prefetch(pre + k / L * step, step);                                                         \
            V wv[FROWS];                                                                                         \
            for (int r = 0; r < rows; r++) wv[r] = V##_load(ws + r * K + k);                                     \
            for (int t = 0; t < tokens; t++) {                                                                   \
                V xv = V##_load(xs + t * (K + XPAD) + k);                                                        \
                if (KEEP) V##_keep(&xv);                                                                         \
                for (int r = 0; r < rows; r++) acc[r][t] = V##_fma(wv[r], xv, acc[r][t]);                        \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < rows; r++)                                                                           \
            for (int t = 0; t < tokens; t++) out[(t0 + t) * O + o0 + r] = V##_sum(acc[r][t]);                   \
    }                                                                                                            \
    FMA_MATMUL(matmul_bf16_##L, bf16_t, block_bf16_##L, 2 * L, ROWS, ROWS1, TOKENS)                              \
    FMA_MATMUL(matmul_f32_##L, float, block_f32_##L, L, FROWS, FROWS, FTOKENS)

#define FMA_MATMUL(name, wtype, block, KSTEP, ROWS, ROWS1, TOKENS)                                               \
    static void name(const wtype *w, const float *xw, float *out, int64_t n, int64_t O, int64_t K) {            \
        int64_t groups = (n + TOKENS - 1) / TOKENS, size = (n + groups - 1) / groups, rows = n == 1 ? ROWS1 : ROWS; \
        int64_t block_bytes = rows * K * (int64_t)sizeof(wtype), steps = K / (KSTEP);                           \
        int64_t step = ahead_step(block_bytes, groups, steps);                                                   \
        for (int64_t o0 = 0; o0 < O; o0 += rows) {                                                             \
            const char *next = o0 + rows < O ? (const char *)(w + (o0 + rows) * K) : NULL;                       \
            if (n == 1 && ROWS1 != ROWS) { /* one token: the GEMV's wider block */                               \
                block(w, xw, out, O, K, o0, 0, ROWS1, 1, ahead(next, block_bytes, 0, step, steps), step);        \
                continue;                                                                                        \
            }                                                                                                    \
            for (int64_t t0 = 0, g = 0; t0 < n; t0 += size, g++) {                                              \
                int64_t tokens = n - t0 < size ? n - t0 : size;                                                  \
                const char *pre = ahead(next, block_bytes, g, step, steps);                                      \
                switch (tokens) { /* each case a compile-time token count, at most TOKENS */                     \
                    case 1: block(w, xw, out, O, K, o0, t0, ROWS, 1, pre, step); break;                          \
                    case 2: block(w, xw, out, O, K, o0, t0, ROWS, 2 < TOKENS ? 2 : TOKENS, pre, step); break;    \
                    case 3: block(w, xw, out, O, K, o0, t0, ROWS, 3 < TOKENS ? 3 : TOKENS, pre, step); break;    \
                    case 4: block(w, xw, out, O, K, o0, t0, ROWS, 4 < TOKENS ? 4 : TOKENS, pre, step); break;    \
                    default: block(w, xw, out, O, K, o0, t0, ROWS, TOKENS, pre, step); break;                    \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

FMA_GEMM(v8, 8, 2, 4, 4, 4, 3, 16, 1)
FMA_GEMM(v16, 16, 4, 4, 5, 4, 5, 0, 0)
#define XPAD_MAX 16 /* the larger XPAD above */

/* ---- GEMMs 1 and 2: AVX512-BF16 and AMX (avx512 build only) ------------------------------------------------- */

#ifdef __AVX512BF16__
#define DP_ROWS 4 /* accumulators DP_ROWS x DP_TOKENS stay in the 32 zmm registers */
#define DP_TOKENS 6

static inline __attribute__((always_inline)) void dp_block(const bf16_t *w, const bf16_t *x, float *out, int64_t O,
                                                           int64_t K, int64_t o0, int64_t t0, const int tokens,
                                                           const char *pre, int64_t step) {
    __m512 acc[DP_ROWS][DP_TOKENS];
    for (int r = 0; r < DP_ROWS; r++)
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_setzero_ps();
    const bf16_t *rows = w + o0 * K, *xs = x + t0 * K;
    for (int64_t k = 0; k < K; k += 32) {
        if (pre) prefetch(pre + k / 32 * step, step);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(rows + k);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(rows + K + k);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(rows + 2 * K + k);
        __m512bh w3 = (__m512bh)_mm512_loadu_si512(rows + 3 * K + k);
        for (int t = 0; t < tokens; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xs + t * K + k);
            acc[0][t] = _mm512_dpbf16_ps(acc[0][t], w0, xv);
            acc[1][t] = _mm512_dpbf16_ps(acc[1][t], w1, xv);
            acc[2][t] = _mm512_dpbf16_ps(acc[2][t], w2, xv);
            acc[3][t] = _mm512_dpbf16_ps(acc[3][t], w3, xv);
        }
    }
    for (int r = 0; r < DP_ROWS; r++)
        for (int t = 0; t < tokens; t++) out[(t0 + t) * O + o0 + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* out [n, O] fp32 = x [n, K] @ w[O, K]^T with vdpbf16ps; O a multiple of DP_ROWS, K of 32; the next block
   prefetched as in FMA_MATMUL. */
static void matmul_dp(const bf16_t *w, const bf16_t *x, float *out, int64_t n, int64_t O, int64_t K) {
    int64_t groups = (n + DP_TOKENS - 1) / DP_TOKENS, size = (n + groups - 1) / groups;
    int64_t block_bytes = DP_ROWS * K * (int64_t)sizeof(bf16_t), step = ahead_step(block_bytes, groups, K / 32);
    for (int64_t o0 = 0; o0 < O; o0 += DP_ROWS) {
        const char *next = o0 + DP_ROWS < O ? (const char *)(w + (o0 + DP_ROWS) * K) : NULL;
        for (int64_t t0 = 0, g = 0; t0 < n; t0 += size, g++) {
            const char *pre = ahead(next, block_bytes, g, step, K / 32);
            switch (n - t0 < size ? n - t0 : size) {
                case 1: dp_block(w, x, out, O, K, o0, t0, 1, pre, step); break;
                case 2: dp_block(w, x, out, O, K, o0, t0, 2, pre, step); break;
                case 3: dp_block(w, x, out, O, K, o0, t0, 3, pre, step); break;
                case 4: dp_block(w, x, out, O, K, o0, t0, 4, pre, step); break;
                case 5: dp_block(w, x, out, O, K, o0, t0, 5, pre, step); break;
                default: dp_block(w, x, out, O, K, o0, t0, 6, pre, step); break;
            }
        }
    }
}

/* AMX: C[16 weight rows x T tokens] += A[16 rows x 32 k] . B[32 k x T], A loaded straight from the row-major
   weights (16 rows of 64 bytes at the weight row stride), B from the token rows repacked in pairs along k (the
   layout tdpbf16ps reads), in groups of at most 16 tokens of near-equal size. Per step two row tiles (32 weight
   rows) against two token groups (the eight tiles: A0 A1, B0 B1, C00 C01 C10 C11), so up to 32 tokens read each
   weight once; more tokens loop over pairs of groups inside the row block, reusing its 32 rows from L2. Software
   prefetch, AMX_PREFETCH_STEPS k steps ahead of the tile loads in each of the block's 32 rows, running on into the
   next block's rows at a row's end: a tile load reads 16 rows 64 bytes each at the row stride, a pattern the
   hardware's prefetchers follow badly where rows are short (mini's down projection, 1 KB rows, 16 k steps per
   block: it read 0.69 of the bandwidth without it and 0.83 with it at 8 tokens, mini's gate_up 0.87 and 0.91, in a
   throwaway driver on the AMX host; an L2 prefetch of the whole next block instead measured 8% slower at flash's
   shape). O a multiple of 32, K of 32; `packed` holds n * K values, `tile_out` 32 * 16. */
#define AMX_PREFETCH_STEPS 8

/* Prefetches into L1 the 64 bytes at column k of the 32 weight rows of block o0, or, past the rows' end, of the
   blocks after it; nothing past the last block. */
static inline void prefetch_rows(const bf16_t *w, int64_t O, int64_t K, int64_t o0, int64_t k) {
    for (; k >= K; k -= K) o0 += 32;
    if (o0 >= O) return;
    for (int64_t r = 0; r < 32; r++) _mm_prefetch((const char *)(w + (o0 + r) * K + k), _MM_HINT_T0);
}
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(int64_t tokens0, int64_t tokens1) { /* tokens1 = 0: one group */
    tile_config cfg = {0};
    cfg.palette = 1;
    cfg.rows[0] = cfg.rows[1] = 16, cfg.colsb[0] = cfg.colsb[1] = 64;                         /* A: weight rows */
    cfg.rows[2] = 16, cfg.colsb[2] = (uint16_t)(tokens0 * 4);                                    /* B0: token pairs */
    cfg.rows[4] = cfg.rows[5] = 16, cfg.colsb[4] = cfg.colsb[5] = (uint16_t)(tokens0 * 4);     /* C0: fp32 sums */
    if (tokens1) {
        cfg.rows[3] = 16, cfg.colsb[3] = (uint16_t)(tokens1 * 4);
        cfg.rows[6] = cfg.rows[7] = 16, cfg.colsb[6] = cfg.colsb[7] = (uint16_t)(tokens1 * 4);
    }
    _tile_loadconfig(&cfg);
}

static void store_group(float *out, const float *tile_out, int64_t O, int64_t o0, int64_t t0, int64_t tokens) {
    for (int64_t t = 0; t < tokens; t++) /* tile_out [32 rows, tokens] -> out rows t0.., columns o0..o0+31 */
        for (int64_t m = 0; m < 32; m++) out[(t0 + t) * O + o0 + m] = tile_out[m * tokens + t];
}

static void matmul_amx(const bf16_t *w, const bf16_t *x, float *out, int64_t n, int64_t O, int64_t K,
                       bf16_t *packed, float *tile_out) {
    int64_t groups = (n + 15) / 16, size = (n + groups - 1) / groups;
    for (int64_t t0 = 0; t0 < n; t0 += size) { /* group at t0: packed[t0 * K + (k / 2 * tokens + t) * 2 + j] */
        int64_t tokens = n - t0 < size ? n - t0 : size;
        pair_t *group = (pair_t *)(packed + t0 * K); /* a pair of bf16 as one 32-bit value */
        const pair_t *rows = (const pair_t *)(x + t0 * K);
        for (int64_t t = 0; t < tokens; t++)
            for (int64_t p = 0; p < K / 2; p++) group[p * tokens + t] = rows[t * K / 2 + p];
    }
    int64_t configured0 = 0, configured1 = -1;
    for (int64_t o0 = 0; o0 < O; o0 += 32) {
        for (int64_t t0 = 0; t0 < n; t0 += 2 * size) {
            int64_t tokens0 = n - t0 < size ? n - t0 : size, t1 = t0 + tokens0;
            int64_t tokens1 = n - t1 < size ? n - t1 : size;
            const bf16_t *group0 = packed + t0 * K, *group1 = packed + t1 * K;
            if (tokens0 != configured0 || tokens1 != configured1)
                configure_tiles(tokens0, tokens1), configured0 = tokens0, configured1 = tokens1;
            _tile_zero(4);
            _tile_zero(5);
            if (tokens1) {
                _tile_zero(6);
                _tile_zero(7);
            }
            for (int64_t k = 0; k < K; k += 32) {
                if (t0 == 0) prefetch_rows(w, O, K, o0, k + AMX_PREFETCH_STEPS * 32); /* later pairs: from L2 */
                _tile_loadd(0, w + o0 * K + k, K * 2);
                _tile_loadd(1, w + (o0 + 16) * K + k, K * 2);
                _tile_loadd(2, group0 + k * tokens0, tokens0 * 4);
                _tile_dpbf16ps(4, 0, 2);
                _tile_dpbf16ps(5, 1, 2);
                if (tokens1) {
                    _tile_loadd(3, group1 + k * tokens1, tokens1 * 4);
                    _tile_dpbf16ps(6, 0, 3);
                    _tile_dpbf16ps(7, 1, 3);
                }
            }
            _tile_stored(4, tile_out, tokens0 * 4);
            _tile_stored(5, tile_out + 16 * tokens0, tokens0 * 4);
            store_group(out, tile_out, O, o0, t0, tokens0);
            if (tokens1) {
                _tile_stored(6, tile_out, tokens1 * 4);
                _tile_stored(7, tile_out + 16 * tokens1, tokens1 * 4);
                store_group(out, tile_out, O, o0, t1, tokens1);
            }
        }
    }
    _tile_release();
}
#endif

/* ---- read bandwidth ------------------------------------------------------------------------------------------- */

/* Reads `bytes` (a multiple of 512 x streams, 64-byte aligned) as `streams` (1, 2 or 4) equal parts read side by
   side, with eight independent accumulators of the widest loads of this build (64, 32 or 8 bytes), and returns their
   OR: the read bandwidth one thread reaches, the yardstick of python -m tide.bench.host_tier (which takes the
   fastest stream count: a GEMM block reads several weight rows side by side, and on a Zen 3 core two or four
   streams read 5-10% faster than one). Returns 0 for a stream count it does not take. */
#if defined(__AVX512F__)
typedef __m512i word_t;
#define WORD_ZERO() _mm512_setzero_si512()
#define WORD_OR(a, p) _mm512_or_si512(a, _mm512_load_si512(p))
static uint64_t word_fold(word_t v) { return (uint64_t)_mm512_reduce_or_epi64(v); }
#elif defined(__AVX2__)
typedef __m256i word_t;
#define WORD_ZERO() _mm256_setzero_si256()
#define WORD_OR(a, p) _mm256_or_si256(a, _mm256_load_si256(p))
static uint64_t word_fold(word_t v) {
    __m128i q = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return (uint64_t)_mm_cvtsi128_si64(q) | (uint64_t)_mm_extract_epi64(q, 1);
}
#else
typedef uint64_t word_t;
#define WORD_ZERO() 0
#define WORD_OR(a, p) ((a) | *(p))
static uint64_t word_fold(word_t v) { return v; }
#endif

static inline __attribute__((always_inline)) uint64_t read_streams(const word_t *v, int64_t words, const int streams) {
    word_t acc[8];
    for (int j = 0; j < 8; j++) acc[j] = WORD_ZERO();
    const int64_t part = words / streams, each = 8 / streams; /* words per stream; loads per stream per round */
    for (int64_t i = 0; i + each <= part; i += each)
        for (int s = 0; s < streams; s++)
            for (int j = 0; j < each; j++) acc[s * each + j] = WORD_OR(acc[s * each + j], v + s * part + i + j);
    for (int j = 1; j < 8; j++) acc[0] = acc[0] | acc[j];
    return word_fold(acc[0]);
}

uint64_t tide_read_bytes(const void *p, int64_t bytes, int streams) {
    const word_t *v = (const word_t *)p;
    int64_t words = bytes / (int64_t)sizeof(word_t);
    switch (streams) {
        case 1: return read_streams(v, words, 1);
        case 2: return read_streams(v, words, 2);
        case 4: return read_streams(v, words, 4);
        default: return 0;
    }
}

/* The compute yardstick of the FMA GEMMs: `rounds` x 12 independent fused multiply-adds on the widest lanes of this
   build (16 fp32 lanes with AVX-512F, else 8: ymm with AVX2, fmaf in the scalar build), 12 chains so the FMA units,
   not the FMA latency, limit it. Returns the lanes per FMA (the caller times the call: multiply-adds per second). */
int tide_fma_peak(int64_t rounds) {
#if defined(__AVX512F__)
    typedef v16 lane_t;
#define LANES_ZERO v16_zero
#define LANES_FMA v16_fma
#define LANES_KEEP v16_keep
    const int lanes = 16;
    float b16[16];
    for (int j = 0; j < 16; j++) b16[j] = 0.999f;
    lane_t b = v16_load(b16);
#else
    typedef v8 lane_t;
#define LANES_ZERO v8_zero
#define LANES_FMA v8_fma
#define LANES_KEEP v8_keep
    const int lanes = 8;
    lane_t b = v8_set1(0.999f);
#endif
    lane_t acc[12];
    for (int j = 0; j < 12; j++) acc[j] = LANES_ZERO();
    for (int64_t i = 0; i < rounds; i++)
        for (int j = 0; j < 12; j++) acc[j] = LANES_FMA(acc[j], b, b);
    for (int j = 0; j < 12; j++) LANES_KEEP(&acc[j]); /* the sums are used: the loop cannot be dropped */
    return lanes;
#undef LANES_ZERO
#undef LANES_FMA
#undef LANES_KEEP
}

/* ---- the expert ------------------------------------------------------------------------------------------------ */

/* a [n, I] = silu(g) * u from h [n, 2I] (g then u per row), each step rounded to bf16 as torch's bf16 swiglu. */
static void silu_mul_bf16(const float *h, bf16_t *a, int64_t n, int64_t I) {
    float g[8], s[8];
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < I; i += 8) {
            for (int l = 0; l < 8; l++) g[l] = round_bf16(h[t * 2 * I + i + l]);
            v8_store(s, v8_silu(v8_load(g)));
            for (int l = 0; l < 8; l++)
                a[t * I + i + l] = float_to_bf16(round_bf16(s[l]) * round_bf16(h[t * 2 * I + I + i + l]));
        }
}

/* Scratch memory per thread, kept from call to call (no allocation or page faults per expert), freed when the
   thread ends; a call that needed more than SCRATCH_KEEP bytes gives it back at once. */
#define SCRATCH_KEEP ((size_t)16 << 20)
typedef struct {
    char *base;
    size_t bytes;
} scratch_t;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_free(void *p) { free(((scratch_t *)p)->base), free(p); }
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static char *scratch(size_t bytes) { /* NULL: no memory */
    pthread_once(&scratch_once, scratch_init);
    scratch_t *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        if (pthread_setspecific(scratch_key, s)) return free(s), NULL;
    }
    if (bytes > s->bytes) {
        free(s->base);
        s->base = aligned_alloc(64, bytes), s->bytes = s->base ? bytes : 0;
    }
    return s->base;
}

static void scratch_done(void) {
    scratch_t *s = pthread_getspecific(scratch_key);
    if (s && s->bytes > SCRATCH_KEEP) free(s->base), s->base = NULL, s->bytes = 0;
}

static size_t span(size_t bytes) { return (bytes + 63) / 64 * 64; } /* each buffer 64-byte aligned */

/* Returns 0; 1 when scratch memory could not be allocated, 2 when this build has no such `gemm` (y untouched). */
int tide_swiglu_bf16(const bf16_t *x, const bf16_t *gate_up, const bf16_t *down, bf16_t *y, int64_t n,
                     int64_t H, int64_t I, int gemm) {
#ifndef __AVX512BF16__
    if (gemm == 1 || gemm == 2) return 2;
#endif
    if (gemm < 0 || gemm > 3) return 2;
    if (n <= 0) return 0;
    size_t wide = (size_t)(H > I ? H : I) * n, sizes[5] = {
        span(sizeof(float) * n * 2 * I), span(sizeof(float) * n * H), span(sizeof(bf16_t) * n * I),
        gemm == 0 || gemm == 3 ? span(sizeof(float) * ((H > I ? H : I) + XPAD_MAX) * n)
                               : gemm == 2 ? span(sizeof(bf16_t) * wide) : 0,
        gemm == 2 ? span(sizeof(float) * 32 * 16) : 0};
    char *base = scratch(sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4]);
    if (!base) return 1;
    float *h = (float *)base, *out = (float *)(base + sizes[0]);
    bf16_t *a = (bf16_t *)(base + sizes[0] + sizes[1]);
    char *rest = base + sizes[0] + sizes[1] + sizes[2];
    float *xw = (float *)rest; /* gemms 0 and 3 */
#ifdef __AVX512BF16__
    bf16_t *packed = (bf16_t *)rest; /* gemm 2 */
    float *tile_out = (float *)(rest + sizes[3]);
#endif
    for (int pass = 0; pass < 2; pass++) { /* gate_up, then down */
        const bf16_t *w = pass ? down : gate_up, *in = pass ? a : x;
        float *res = pass ? out : h;
        int64_t O = pass ? H : 2 * I, K = pass ? I : H;
        if (gemm == 0) widen_8(in, xw, n, K), matmul_bf16_8(w, xw, res, n, O, K);
        else if (gemm == 3) widen_16(in, xw, n, K), matmul_bf16_16(w, xw, res, n, O, K);
#ifdef __AVX512BF16__
        else if (gemm == 1) matmul_dp(w, in, res, n, O, K);
        else matmul_amx(w, in, res, n, O, K, packed, tile_out);
#endif
        if (!pass) silu_mul_bf16(h, a, n, I);
    }
    for (int64_t j = 0; j < n * H; j++) y[j] = float_to_bf16(out[j]);
    scratch_done();
    return 0;
}

/* fp32 masters: the same expert with an FMA GEMM (`gemm` 0 or 3), no rounding between the steps. Returns 0, 1 (no
   memory) or 2 (no such gemm). */
int tide_swiglu_f32(const float *x, const float *gate_up, const float *down, float *y, int64_t n, int64_t H,
                    int64_t I, int gemm) {
    if (gemm != 0 && gemm != 3) return 2;
    if (n <= 0) return 0;
    size_t sizes[3] = {span(sizeof(float) * n * 2 * I), span(sizeof(float) * n * I),
                       span(sizeof(float) * ((H > I ? H : I) + XPAD_MAX) * n)};
    char *base = scratch(sizes[0] + sizes[1] + sizes[2]);
    if (!base) return 1;
    float *h = (float *)base, *a = (float *)(base + sizes[0]), *xw = (float *)(base + sizes[0] + sizes[1]);
    if (gemm) copy_16(x, xw, n, H), matmul_f32_16(gate_up, xw, h, n, 2 * I, H);
    else copy_8(x, xw, n, H), matmul_f32_8(gate_up, xw, h, n, 2 * I, H);
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < I; i += 8) {
            v8 s = v8_silu(v8_load(h + t * 2 * I + i));
            v8_store(a + t * I + i, v8_mul(s, v8_load(h + t * 2 * I + I + i)));
        }
    if (gemm) copy_16(a, xw, n, I), matmul_f32_16(down, xw, y, n, H, I);
    else copy_8(a, xw, n, I), matmul_f32_8(down, xw, y, n, H, I);
    scratch_done();
    return 0;
}

/* Many experts, handed out by a shared counter: any number of threads may run the same call at once (each with the
   same arrays and `next`), each computing expert j = (*next)++ until none is left, so they balance themselves with
   no per-expert hand-off or interpreter work. Expert j: tide_swiglu_bf16(x[j], gate_up[j], down[j], y[j], n[j], H,
   I, gemm). Returns 0, or the first nonzero code of this thread's experts. */
int tide_swiglu_bf16_many(int64_t count, const bf16_t *const *x, const bf16_t *const *gate_up,
                          const bf16_t *const *down, bf16_t *const *y, const int64_t *n, int64_t H, int64_t I,
                          int gemm, int64_t *next) {
    for (int64_t j; (j = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < count;) {
        int code = tide_swiglu_bf16(x[j], gate_up[j], down[j], y[j], n[j], H, I, gemm);
        if (code) return code;
    }
    return 0;
}

int tide_swiglu_f32_many(int64_t count, const float *const *x, const float *const *gate_up, const float *const *down,
                         float *const *y, const int64_t *n, int64_t H, int64_t I, int gemm, int64_t *next) {
    for (int64_t j; (j = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < count;) {
        int code = tide_swiglu_f32(x[j], gate_up[j], down[j], y[j], n[j], H, I, gemm);
        if (code) return code;
    }
    return 0;
}
