/*
 * The phases of paged_attention.c (attend_scores, softmax_head, attend_values) in plain C, for
 * the variants without AVX-512 (avx2, portable): fp32 scores and softmax, values summed in fp32, the output rounded to bf16 once.
 * The avx2 variant runs the dot products and the value sums in AVX2 intrinsics with the
 * operations the compiler makes of the plain C (per lane fused multiply-adds, the same order),
 * up to 4 query heads at a time: each key's chunks are converted once for them, and the
 * accumulators stay in registers. The same numbers as the plain C; at 16 sequences of 170
 * tokens (Gemma 3 270M's heads, one thread) 0.63 -> 0.39 ms per layer with the prefetches.
 * Included by paged_attention.c.
 */
#include "scalar_math.h"

#define LANES 16

#if defined(__AVX2__)
#include <immintrin.h>

/* 8 bf16 values as floats (exact). */
static inline __m256 load_bf16x8(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#endif

/* dim is a multiple of 32 (the caller checks): LANES partial sums, one per lane of 16 (fused
 * multiply-adds, as the compiler contracts the plain C), added up in lane order. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t dim) {
    float acc[LANES] = {0};
#if defined(__AVX2__)
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += LANES) {
        lo = _mm256_fmadd_ps(load_bf16x8(a + i), load_bf16x8(b + i), lo);
        hi = _mm256_fmadd_ps(load_bf16x8(a + i + 8), load_bf16x8(b + i + 8), hi);
    }
    _mm256_storeu_ps(acc, lo), _mm256_storeu_ps(acc + 8, hi);
#else
    for (int64_t i = 0; i < dim; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += bf16_bits_to_fp32(a[i + j]) * bf16_bits_to_fp32(b[i + j]);
#endif
    float total = 0.0f;
    for (int j = 0; j < LANES; j++) total += acc[j];
    return total;
}

#if defined(__AVX2__)
/* scores[g * ld + i] = scale * q_g . k_i for G (<= 4, constant once inlined) heads, qf: their q
 * as floats. dot_bf16's numbers: per (key, head) the same lo / hi fused multiply-adds, summed in
 * lane order; each key's chunks are converted once for the G heads, q once per call. */
static inline __attribute__((always_inline)) void head_scores(
        const float *qf, int G, const uint16_t *const *keys, int64_t n, int64_t dim, float scale,
        int64_t value_offset, float *scores, int64_t ld) {
    const int64_t row_bytes = dim * (int64_t)sizeof(uint16_t);
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *k = keys[i];
        if (value_offset) {  /* the first heads: the key rows ahead, this key's value row */
            if (i + KEY_AHEAD < n) PREFETCH_ROW(keys[i + KEY_AHEAD], row_bytes, 3);
            PREFETCH_ROW(k + value_offset, row_bytes, 2);
        }
        __m256 lo[4], hi[4];
        for (int g = 0; g < G; g++) lo[g] = hi[g] = _mm256_setzero_ps();
        for (int64_t c = 0; c < dim; c += LANES) {
            const __m256 k0 = load_bf16x8(k + c), k1 = load_bf16x8(k + c + 8);
            for (int g = 0; g < G; g++) {
                lo[g] = _mm256_fmadd_ps(k0, _mm256_loadu_ps(qf + g * dim + c), lo[g]);
                hi[g] = _mm256_fmadd_ps(k1, _mm256_loadu_ps(qf + g * dim + c + 8), hi[g]);
            }
        }
        for (int g = 0; g < G; g++) {
            float acc[LANES];
            _mm256_storeu_ps(acc, lo[g]), _mm256_storeu_ps(acc + 8, hi[g]);
            float total = 0.0f;
            for (int j = 0; j < LANES; j++) total += acc[j];
            scores[g * ld + i] = total * scale;
        }
    }
}

