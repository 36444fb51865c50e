/*
 * int8 weight x bfloat16 activation matmul for CPU decode (AVX-512), built on first use by
 * heron/layers/cpu_kernels/__init__.py and called through ctypes.
 *
 *   out[M, N] = x[M, K] @ W[N, K]^T      W[n, 32 b + j] = s[n, b] * codes[n, 32 b + j]
 *
 *   codes   int8 [N, K]          -127..127, one row per output
 *   s       fp16 [N, K / 32]     one scale per group of 32 inputs (GGUF's Q8_0 layout, split)
 *   x       bf16 [M, K]          activations, row stride ldx elements
 *   out     fp32 or bf16 [M, N]
 *
 * Each group of 32 codes is widened to fp32 and multiplied by its scale, then multiplied with the
 * same 32 inputs of every row of x: one pass over the weights serves all M rows (up to
 * ROWS_PER_TILE at a time), which is what decode needs: the weights are the traffic, read once
 * per step instead of once per request. With AVX-512 BF16 the scaled group is rounded to bf16 and
 * fed to VDPBF16PS; without it, x is widened to fp32 once per call and the group meets it in
 * fp32 FMAs (no rounding of the weights at all). Output rows are split across the OpenMP threads
 * of the calling process (PyTorch's libgomp: the same thread pool).
 */
#include <stdlib.h>

#include "vector_math.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__F16C__)
#error "q8_gemm needs AVX-512 F and BW plus F16C (-march=native on such a CPU)"
#endif

#define GROUP 32
#define ROWS_PER_TILE 8
#define OUTPUTS_PER_CHUNK 16

static inline __m512 widen_codes(const int8_t *codes) {  /* 16 int8 -> 16 fp32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
}

#ifdef __AVX512BF16__
typedef uint16_t x_elem;  /* x as the caller gave it: bf16 */

/* dot[m] = x[m, :] . W[n, :] for `rows` rows of x; `rows` is a constant after inlining. */
static inline __attribute__((always_inline)) void dot_tile(
        const x_elem *x, int64_t ldx, int rows, const int8_t *codes, const uint16_t *scales,
        int64_t groups, float *dot) {
    __m512 acc[ROWS_PER_TILE];
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 s = _mm512_set1_ps(_cvtsh_ss(scales[g]));
        const int8_t *c = codes + g * GROUP;  /* 32 codes times their scale, as 32 bf16 */
        __m512bh w = _mm512_cvtne2ps_pbh(_mm512_mul_ps(widen_codes(c + 16), s),
                                         _mm512_mul_ps(widen_codes(c), s));
        for (int m = 0; m < rows; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + m * ldx + g * GROUP));
            acc[m] = _mm512_dpbf16_ps(acc[m], w, xv);
        }
    }
    for (int m = 0; m < rows; m++) dot[m] = _mm512_reduce_add_ps(acc[m]);
}
#else
typedef float x_elem;  /* x widened to fp32 once per call */

#define BLOCK_ROWS 4  /* rows of x x outputs per register block: 16 accumulators */
#define BLOCK_OUTS 4
#define BLOCK_OUTS_ONE_ROW 8  /* one row: 8 independent accumulators hide the FMA latency */
#define PREFETCH_ROWS 8  /* codes are asked for this many weight rows ahead of their use */

/*
 * dot[r * BLOCK_OUTS_ONE_ROW + o] = x[r, :] . W[o, :] for `rows` rows and `outs` outputs, both
 * constants after inlining, straight from the codes: each group of 32 codes is widened and
 * scaled once, then meets every row of the block. For x of at most BLOCK_ROWS rows.
 */
static inline __attribute__((always_inline)) void dot_block(
        const float *x, int64_t ldx, int rows, const int8_t *codes, const uint16_t *scales,
        int64_t K, int64_t groups, int outs, float *dot) {
    __m512 acc[BLOCK_ROWS][BLOCK_OUTS_ONE_ROW];
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++) acc[r][o] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 lo[BLOCK_OUTS_ONE_ROW], hi[BLOCK_OUTS_ONE_ROW];
        for (int o = 0; o < outs; o++) {
            __m512 s = _mm512_set1_ps(_cvtsh_ss(scales[o * groups + g]));
            const int8_t *c = codes + o * K + g * GROUP;
            _mm_prefetch((const char *)(c + PREFETCH_ROWS * K), _MM_HINT_T0);
            lo[o] = _mm512_mul_ps(widen_codes(c), s);
            hi[o] = _mm512_mul_ps(widen_codes(c + 16), s);
        }
        for (int r = 0; r < rows; r++) {
            __m512 xl = _mm512_loadu_ps(x + r * ldx + g * GROUP), xh = _mm512_loadu_ps(x + r * ldx + g * GROUP + 16);
            for (int o = 0; o < outs; o++)
                acc[r][o] = _mm512_fmadd_ps(hi[o], xh, _mm512_fmadd_ps(lo[o], xl, acc[r][o]));
        }
    }
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++) dot[r * BLOCK_OUTS_ONE_ROW + o] = _mm512_reduce_add_ps(acc[r][o]);
}

