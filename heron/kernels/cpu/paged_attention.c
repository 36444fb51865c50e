/*
 * Decode attention straight from the paged KV cache (AVX-512; the other variants compile
 * paged_attention_portable.h), built on first use by heron/kernels/cpu/__init__.py and called
 * through ctypes.
 *
 *   kv      bf16 [2, num_blocks, block_size, Hkv, D]   0 = keys, 1 = values
 *   q       bf16 [B, H, D]        one query token per sequence, token stride q_stride elements
 *   table   int64 [B, table_stride]  block ids of each sequence, in position order
 *   seq_len int64 [B]             context length including the new token
 *   out     bf16 [B, H, D]        contiguous
 *
 * A sequence of length L sees positions [L - W, L) with a sliding window W, else [0, L). Each
 * (sequence, K/V head) is one task: the G = H / Hkv query heads that share the K/V head are
 * scored together (one read of each key), softmax in fp32, then the values are summed 16
 * dimensions at a time with the G accumulators in registers. Nothing is gathered or copied:
 * the PyTorch path copies every visible K/V block first (at 16 requests x 200 tokens that copy
 * cost more than the attention itself).
 */
#include <stdlib.h>

#include "kernels.h"

#define MAX_GROUP 16

/* Address of position `pos` of a sequence (keys; values are `value_offset` further). */
static inline const uint16_t *slot_of(const uint16_t *kv, const int64_t *blocks, int64_t pos,
                                      int64_t block_size, int64_t row) {
    return kv + (blocks[pos / block_size] * block_size + pos % block_size) * row;
}

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#include "paged_attention_portable.h"
#else
#include "vector_math.h"

static void attend_one(const uint16_t *q, const uint16_t *kv, int64_t value_offset,
                       const int64_t *blocks, int64_t first, int64_t last, int64_t block_size,
                       int64_t row, int64_t head_off, int group, int64_t dim, float scale,
                       float *scores, const uint16_t **keys, uint16_t *out) {
    const int64_t n = last - first;
    const int64_t chunks = dim / 32;
    /* keys[i]: this head's key of position first + i (its value is value_offset further); the
     * divisions by block_size happen here once, not in the loops below */
    for (int64_t i = 0; i < n; i++) keys[i] = slot_of(kv, blocks, first + i, block_size, row) + head_off;
    /* scores[g * n + i] = scale * q_g . k_(first + i) */
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *k = keys[i];
        for (int g = 0; g < group; g++) {
            const uint16_t *qg = q + g * dim;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                acc = dot_bf16x32(acc, _mm512_loadu_si512((const void *)(k + 32 * c)),
                                  _mm512_loadu_si512((const void *)(qg + 32 * c)));
            }
            scores[g * n + i] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    /* softmax per query head, in place; 1 / sum kept for the output */
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        float *s = scores + g * n;
        float mx = s[0];
        for (int64_t i = 1; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        __m512 vmax = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 e = exp_fp32(_mm512_sub_ps(_mm512_loadu_ps(s + i), vmax));
            _mm512_storeu_ps(s + i, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (i < n) {
            __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
            __m512 e = exp_fp32(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), vmax));
            _mm512_mask_storeu_ps(s + i, m, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        }
        inv_sum[g] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
    /* out_g = sum_i p_g(i) v_i, 16 dimensions at a time */
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 acc[MAX_GROUP];
        for (int g = 0; g < group; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            const uint16_t *v = keys[i] + value_offset + d;
            __m512 vv = load_bf16(v);
            for (int g = 0; g < group; g++)
                acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + i]), vv, acc[g]);
        }
        for (int g = 0; g < group; g++) {
            __m512 o = _mm512_mul_ps(acc[g], _mm512_set1_ps(inv_sum[g]));
            _mm256_storeu_si256((__m256i *)(out + g * dim + d), fp32_to_bf16x16(o));
        }
    }
}

#endif  /* AVX-512 */

int heron_paged_decode_attention(
        const uint16_t *q, int64_t q_stride, const uint16_t *kv, int64_t num_blocks,
        int64_t block_size, int64_t num_kv_heads, int64_t dim, const int64_t *table,
        int64_t table_stride, const int64_t *seq_lens, int64_t num_seqs, int64_t num_heads,
        int64_t sliding_window, float scale, uint16_t *out) {
    const int group = (int)(num_heads / num_kv_heads);
    if (dim % 32 || num_heads % num_kv_heads || group > MAX_GROUP) return -1;
    const int64_t row = num_kv_heads * dim;  /* elements per cache slot */
    const int64_t value_offset = num_blocks * block_size * row;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed) if (num_seqs * num_kv_heads > 1)
    for (int64_t task = 0; task < num_seqs * num_kv_heads; task++) {
        const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t len = seq_lens[b];
        const int64_t first = sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
        float *scores = malloc(sizeof(float) * (size_t)(group * (len - first) + 16));
        const uint16_t **keys = malloc(sizeof(uint16_t *) * (size_t)(len - first + 1));
        if (!scores || !keys) {
            free(scores), free(keys);
            failed = 1;
            continue;
        }
        attend_one(q + b * q_stride + h * group * dim, kv, value_offset, table + b * table_stride,
                   first, len, block_size, row, h * dim, group, dim, scale, scores, keys,
                   out + (b * num_heads + h * group) * dim);
        free(scores), free(keys);
    }
    return failed ? -2 : 0;
}
