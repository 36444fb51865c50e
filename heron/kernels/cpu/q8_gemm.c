/*
 * int8 weight x activation matmul for CPU decode and prefill (AVX-512 VNNI; the other variants
 * compile q8_gemm_portable.h), built on first use by heron/kernels/cpu/__init__.py and called
 * through ctypes.
 *
 *   out[M, N] = x[M, K] @ W[N, K]^T      W[n, 32 g + j] = scale[n, g] * code[n, 32 g + j]
 *
 * The weight, as heron/layers/quant.py lays it out (Q8Weight), in blocks of 16 outputs:
 *
 *   codes   uint8 [N / 16, K / 4, 16, 4]   code + 128 of W[16 b + o, 4 q + j] at [b, q, o, j]
 *   scales  fp16  [N / 16, K / 32, 16]      scale of group g of output 16 b + o
 *
 * so that one 64-byte load holds 4 consecutive inputs' codes for 16 outputs, and VPDPBUSD
 * multiplies them with 4 int8 inputs broadcast to every lane: 64 multiply-adds into 16 int32
 * sums, one per output, in one instruction. x is quantized per call the way GGUF's Q8_0 does it
 * (per row and group of 32: xq = round(x / xs), xs = max |x| / 127). Over a group:
 *
 *   sum_j (code_j + 128) xq_j  -  128 sum_j xq_j  =  sum_j code_j xq_j        (exact, in int32)
 *
 * then out += scale[n, g] * xs[m, g] * that, in fp32. Each thread takes blocks of 16 outputs;
 * a block's codes (16 K bytes) stay in L1 while every tile of up to 8 rows of x passes over them.
 */
#include <stdlib.h>

#include "kernels.h"

#define GROUP 32
#define OUTS 16          /* outputs per block: one zmm of int32 sums */

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#include "gguf_blocks.h"  /* fp16_to_fp32 */
#include "q8_gemm_portable.h"
#else
#include "vector_math.h"
#define ROWS_PER_TILE 8  /* rows of x per pass over a block: 8 int32 + 8 fp32 accumulators */
#define PREFETCH_BLOCKS 2  /* codes are asked for this many blocks ahead of their use */

/* x row [K] (bf16 or fp32) -> xq int8 [K], xs [K / 32], xsum [K / 32] = 128 * sum of xq */
static void quantize_row(const void *x, int x_fp32, int64_t K, int8_t *xq, float *xs, int32_t *xsum) {
    for (int64_t g = 0; g < K / GROUP; g++) {
        __m512 v[2];
        for (int h = 0; h < 2; h++) {
            const int64_t k = g * GROUP + 16 * h;
            v[h] = x_fp32 ? _mm512_loadu_ps((const float *)x + k) : load_bf16((const uint16_t *)x + k);
        }
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float scale = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m512i sum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inv));  /* round to nearest even */
            _mm_storeu_si128((__m128i *)(xq + g * GROUP + 16 * h), _mm512_cvtsepi32_epi8(q));
            sum = _mm512_add_epi32(sum, q);
        }
        xs[g] = scale;
        xsum[g] = 128 * _mm512_reduce_add_epi32(sum);
    }
}

static inline void store_outputs(void *out, int out_bf16, int64_t index, __m512 v) {
    if (out_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)out + index), fp32_to_bf16x16(v));
    else _mm512_storeu_ps((float *)out + index, v);
}

/* out[m0 + r, 16 b .. 16 b + 15] for `rows` rows (a constant after inlining) and block b. */
static inline __attribute__((always_inline)) void block_tile(
        const uint8_t *codes, const uint16_t *scales, const int8_t *xq, const float *xs,
        const int32_t *xsum, int64_t K, int rows, void *out, int out_bf16, int64_t out_index,
        int64_t N) {
    const int64_t groups = K / GROUP;
    __m512 acc[ROWS_PER_TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *w = codes + g * GROUP * OUTS;  /* 8 quads of 4 inputs x 16 outputs */
        _mm_prefetch((const char *)(w + PREFETCH_BLOCKS * K * OUTS), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + PREFETCH_BLOCKS * K * OUTS + 64 * 4), _MM_HINT_T0);
        __m512i sums[ROWS_PER_TILE];
        for (int r = 0; r < rows; r++) sums[r] = _mm512_set1_epi32(-xsum[r * groups + g]);
        for (int q = 0; q < GROUP / 4; q++) {
            const __m512i wq = _mm512_loadu_si512((const void *)(w + q * 64));
            for (int r = 0; r < rows; r++) {
                const int32_t quad = *(const int32_t *)(xq + r * K + g * GROUP + 4 * q);
                sums[r] = _mm512_dpbusd_epi32(sums[r], wq, _mm512_set1_epi32(quad));
            }
        }
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * OUTS)));
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]),
                                     _mm512_mul_ps(scale, _mm512_set1_ps(xs[r * groups + g])), acc[r]);
    }
    for (int r = 0; r < rows; r++) store_outputs(out, out_bf16, out_index + r * N, acc[r]);
}

#define TILE_CASE(R) case R: block_tile(block_codes, block_scales, xq + m0 * K, xs + m0 * groups, \
    xsum + m0 * groups, K, R, out, out_bf16, m0 * N + b * OUTS, N); break;

/*
 * x: [M, K] bf16 (x_fp32 = 0) or fp32, row stride ldx elements; out: [M, N] fp32 or bf16.
 * Returns 0, -1 for a K or N the layout cannot hold, -2 when out of memory.
 */
int heron_q8_gemm(const void *x, int64_t ldx, int x_fp32, int64_t M, int64_t K,
                  const uint8_t *codes, const uint16_t *scales, int64_t N, void *out, int out_bf16) {
    if (K % GROUP || N % OUTS) return -1;
    const int64_t groups = K / GROUP;
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc(sizeof(float) * (size_t)(M * groups));
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(M * groups));
    if (!xq || !xs || !xsum) {
        free(xq), free(xs), free(xsum);
        return -2;
    }
    const size_t x_size = x_fp32 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * ldx * x_size, x_fp32, K, xq + m * K, xs + m * groups,
                     xsum + m * groups);
#pragma omp parallel for schedule(guided)  /* as gguf_matmul.c's matmul_rows */
    for (int64_t b = 0; b < N / OUTS; b++) {
        const uint8_t *block_codes = codes + b * K * OUTS;
        const uint16_t *block_scales = scales + b * groups * OUTS;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_TILE) {
            switch (M - m0 < ROWS_PER_TILE ? (int)(M - m0) : ROWS_PER_TILE) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
                TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

#endif  /* AVX-512 VNNI */
