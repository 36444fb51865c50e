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
 * scored together (one read of each key), softmax in fp32, then the values are summed 32
 * dimensions at a time with the G accumulators in registers (up to 4 heads per pass over the
 * keys). The rows are scattered over the cache's blocks and come from DRAM: each key row is
 * prefetched a few keys ahead and each value row into L2 while the scores are computed (16
 * sequences of 170 tokens, Gemma 3 270M's heads, one thread: 0.53 -> 0.41 ms per layer, the same
 * bits). Nothing is gathered or copied:
 * the PyTorch path copies every visible K/V block first (at 16 requests x 200 tokens that copy
 * cost more than the attention itself). With fewer tasks than threads (one request of a model
 * with one K/V head), a task's keys, heads and value dimensions are shared out (attend_split).
 */
#include <stdlib.h>

#include "kernels.h"

#define MAX_GROUP 16

/* Address of position `pos` of a sequence (keys; values are `value_offset` further). */
static inline const uint16_t *slot_of(const uint16_t *kv, const int64_t *blocks, int64_t pos,
                                      int64_t block_size, int64_t row) {
    return kv + (blocks[pos / block_size] * block_size + pos % block_size) * row;
}

/* The first position a sequence of length len sees: len - W with a sliding window W, else 0. */
static inline int64_t first_visible(int64_t len, int64_t sliding_window) {
    return sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
}

/* Lines of a K or V row of `bytes` towards L1 (locality 3) or L2 (2). */
#define PREFETCH_ROW(p, bytes, locality) \
    for (int64_t b_ = 0; b_ < (bytes); b_ += 64) __builtin_prefetch((const char *)(p) + b_, 0, locality)
#define KEY_AHEAD 4  /* key rows prefetched this many keys ahead (2-12 measured alike) */

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#include "paged_attention_portable.h"
#else
#include "vector_math.h"

/* scores[g * ld + i] = scale * q_g . k_i for the G (<= 4, constant once inlined) query heads
 * q[0 .. G): each key's chunks are read once for the G heads; per (key, head) the sums run over
 * the chunks in order, as they always did. */
static inline __attribute__((always_inline)) void head_scores(
        const uint16_t *q, int G, const uint16_t *const *keys, int64_t n, int64_t dim,
        float scale, int64_t value_offset, float *scores, int64_t ld) {
    const int64_t chunks = dim / 32, row_bytes = dim * (int64_t)sizeof(uint16_t);
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *k = keys[i];
        if (value_offset) {  /* the first heads: the key rows ahead, this key's value row */
            if (i + KEY_AHEAD < n) PREFETCH_ROW(keys[i + KEY_AHEAD], row_bytes, 3);
            PREFETCH_ROW(k + value_offset, row_bytes, 2);
        }
        __m512 acc[4];
        for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) {
            const __m512i kc = _mm512_loadu_si512((const void *)(k + 32 * c));
            for (int g = 0; g < G; g++)
                acc[g] = dot_bf16x32(acc[g], kc, _mm512_loadu_si512((const void *)(q + g * dim + 32 * c)));
        }
        for (int g = 0; g < G; g++) scores[g * ld + i] = _mm512_reduce_add_ps(acc[g]) * scale;
    }
}

/* out_g[d .. d + 32) = inv_sum[g] sum_i p_g(i) v_i for the G (<= 4) heads: 2 G accumulators in
 * registers, the keys in order (the same sums as one head and 16 dimensions at a time). */
static inline __attribute__((always_inline)) void head_values(
        const float *scores, int G, int64_t n, const uint16_t *const *keys, int64_t value_offset,
        int64_t d, int64_t dim, const float *inv_sum, uint16_t *out) {
    __m512 acc[4][2];
    for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *v = keys[i] + value_offset + d;
        const __m512 v0 = load_bf16(v), v1 = load_bf16(v + 16);
        for (int g = 0; g < G; g++) {
            const __m512 p = _mm512_set1_ps(scores[g * n + i]);
            acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
            acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int h = 0; h < 2; h++) {
            const __m512 o = _mm512_mul_ps(acc[g][h], _mm512_set1_ps(inv_sum[g]));
            _mm256_storeu_si256((__m256i *)(out + g * dim + d + 16 * h), fp32_to_bf16x16(o));
        }
}