/* The same from weights already widened and scaled (fp32 [outs, K]), for x of many rows. */
static inline __attribute__((always_inline)) void dot_block_wide(
        const float *x, int64_t ldx, int rows, const float *w, int64_t K, int outs, float *dot) {
    __m512 acc[BLOCK_ROWS][BLOCK_OUTS];
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++) acc[r][o] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv[BLOCK_OUTS];
        for (int o = 0; o < outs; o++) wv[o] = _mm512_loadu_ps(w + o * K + k);
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_loadu_ps(x + r * ldx + k);
            for (int o = 0; o < outs; o++) acc[r][o] = _mm512_fmadd_ps(wv[o], xv, acc[r][o]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++) dot[r * BLOCK_OUTS_ONE_ROW + o] = _mm512_reduce_add_ps(acc[r][o]);
}

/* wide[o, :] = the weights of `outs` rows of codes, widened and scaled (fp32 [outs, K]). */
static void widen_rows(const int8_t *codes, const uint16_t *scales, int64_t K, int64_t groups,
                       int64_t outs, float *wide) {
    for (int64_t o = 0; o < outs; o++) {
        for (int64_t g = 0; g < groups; g++) {
            __m512 s = _mm512_set1_ps(_cvtsh_ss(scales[o * groups + g]));
            const int8_t *c = codes + o * K + g * GROUP;
            _mm_prefetch((const char *)(c + PREFETCH_ROWS * K), _MM_HINT_T0);
            _mm512_storeu_ps(wide + o * K + g * GROUP, _mm512_mul_ps(widen_codes(c), s));
            _mm512_storeu_ps(wide + o * K + g * GROUP + 16, _mm512_mul_ps(widen_codes(c + 16), s));
        }
    }
}

#endif

static inline uint16_t to_bf16(float f) {  /* round to nearest even (no NaN inputs here) */
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline void store(void *out, int out_bf16, int64_t index, float value) {
    if (out_bf16) ((uint16_t *)out)[index] = to_bf16(value);
    else ((float *)out)[index] = value;
}

#ifdef __AVX512BF16__
#define TILE_CASE(R) case R: dot_tile(xt, ldx, R, row_codes, row_scales, groups, dot); break;

/* Outputs in chunks of 16 across the threads; per output, rows of x in tiles of 8. */
static void gemm(const x_elem *x, int64_t ldx, int64_t M, int64_t K, const int8_t *codes,
                 const uint16_t *scales, int64_t N, void *out, int out_bf16) {
    const int64_t groups = K / GROUP;
    const int64_t chunks = (N + OUTPUTS_PER_CHUNK - 1) / OUTPUTS_PER_CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n_end = (c + 1) * OUTPUTS_PER_CHUNK < N ? (c + 1) * OUTPUTS_PER_CHUNK : N;
        for (int64_t n = c * OUTPUTS_PER_CHUNK; n < n_end; n++) {
            const int8_t *row_codes = codes + n * K;
            const uint16_t *row_scales = scales + n * groups;
            for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_TILE) {
                const x_elem *xt = x + m0 * ldx;
                const int rows = M - m0 < ROWS_PER_TILE ? (int)(M - m0) : ROWS_PER_TILE;
                float dot[ROWS_PER_TILE];
                switch (rows) {
                    TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
                    TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
                }
                for (int m = 0; m < rows; m++) store(out, out_bf16, (m0 + m) * N + n, dot[m]);
            }
        }
    }
}
#else
#define BLOCK_CASE(R, O) case R * 16 + O: \
    dot_block(x + m0 * ldx, ldx, R, codes + n0 * K, scales + n0 * groups, K, groups, O, dot); break;
#define WIDE_CASE(R, O) case R * 16 + O: dot_block_wide(x + m0 * ldx, ldx, R, wide, K, O, dot); break;

/* One register block of outputs [m0, m0 + rows) x [n0, n0 + outs); `wide` (or NULL): its
 * weights already widened. */
