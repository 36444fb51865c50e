/*
 * heron_q8_gemm of q8_gemm.c in plain C, for the variants without AVX-512 VNNI: the same
 * quantization of x (per row and group of 32, round to nearest even) and the same integer
 * sums, so the same results but for the order of the float sums. Included by q8_gemm.c.
 */
#include <math.h>
#include <string.h>

#include "scalar_math.h"

static void quantize_row(const void *x, int x_fp32, int64_t K, int8_t *xq, float *xs) {
    for (int64_t g = 0; g < K / GROUP; g++) {
        float v[GROUP], amax = 0.0f;
        for (int j = 0; j < GROUP; j++) {
            const int64_t k = g * GROUP + j;
            v[j] = x_fp32 ? ((const float *)x)[k] : bf16_bits_to_fp32(((const uint16_t *)x)[k]);
            amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < GROUP; j++) {
            const float q = nearbyintf(v[j] * inv);
            xq[g * GROUP + j] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
        }
        xs[g] = amax / 127.0f;
    }
}

/* out[m, 16 b .. 16 b + 15] for one row of x and block b. */
static void block_row(const uint8_t *codes, const uint16_t *scales, const int8_t *xq,
                      const float *xs, int64_t K, float *res) {
    float acc[OUTS] = {0};
    for (int64_t g = 0; g < K / GROUP; g++) {
        int32_t sums[OUTS] = {0};
        for (int q = 0; q < GROUP / 4; q++) {
            const uint8_t *w = codes + (g * GROUP / 4 + q) * OUTS * 4;
            const int8_t *xg = xq + g * GROUP + 4 * q;
            for (int o = 0; o < OUTS; o++)
                for (int j = 0; j < 4; j++) sums[o] += ((int32_t)w[o * 4 + j] - 128) * xg[j];
        }
        for (int o = 0; o < OUTS; o++)
            acc[o] += (float)sums[o] * (fp16_to_fp32(scales[g * OUTS + o]) * xs[g]);
    }
    memcpy(res, acc, sizeof(acc));
}

int heron_q8_gemm(const void *x, int64_t ldx, int x_fp32, int64_t M, int64_t K,
                  const uint8_t *codes, const uint16_t *scales, int64_t N, void *out, int out_bf16) {
    if (K % GROUP || N % OUTS) return -1;
    const int64_t groups = K / GROUP;
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc(sizeof(float) * (size_t)(M * groups));
    if (!xq || !xs) {
        free(xq), free(xs);
        return -2;
    }
    const size_t x_size = x_fp32 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * ldx * x_size, x_fp32, K, xq + m * K, xs + m * groups);
#pragma omp parallel for schedule(guided)  /* as gguf_matmul.c's matmul_rows */
    for (int64_t b = 0; b < N / OUTS; b++) {
        for (int64_t m = 0; m < M; m++) {
            float res[OUTS];
            block_row(codes + b * K * OUTS, scales + b * groups * OUTS, xq + m * K, xs + m * groups,
                      K, res);
            for (int o = 0; o < OUTS; o++) {
                const int64_t index = m * N + b * OUTS + o;
                if (out_bf16) ((uint16_t *)out)[index] = fp32_to_bf16_bits(res[o]);
                else ((float *)out)[index] = res[o];
            }
        }
    }
    free(xq), free(xs);
    return 0;
}