#define HEADS_CASE(G, call) case G: call; break;
#define BY_HEADS(gn, call_of) switch (gn) { \
    HEADS_CASE(1, call_of(1)) HEADS_CASE(2, call_of(2)) HEADS_CASE(3, call_of(3)) \
    default: call_of(4); }

/* scores[g * n + i] = scale * q_g . k_(first + i) for i in [i0, i1): the key rows of the range
 * prefetched a few keys ahead, each value row into L2 for the sums after the softmax. */
static void attend_scores(const uint16_t *q, const uint16_t *const *keys, int64_t n, int64_t i0,
                          int64_t i1, int64_t value_offset, int group, int64_t dim, float scale,
                          float *scores) {
    const int64_t row_bytes = dim * (int64_t)sizeof(uint16_t);
    for (int64_t i = i0; i < i1 && i < i0 + KEY_AHEAD; i++) PREFETCH_ROW(keys[i], row_bytes, 3);
    for (int g0 = 0; g0 < group; g0 += 4) {
        const int gn = group - g0 < 4 ? group - g0 : 4;
#define SCORES(G) head_scores(q + g0 * dim, G, keys + i0, i1 - i0, dim, scale, g0 ? 0 : value_offset, \
                              scores + g0 * n + i0, n)
        BY_HEADS(gn, SCORES)
#undef SCORES
    }
}

/* One query head's scores s[0 .. n) to exp(s - max), in place; returns 1 / their sum. */
static float softmax_head(float *s, int64_t n) {
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
    return 1.0f / _mm512_reduce_add_ps(vsum);
}

#define VALUE_CHUNK 32  /* dimensions attend_values sums at a time */

/* out_g[d0 .. d1) = inv_sum[g] sum_i p_g(i) v_i, VALUE_CHUNK dimensions and up to 4 heads at a
 * time; d0 and d1 multiples of VALUE_CHUNK. */
static void attend_values(const float *scores, int64_t n, int group, const uint16_t *const *keys,
                          int64_t value_offset, int64_t d0, int64_t d1, int64_t dim,
                          const float *inv_sum, uint16_t *out) {
    for (int g0 = 0; g0 < group; g0 += 4) {
        const int gn = group - g0 < 4 ? group - g0 : 4;
        for (int64_t d = d0; d < d1; d += VALUE_CHUNK) {
#define VALUES(G) head_values(scores + g0 * n, G, n, keys, value_offset, d, dim, inv_sum + g0, \
                              out + g0 * dim)
            BY_HEADS(gn, VALUES)
#undef VALUES
        }
    }
}

#endif  /* AVX-512 */

/* keys[i] for i in [i0, i1): this head's key row of position first + i (its value row is
 * value_offset further); the divisions by block_size happen here once, not in the loops. */
static void fill_keys(const uint16_t *kv, const int64_t *blocks, int64_t first, int64_t i0,
                      int64_t i1, int64_t block_size, int64_t row, int64_t head_off,
                      const uint16_t **keys) {
    for (int64_t i = i0; i < i1; i++) keys[i] = slot_of(kv, blocks, first + i, block_size, row) + head_off;
}

/* One (sequence, K/V head) task on one thread: positions [first, last), its G query heads. */
static void attend_one(const uint16_t *q, const uint16_t *kv, int64_t value_offset,
                       const int64_t *blocks, int64_t first, int64_t last, int64_t block_size,
                       int64_t row, int64_t head_off, int group, int64_t dim, float scale,
                       float *scores, const uint16_t **keys, uint16_t *out) {
    const int64_t n = last - first;
    fill_keys(kv, blocks, first, 0, n, block_size, row, head_off, keys);
    attend_scores(q, keys, n, 0, n, value_offset, group, dim, scale, scores);
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < group; g++) inv_sum[g] = softmax_head(scores + g * n, n);
    attend_values(scores, n, group, keys, value_offset, 0, dim, dim, inv_sum, out);
}

#if defined(_OPENMP)
#include <omp.h>
static int max_threads(void) { return omp_get_max_threads(); }
#else
static int max_threads(void) { return 1; }
#endif

#define SPLIT_MIN_KEYS 128  /* a task's keys below which it is not split */

/*
 * Fewer tasks than threads (one decoding request of a model with one K/V head, as Gemma 3 270M;
 * or two requests on a machine of 8 cores): each task's keys are scored in `parts` ranges by
 * different threads, then its heads' softmaxes and its value dimensions (VALUE_CHUNK at a time)
 * are shared out. Each number is made by the same operations in the same order as attend_one
 * makes it on one thread: the same bits.
 */