/* weighted_values for G (<= 4, constant once inlined) heads from g0: the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void head_values(
        const float *scores, int G, int64_t n, const uint16_t *const *keys, int64_t value_offset,
        int64_t d, int64_t dim, const float *inv_sum, uint16_t *out) {
    __m256 acc[4][2];
    for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *v = keys[i] + value_offset + d;
        const __m256 v0 = load_bf16x8(v), v1 = load_bf16x8(v + 8);
        for (int g = 0; g < G; g++) {
            const __m256 p = _mm256_set1_ps(scores[g * n + i]);
            acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);
            acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);
        }
    }
    for (int g = 0; g < G; g++) {
        float res[16];
        _mm256_storeu_ps(res, acc[g][0]), _mm256_storeu_ps(res + 8, acc[g][1]);
        for (int j = 0; j < 16; j++) out[g * dim + d + j] = fp32_to_bf16_bits(res[j] * inv_sum[g]);
    }
}

#define HEADS_CASE(G, call) case G: call; break;
#define BY_HEADS(gn, call_of) switch (gn) { \
    HEADS_CASE(1, call_of(1)) HEADS_CASE(2, call_of(2)) HEADS_CASE(3, call_of(3)) \
    default: call_of(4); }
#endif

/* out_g[d .. d + 16] = the p_g-weighted sum of the values, times inv_sum[g], for all g (the
 * portable variant; avx2: head_values). */
static inline void weighted_values(const float *scores, int64_t n, int group,
                                   const uint16_t *const *keys, int64_t value_offset, int64_t d,
                                   int64_t dim, const float *inv_sum, uint16_t *out) {
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

/* scores[g * n + i] = scale * q_g . k_i for i in [i0, i1) (as paged_attention.c's): the key
 * rows of the range prefetched a few keys ahead, each value row into L2. */
static void attend_scores(const uint16_t *q, const uint16_t *const *keys, int64_t n, int64_t i0,
                          int64_t i1, int64_t value_offset, int group, int64_t dim, float scale,
                          float *scores) {
    const int64_t row_bytes = dim * (int64_t)sizeof(uint16_t);
    for (int64_t i = i0; i < i1 && i < i0 + KEY_AHEAD; i++) PREFETCH_ROW(keys[i], row_bytes, 3);
#if defined(__AVX2__)
    float qf[MAX_GROUP * 256];
    const int converted = group * dim <= MAX_GROUP * 256;
    if (converted) {
        for (int64_t j = 0; j < group * dim; j++) qf[j] = bf16_bits_to_fp32(q[j]);
        for (int g0 = 0; g0 < group; g0 += 4) {
            const int gn = group - g0 < 4 ? group - g0 : 4;
#define SCORES(G) head_scores(qf + g0 * dim, G, keys + i0, i1 - i0, dim, scale, \
                              g0 ? 0 : value_offset, scores + g0 * n + i0, n)
            BY_HEADS(gn, SCORES)
#undef SCORES
        }
    }
#else
    const int converted = 0;
#endif
    for (int64_t i = i0; i < i1 && !converted; i++) {
        if (i + KEY_AHEAD < i1) PREFETCH_ROW(keys[i + KEY_AHEAD], row_bytes, 3);
        PREFETCH_ROW(keys[i] + value_offset, row_bytes, 2);
        for (int g = 0; g < group; g++) scores[g * n + i] = dot_bf16(keys[i], q + g * dim, dim) * scale;
    }
}

/* One query head's scores s[0 .. n) to exp(s - max), in place; returns 1 / their sum. */
static float softmax_head(float *s, int64_t n) {
    float mx = s[0], sum = 0.0f;
    for (int64_t i = 1; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    for (int64_t i = 0; i < n; i++) {
        s[i] = exp_scalar(s[i] - mx);
        sum += s[i];
    }
    return 1.0f / sum;
}

#define VALUE_CHUNK 16  /* dimensions attend_values sums at a time */

/* out_g[d0 .. d1) = inv_sum[g] sum_i p_g(i) v_i; d0 and d1 multiples of VALUE_CHUNK. */
static void attend_values(const float *scores, int64_t n, int group, const uint16_t *const *keys,
                          int64_t value_offset, int64_t d0, int64_t d1, int64_t dim,
                          const float *inv_sum, uint16_t *out) {
#if defined(__AVX2__)
    for (int g0 = 0; g0 < group; g0 += 4) {
        const int gn = group - g0 < 4 ? group - g0 : 4;
        for (int64_t d = d0; d < d1; d += VALUE_CHUNK) {
#define VALUES(G) head_values(scores + g0 * n, G, n, keys, value_offset, d, dim, inv_sum + g0, \
                              out + g0 * dim)
            BY_HEADS(gn, VALUES)
#undef VALUES
        }
    }
#else
    for (int64_t d = d0; d < d1; d += VALUE_CHUNK)  /* the accumulators stay in registers */
        weighted_values(scores, n, group, keys, value_offset, d, dim, inv_sum, out);
#endif
}
