/* One SwiGLU expert on the host in bf16, for the host tier (tide/experts/host_kernels.py builds and loads it).

   y = down(silu(gate x) * up x) with x [n, H], gate_up [2I, H] (gate rows, then up rows), down [H, I], all
   bf16 and row-major, y [n, H] bf16. The same rounding points as torch's bf16 `swiglu`: each GEMM sums in fp32
   and rounds its output to bf16, silu and the product are computed in fp32 and rounded to bf16. Only the
   summation order of the dot products differs, and each output row depends on its own input row only, so the
   same rows give the same bits. Two ways to do the GEMMs (`amx` argument of tide_swiglu_bf16):
   - AMX tiles (matmul_bt_amx): 16 weight rows x 32 values loaded straight from the row-major weights against
     up to 16 token rows repacked in pairs;
   - AVX512-BF16 `vdpbf16ps` (matmul_bt): blocks of four weight rows against up to six token rows held in
     registers (4 x 6 accumulators), lanes reduced at the end.
   Why: at a few tokens per expert the host tier is a weight-streaming job; these read each weight once, from
   the host master as it lies, with no per-call repacking of the weights. Requires AVX512F + AVX512-BF16 (and
   AMX-BF16 with the tile state granted for `amx`), see tide_cpu_features, and H, I multiples of 32 (checked
   by the caller). Single-threaded: the executor's workers give the parallelism. */

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16_t;

#define ROWS 4       /* weight rows per block: accumulators ROWS x MAX_TOKENS stay in the 32 zmm registers */
#define MAX_TOKENS 6

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Bit 0: AVX512F + AVX512-BF16 usable; bit 1: AMX-BF16 usable (CPU has it and the kernel granted this process
   the tile state). Call once per process before tide_swiglu_bf16. */
int tide_cpu_features(void) {
    unsigned a, b, c, d, a1 = 0, b1, c1, d1;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    int avx512_bf16 = (b >> 16 & 1) && (a1 >> 5 & 1);          /* AVX512F, AVX512_BF16 */
    int amx = (d >> 24 & 1) && (d >> 22 & 1)                   /* AMX-TILE, AMX-BF16 */
              && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return avx512_bf16 | (amx && avx512_bf16) << 1;
}

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