static int attend_split(const uint16_t *q, int64_t q_stride, const uint16_t *kv,
                        int64_t value_offset, int64_t block_size, int64_t num_kv_heads, int64_t dim,
                        const int64_t *table, int64_t table_stride, const int64_t *seq_lens,
                        int64_t num_seqs, int64_t num_heads, int64_t sliding_window, float scale,
                        uint16_t *out, int64_t parts) {
    const int group = (int)(num_heads / num_kv_heads);
    const int64_t tasks = num_seqs * num_kv_heads, row = num_kv_heads * dim, chunks = dim / VALUE_CHUNK;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)tasks), *n = malloc(sizeof(int64_t) * (size_t)tasks);
    float **scores = calloc((size_t)tasks, sizeof(float *));
    const uint16_t ***keys = calloc((size_t)tasks, sizeof(uint16_t **));
    float *inv_sum = malloc(sizeof(float) * (size_t)(tasks * group));
    int failed = !first || !n || !scores || !keys || !inv_sum;
    for (int64_t t = 0; t < tasks && !failed; t++) {
        const int64_t len = seq_lens[t / num_kv_heads];
        first[t] = first_visible(len, sliding_window);
        n[t] = len - first[t];
        scores[t] = malloc(sizeof(float) * (size_t)(group * n[t] + 16));
        keys[t] = malloc(sizeof(uint16_t *) * (size_t)(n[t] + 1));
        failed = !scores[t] || !keys[t];
    }
    if (!failed) {
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < tasks * parts; p++) {
            const int64_t t = p / parts, part = p % parts, b = t / num_kv_heads, h = t % num_kv_heads;
            const int64_t i0 = n[t] * part / parts, i1 = n[t] * (part + 1) / parts;
            fill_keys(kv, table + b * table_stride, first[t], i0, i1, block_size, row, h * dim, keys[t]);
            attend_scores(q + b * q_stride + h * group * dim, keys[t], n[t], i0, i1, value_offset,
                          group, dim, scale, scores[t]);
        }
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < tasks * group; p++)
            inv_sum[p] = softmax_head(scores[p / group] + (p % group) * n[p / group], n[p / group]);
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < tasks * chunks; p++) {
            const int64_t t = p / chunks, c = p % chunks, b = t / num_kv_heads, h = t % num_kv_heads;
            attend_values(scores[t], n[t], group, keys[t], value_offset, c * VALUE_CHUNK,
                          (c + 1) * VALUE_CHUNK, dim, inv_sum + t * group,
                          out + (b * num_heads + h * group) * dim);
        }
    }
    for (int64_t t = 0; t < tasks && scores && keys; t++) free(scores[t]), free((void *)keys[t]);
    free(first), free(n), free(scores), free(keys), free(inv_sum);
    return failed ? -2 : 0;
}

int heron_paged_decode_attention(
        const uint16_t *q, int64_t q_stride, const uint16_t *kv, int64_t num_blocks,
        int64_t block_size, int64_t num_kv_heads, int64_t dim, const int64_t *table,
        int64_t table_stride, const int64_t *seq_lens, int64_t num_seqs, int64_t num_heads,
        int64_t sliding_window, float scale, uint16_t *out) {
    const int group = (int)(num_heads / num_kv_heads);
    if (dim % 32 || num_heads % num_kv_heads || group > MAX_GROUP) return -1;
    const int64_t row = num_kv_heads * dim;  /* elements per cache slot */
    const int64_t value_offset = num_blocks * block_size * row;
    const int64_t tasks = num_seqs * num_kv_heads, threads = max_threads();
    int64_t longest = 0;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t n = seq_lens[b] - first_visible(seq_lens[b], sliding_window);
        longest = n > longest ? n : longest;
    }
    if (tasks < threads && longest >= SPLIT_MIN_KEYS)
        return attend_split(q, q_stride, kv, value_offset, block_size, num_kv_heads, dim, table,
                            table_stride, seq_lens, num_seqs, num_heads, sliding_window, scale, out,
                            threads / tasks);
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed) if (num_seqs * num_kv_heads > 1)
    for (int64_t task = 0; task < num_seqs * num_kv_heads; task++) {
        const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t len = seq_lens[b];
        const int64_t first = first_visible(len, sliding_window);
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