static inline void block(const float *x, int64_t ldx, int64_t m0, int rows, int64_t K,
                         int64_t groups, const int8_t *codes, const uint16_t *scales,
                         const float *wide, int64_t n0, int outs, int64_t N,
                         void *out, int out_bf16) {
    float dot[BLOCK_ROWS * BLOCK_OUTS_ONE_ROW];
    if (wide) {
        switch (rows * 16 + outs) {
            WIDE_CASE(1, 1) WIDE_CASE(1, 2) WIDE_CASE(1, 3) WIDE_CASE(1, 4)
            WIDE_CASE(2, 1) WIDE_CASE(2, 2) WIDE_CASE(2, 3) WIDE_CASE(2, 4)
            WIDE_CASE(3, 1) WIDE_CASE(3, 2) WIDE_CASE(3, 3) WIDE_CASE(3, 4)
            WIDE_CASE(4, 1) WIDE_CASE(4, 2) WIDE_CASE(4, 3) WIDE_CASE(4, 4)
        }
    } else {
        switch (rows * 16 + outs) {
            BLOCK_CASE(1, 1) BLOCK_CASE(1, 2) BLOCK_CASE(1, 3) BLOCK_CASE(1, 4)
            BLOCK_CASE(1, 5) BLOCK_CASE(1, 6) BLOCK_CASE(1, 7) BLOCK_CASE(1, 8)
            BLOCK_CASE(2, 1) BLOCK_CASE(2, 2) BLOCK_CASE(2, 3) BLOCK_CASE(2, 4)
            BLOCK_CASE(3, 1) BLOCK_CASE(3, 2) BLOCK_CASE(3, 3) BLOCK_CASE(3, 4)
            BLOCK_CASE(4, 1) BLOCK_CASE(4, 2) BLOCK_CASE(4, 3) BLOCK_CASE(4, 4)
        }
    }
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++)
            store(out, out_bf16, (m0 + r) * N + n0 + o, dot[r * BLOCK_OUTS_ONE_ROW + o]);
}

/*
 * Outputs in chunks of 16 across the threads; within a chunk, register blocks of 4 rows x 4
 * outputs, or of 1 row x 8 outputs when x has one row. Up to 4 rows the codes are widened in
 * registers as each block needs them; with more rows each block of 4 outputs is widened once
 * into a per-thread fp32 buffer (10 KiB for K = 640, stays in L1) that every block of rows then
 * reads.
 */
static int gemm(const x_elem *x, int64_t ldx, int64_t M, int64_t K, const int8_t *codes,
                const uint16_t *scales, int64_t N, void *out, int out_bf16) {
    const int64_t groups = K / GROUP;
    const int64_t chunks = (N + OUTPUTS_PER_CHUNK - 1) / OUTPUTS_PER_CHUNK;
    const int64_t block_outs = M == 1 ? BLOCK_OUTS_ONE_ROW : BLOCK_OUTS;
    const int buffered = M > BLOCK_ROWS;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *wide = buffered ? malloc(sizeof(float) * (size_t)(BLOCK_OUTS * K)) : NULL;
        failed = buffered && !wide;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            if (failed) continue;
            const int64_t n_begin = c * OUTPUTS_PER_CHUNK;
            const int64_t n_end = n_begin + OUTPUTS_PER_CHUNK < N ? n_begin + OUTPUTS_PER_CHUNK : N;
            if (wide) {  /* per block of outputs: widen once, then every block of rows */
                for (int64_t n0 = n_begin; n0 < n_end; n0 += block_outs) {
                    const int outs = n_end - n0 < block_outs ? (int)(n_end - n0) : (int)block_outs;
                    widen_rows(codes + n0 * K, scales + n0 * groups, K, groups, outs, wide);
                    for (int64_t m0 = 0; m0 < M; m0 += BLOCK_ROWS) {
                        const int rows = M - m0 < BLOCK_ROWS ? (int)(M - m0) : BLOCK_ROWS;
                        block(x, ldx, m0, rows, K, groups, codes, scales, wide, n0, outs, N,
                              out, out_bf16);
                    }
                }
                continue;
            }
            for (int64_t m0 = 0; m0 < M; m0 += BLOCK_ROWS) {  /* x's block stays in L1 */
                const int rows = M - m0 < BLOCK_ROWS ? (int)(M - m0) : BLOCK_ROWS;
                for (int64_t n0 = n_begin; n0 < n_end; n0 += block_outs) {
                    const int outs = n_end - n0 < block_outs ? (int)(n_end - n0) : (int)block_outs;
                    block(x, ldx, m0, rows, K, groups, codes, scales, NULL, n0, outs, N,
                          out, out_bf16);
                }
            }
        }
        free(wide);
    }
    return failed ? -2 : 0;
}

/* x [M, K] bf16 (row stride ldx) -> a new contiguous fp32 copy, or NULL */
static float *widen_x(const uint16_t *x, int64_t ldx, int64_t M, int64_t K) {
    float *wide = malloc(sizeof(float) * (size_t)(M * K));
    if (!wide) return NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 16)
            _mm512_storeu_ps(wide + m * K + k, load_bf16(x + m * ldx + k));
    return wide;
}
#endif

int heron_q8_gemm(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const int8_t *codes,
                  const uint16_t *scales, int64_t N, void *out, int out_bf16) {
    if (K % GROUP) return -1;
#ifdef __AVX512BF16__
    gemm(x, ldx, M, K, codes, scales, N, out, out_bf16);
    return 0;
#else
    float *x_fp32 = widen_x(x, ldx, M, K);
    if (!x_fp32) return -2;
    const int status = gemm(x_fp32, K, M, K, codes, scales, N, out, out_bf16);
    free(x_fp32);
    return status;
#endif
}
