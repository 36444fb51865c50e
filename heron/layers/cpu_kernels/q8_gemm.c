/*
 * int8 weight x bfloat16 activation matmul for CPU decode (AVX-512 BF16), built on first use by
 * heron/layers/cpu_kernels/__init__.py and called through ctypes.
 *
 *   out[M, N] = x[M, K] @ W[N, K]^T      W[n, 32 b + j] = s[n, b] * codes[n, 32 b + j]
 *
 *   codes   int8 [N, K]          -127..127, one row per output
 *   s       fp16 [N, K / 32]     one scale per group of 32 inputs (GGUF's Q8_0 layout, split)
 *   x       bf16 [M, K]          activations, row stride ldx elements
 *   out     fp32 or bf16 [M, N]
 *
 * Each group of 32 codes is widened to fp32, multiplied by its scale, rounded to bf16 and fed to
 * VDPBF16PS against the same 32 inputs of every row of x: one pass over the weights serves all
 * M rows (up to ROWS_PER_TILE at a time), which is what decode needs: the weights are the
 * traffic, read once per step instead of once per request. Output rows are split across the
 * OpenMP threads of the calling process (PyTorch's libgomp: the same thread pool).
 */
#include <immintrin.h>
#include <stdint.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512BF16__) || !defined(__F16C__)
#error "q8_gemm needs AVX-512 F, BW and BF16 plus F16C (-march=native on such a CPU)"
#endif

#define GROUP 32
#define ROWS_PER_TILE 8
#define OUTPUTS_PER_CHUNK 16

/* 32 codes times their scale, as 32 bf16 in input order. */
static inline __m512bh scaled_group(const int8_t *codes, float scale) {
    __m512 s = _mm512_set1_ps(scale);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s), _mm512_mul_ps(lo, s));
}

/* dot[m] = x[m, :] . W[n, :] for `rows` rows of x; `rows` is a constant after inlining. */
static inline __attribute__((always_inline)) void dot_tile(
        const uint16_t *x, int64_t ldx, int rows, const int8_t *codes, const uint16_t *scales,
        int64_t groups, float *dot) {
    __m512 acc[ROWS_PER_TILE];
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512bh w = scaled_group(codes + g * GROUP, _cvtsh_ss(scales[g]));
        for (int m = 0; m < rows; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + m * ldx + g * GROUP));
            acc[m] = _mm512_dpbf16_ps(acc[m], w, xv);
        }
    }
    for (int m = 0; m < rows; m++) dot[m] = _mm512_reduce_add_ps(acc[m]);
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even (no NaN inputs here) */
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

#define TILE_CASE(R) case R: dot_tile(xt, ldx, R, row_codes, row_scales, groups, dot); break;

int heron_q8_gemm(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const int8_t *codes,
                  const uint16_t *scales, int64_t N, void *out, int out_bf16) {
    if (K % GROUP) return -1;
    const int64_t groups = K / GROUP;
    const int64_t chunks = (N + OUTPUTS_PER_CHUNK - 1) / OUTPUTS_PER_CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n_end = (c + 1) * OUTPUTS_PER_CHUNK < N ? (c + 1) * OUTPUTS_PER_CHUNK : N;
        for (int64_t n = c * OUTPUTS_PER_CHUNK; n < n_end; n++) {
            const int8_t *row_codes = codes + n * K;
            const uint16_t *row_scales = scales + n * groups;
            for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_TILE) {
                const uint16_t *xt = x + m0 * ldx;
                const int rows = M - m0 < ROWS_PER_TILE ? (int)(M - m0) : ROWS_PER_TILE;
                float dot[ROWS_PER_TILE];
                switch (rows) {
                    TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
                    TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
                }
                for (int m = 0; m < rows; m++) {
                    if (out_bf16) ((uint16_t *)out)[(m0 + m) * N + n] = to_bf16(dot[m]);
                    else ((float *)out)[(m0 + m) * N + n] = dot[m];
                }
            }
        }
    }
    return 0;
}
