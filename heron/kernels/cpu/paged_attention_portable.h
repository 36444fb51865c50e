/*
 * attend_one of paged_attention.c in plain C, for the variants without AVX-512 (avx2,
 * portable): fp32 scores and softmax, values summed in fp32, the output rounded to bf16 once.
 * Included by paged_attention.c.
 */
#include "scalar_math.h"

#define LANES 16

/* dim is a multiple of 32 (the caller checks): LANES partial sums, one per lane of 16. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t dim) {
    float acc[LANES] = {0};
    for (int64_t i = 0; i < dim; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += bf16_bits_to_fp32(a[i + j]) * bf16_bits_to_fp32(b[i + j]);
    float total = 0.0f;
    for (int j = 0; j < LANES; j++) total += acc[j];
    return total;
}

static void attend_one(const uint16_t *q, const uint16_t *kv, int64_t value_offset,
                       const int64_t *blocks, int64_t first, int64_t last, int64_t block_size,
                       int64_t row, int64_t head_off, int group, int64_t dim, float scale,
                       float *scores, const uint16_t **keys, uint16_t *out) {
    const int64_t n = last - first;
    for (int64_t i = 0; i < n; i++) keys[i] = slot_of(kv, blocks, first + i, block_size, row) + head_off;
    for (int64_t i = 0; i < n; i++)
        for (int g = 0; g < group; g++) scores[g * n + i] = dot_bf16(keys[i], q + g * dim, dim) * scale;
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        float *s = scores + g * n, mx = s[0], sum = 0.0f;
        for (int64_t i = 1; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        for (int64_t i = 0; i < n; i++) {
            s[i] = exp_scalar(s[i] - mx);
            sum += s[i];
        }
        inv_sum[g] = 1.0f / sum;
    }
    for (int64_t d = 0; d < dim; d += 16) {  /* 16 dimensions at a time, per query head: the
                                                 * accumulators stay in registers */
        for (int g = 0; g < group; g++) {
            const float *p = scores + g * n;
            float acc[16] = {0};
            for (int64_t i = 0; i < n; i++) {
                const uint16_t *v = keys[i] + value_offset + d;
                for (int j = 0; j < 16; j++) acc[j] += p[i] * bf16_bits_to_fp32(v[j]);
            }
            for (int j = 0; j < 16; j++) out[g * dim + d + j] = fp32_to_bf16_bits(acc[j] * inv_sum[g]);
        }
    }
}