/* out[t, o0 + r] = sum_k w[o0 + r, k] * x[t0 + t, k] for r < ROWS, t < tokens (a compile-time constant). */
static inline __attribute__((always_inline)) void block(const bf16_t *w, const bf16_t *x, float *out, int64_t O,
                                                         int64_t K, int64_t o0, int64_t t0, const int tokens) {
    __m512 acc[ROWS][MAX_TOKENS];
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_setzero_ps();
    const bf16_t *rows = w + o0 * K, *xs = x + t0 * K;
    for (int64_t k = 0; k < K; k += 32) {
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
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < tokens; t++) out[(t0 + t) * O + o0 + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* out [n, O] fp32 = x [n, K] @ w[O, K]^T; O a multiple of ROWS, K of 32. Token rows go in groups of at most
   MAX_TOKENS, of near-equal size; each weight block is read from memory once and reused from L1 by later groups. */
static void matmul_bt(const bf16_t *w, const bf16_t *x, float *out, int64_t n, int64_t O, int64_t K) {
    int64_t groups = (n + MAX_TOKENS - 1) / MAX_TOKENS;
    int64_t size = (n + groups - 1) / groups;
    for (int64_t o0 = 0; o0 < O; o0 += ROWS) {
        for (int64_t t0 = 0; t0 < n; t0 += size) {
            int64_t tokens = n - t0 < size ? n - t0 : size;
            switch (tokens) {
                case 1: block(w, x, out, O, K, o0, t0, 1); break;
                case 2: block(w, x, out, O, K, o0, t0, 2); break;
                case 3: block(w, x, out, O, K, o0, t0, 3); break;
                case 4: block(w, x, out, O, K, o0, t0, 4); break;
                case 5: block(w, x, out, O, K, o0, t0, 5); break;
                default: block(w, x, out, O, K, o0, t0, 6); break;
            }
        }
    }
}


/* The same product with AMX tiles: C[16 weight rows x T tokens] += A[16 rows x 32 k] . B[32 k x T], A loaded
   straight from the row-major weights (16 rows of 64 bytes at the weight row stride), B from the token rows
   repacked in pairs along k (the layout tdpbf16ps reads), in groups of at most 16 tokens. Two row tiles per step
   (32 weight rows); the groups loop inside the row blocks, so a block's 32 rows are read from memory once and
   reused from L2 by later groups. O a multiple of 32, K of 32; `packed` holds n * K values, `tile_out` 32 * 16. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(int64_t tokens) {
    tile_config cfg = {0};
    cfg.palette = 1;
    cfg.rows[0] = cfg.rows[1] = 16, cfg.colsb[0] = cfg.colsb[1] = 64;                      /* A: weight rows */
    cfg.rows[2] = 16, cfg.colsb[2] = (uint16_t)(tokens * 4);                                  /* B: token pairs */
    cfg.rows[4] = cfg.rows[5] = 16, cfg.colsb[4] = cfg.colsb[5] = (uint16_t)(tokens * 4);  /* C: fp32 sums */
    _tile_loadconfig(&cfg);
}

static void matmul_bt_amx(const bf16_t *w, const bf16_t *x, float *out, int64_t n, int64_t O, int64_t K,
                          bf16_t *packed, float *tile_out) {
    for (int64_t t0 = 0; t0 < n; t0 += 16) { /* group at t0: packed[t0 * K + (k / 2 * tokens + t) * 2 + j] */
        int64_t tokens = n - t0 < 16 ? n - t0 : 16;
        bf16_t *group = packed + t0 * K;
        for (int64_t k = 0; k < K; k += 2)
            for (int64_t t = 0; t < tokens; t++) {
                group[(k / 2 * tokens + t) * 2] = x[(t0 + t) * K + k];
                group[(k / 2 * tokens + t) * 2 + 1] = x[(t0 + t) * K + k + 1];
            }
    }
    int64_t configured = 0;
    for (int64_t o0 = 0; o0 < O; o0 += 32) {
        for (int64_t t0 = 0; t0 < n; t0 += 16) {
            int64_t tokens = n - t0 < 16 ? n - t0 : 16;
            const bf16_t *group = packed + t0 * K;
            if (tokens != configured) configure_tiles(tokens), configured = tokens;
            _tile_zero(4);
            _tile_zero(5);
            for (int64_t k = 0; k < K; k += 32) {
                _tile_loadd(2, group + k * tokens, tokens * 4);
                _tile_loadd(0, w + o0 * K + k, K * 2);
                _tile_loadd(1, w + (o0 + 16) * K + k, K * 2);
                _tile_dpbf16ps(4, 0, 2);
                _tile_dpbf16ps(5, 1, 2);
            }
            _tile_stored(4, tile_out, tokens * 4);
            _tile_stored(5, tile_out + 16 * tokens, tokens * 4);
            for (int64_t m = 0; m < 32; m++)
                for (int64_t t = 0; t < tokens; t++) out[(t0 + t) * O + o0 + m] = tile_out[m * tokens + t];
        }
    }
    _tile_release();
}

/* Reads `bytes` (a multiple of 512, 64-byte aligned) with eight independent streams of 64-byte loads and returns
   their OR: the read bandwidth one thread reaches, the yardstick of python -m tide.bench.host_tier. */
uint64_t tide_read_bytes(const void *p, int64_t bytes) {
    const __m512i *v = (const __m512i *)p;
    __m512i acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
    for (int64_t i = 0; i + 8 <= bytes / 64; i += 8)
        for (int j = 0; j < 8; j++) acc[j] = _mm512_or_si512(acc[j], _mm512_load_si512(v + i + j));
    for (int j = 1; j < 8; j++) acc[0] = _mm512_or_si512(acc[0], acc[j]);
    return (uint64_t)_mm512_reduce_or_epi64(acc[0]);
}

/* Returns 0, or 1 when scratch memory could not be allocated (y untouched). */
int tide_swiglu_bf16(const bf16_t *x, const bf16_t *gate_up, const bf16_t *down, bf16_t *y, int64_t n,
                     int64_t H, int64_t I, int amx) {
    if (n <= 0) return 0;
    int64_t wide = H > I ? H : I;
    float *h = malloc(sizeof(float) * n * 2 * I), *out = malloc(sizeof(float) * n * H);
    bf16_t *a = malloc(sizeof(bf16_t) * n * I), *packed = amx ? malloc(sizeof(bf16_t) * wide * n) : NULL;
    float *tile_out = amx ? malloc(sizeof(float) * 32 * 16) : NULL;
    if (!h || !out || !a || (amx && (!packed || !tile_out))) {
        free(h), free(out), free(a), free(packed), free(tile_out);
        return 1;
    }
    if (amx)
        matmul_bt_amx(gate_up, x, h, n, 2 * I, H, packed, tile_out);
    else
        matmul_bt(gate_up, x, h, n, 2 * I, H);
    for (int64_t t = 0; t < n; t++) {
        for (int64_t i = 0; i < I; i++) {
            float g = bf16_to_float(float_to_bf16(h[t * 2 * I + i]));
            float u = bf16_to_float(float_to_bf16(h[t * 2 * I + I + i]));
            float s = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
            a[t * I + i] = float_to_bf16(s * u);
        }
    }
    if (amx)
        matmul_bt_amx(down, a, out, n, H, I, packed, tile_out);
    else
        matmul_bt(down, a, out, n, H, I);
    for (int64_t j = 0; j < n * H; j++) y[j] = float_to_bf16(out[j]);
    free(h), free(out), free(a), free(packed), free(tile_out);
    return 0;
}
