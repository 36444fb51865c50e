/*
 * A whole decode step of a decoder stack in one call: every layer's projections (int8 copies
 * or the GGUF file's blocks), norms, RoPE, K/V writes and paged attention, from the embedded
 * tokens to the final norm. The layers are described by data (heron/models/fused_decode.py):
 * Llama, Mistral, Qwen2, Qwen3 and Gemma 3 differ in which norms are present and how they round,
 * a q/k/v bias, q/k norms, RoPE tables and sliding windows, the attention scale and activation.
 * Built on first use together with q8_gemm.c, gguf_matmul.c, elementwise.c and
 * paged_attention.c (whose functions it calls, see kernels.h) by heron/kernels/cpu/__init__.py.
 *
 * Why: at one decoding request the arithmetic between two projections takes microseconds, but
 * each projection streams megabytes of weights through the caches and evicts the Python
 * interpreter and PyTorch's dispatcher; their next operator call then runs from DRAM. Measured
 * on a 2-core Cascade Lake VM: an add+norm call costs 11 us with warm caches and 97 us after a
 * 40 MB sweep, and the ~20 small calls per layer added ~12 ms to a 30 ms step. Here the whole
 * stack is one call and the code between projections is a few kilobytes of C.
 *
 * The sequence of kernel calls, their arguments and so every rounding are those of the
 * PyTorch modules (heron/models/gemma3.py, llama.py), so the two paths agree bit for bit. Per
 * layer, for B tokens (one per request), x the residual stream and n = input_norm(x):
 *
 *   qkv = n @ Wqkv^T (+ bias)   [B, (H + 2 Hkv) D]
 *   qk  = rope(norm?(q | k))    [B, H + Hkv, D]      K/V cache[slot] <- (k, v)
 *   a   = attention(q, cache)   [B, H D]
 *   x, n = x + post_attn?(a @ Wo^T), pre_ff(.)
 *   x, n = x + post_ff?(act(n @ Wgate^T) * (n @ Wup^T) @ Wdown^T), next_input_norm(.)
 *
 * where a norm marked ? may be absent (NULL scale).
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kernels_gguf.h"
#include "scalar_math.h"

/* A projection: heron's int8 layout (Q8Weight, q8_gemm.c), or a GGUF file's blocks
 * (GGUFWeight, gguf_matmul.c) when codes is NULL. */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales;
    const heron_gguf_segment *segments;
    int64_t num_segments;
    int64_t exact;               /* GGUF: float32 products (else int8 activations) */
    int64_t out_features;
} heron_matrix;

typedef struct {
    heron_matrix qkv, o, gate_up, down;
    const uint16_t *qkv_bias;    /* [(H + 2 Hkv) D] bf16, or NULL */
    const float *qk_scale;       /* [H + Hkv, D]: q norm's scale per q head, then k norm's; or NULL */
    const float *post_attn_scale, *pre_ff_scale, *post_ff_scale;  /* [hidden] each; post: or NULL */
    const float *next_scale;     /* the next layer's input norm, or the final norm */
    uint16_t *kv_cache;          /* [2, num_blocks, block_size, Hkv, D] bf16 */
    int64_t sliding_window;      /* 0: full attention */
    int64_t rope;                /* which of the batch's cos/sin tables this layer uses */
    float attn_scale;
} heron_decode_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t num_blocks, block_size;
    float eps;
    int64_t unit_offset;         /* norms round as Gemma's (1) or Llama's (0): elementwise.c */
    int64_t activation;          /* as heron_act_and_mul: 0 GELU (tanh), 1 SiLU */
    const float *input_scale;    /* layer 0's input norm */
    const heron_decode_layer *layers;
} heron_decode_model;

typedef struct {
    int64_t num_tokens;          /* B: one token per decoding request */
    const uint16_t *x;           /* [B, hidden] bf16: the scaled embeddings */
    const uint16_t *cos[2], *sin[2];  /* [B, D / 2] bf16 per RoPE table */
    const int64_t *slots;        /* [B]: where each token's K/V goes */
    const int64_t *block_tables; /* [B, table_stride] */
    int64_t table_stride;
    const int64_t *seq_lens;     /* [B], the new token included */
    uint16_t *out;               /* [B, hidden] bf16: final_norm(x) */
} heron_decode_batch;

static int matmul(const uint16_t *x, int64_t rows, int64_t in_features, const heron_matrix *w,
                  uint16_t *out) {
    if (!w->codes)
        return heron_gguf_matmul(x, in_features, 1, rows, in_features, w->segments,
                                 w->num_segments, out, w->out_features, 1, (int)w->exact);
    return heron_q8_gemm(x, in_features, 0, rows, in_features, w->codes, w->scales,
                         w->out_features, out, 1);
}

/* Write each token's k (normed and rotated, from qk) and v (from qkv) into its cache slot. */
static void write_kv(const heron_decode_model *m, const heron_decode_batch *b, uint16_t *cache,
                     const uint16_t *qk, const uint16_t *qkv) {
    const int64_t H = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim;
    const int64_t row = Hkv * D, value_offset = m->num_blocks * m->block_size * row;
    for (int64_t t = 0; t < b->num_tokens; t++) {
        uint16_t *key = cache + b->slots[t] * row;
        memcpy(key, qk + (t * (H + Hkv) + H) * D, sizeof(uint16_t) * (size_t)row);
        memcpy(key + value_offset, qkv + t * (H + 2 * Hkv) * D + (H + Hkv) * D,
               sizeof(uint16_t) * (size_t)row);
    }
}

typedef struct {
    uint16_t *x, *n, *qkv, *qk, *attn, *proj, *gate_up, *act;
} buffers;

/* out[t] = bf16(out[t] + bias), as PyTorch adds a bf16 bias to a bf16 result. */
static void add_bias(uint16_t *out, int64_t rows, int64_t cols, const uint16_t *bias) {
    for (int64_t t = 0; t < rows; t++)
        for (int64_t j = 0; j < cols; j++)
            out[t * cols + j] = fp32_to_bf16_bits(bf16_bits_to_fp32(out[t * cols + j])
                                                  + bf16_bits_to_fp32(bias[j]));
}

static int layer(const heron_decode_model *m, const heron_decode_layer *l,
                 const heron_decode_batch *b, const buffers *s) {
    const int64_t B = b->num_tokens, H = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim;
    const int64_t hidden = m->hidden, qkv_size = (H + 2 * Hkv) * D;
    const int unit_offset = (int)m->unit_offset;
    int status = matmul(s->n, B, hidden, &l->qkv, s->qkv);
    if (!status && l->qkv_bias) add_bias(s->qkv, B, qkv_size, l->qkv_bias);
    if (!status) status = heron_qk_norm_rope(s->qkv, qkv_size, B, H + Hkv, D, l->qk_scale, m->eps,
                                             unit_offset, b->cos[l->rope], b->sin[l->rope], s->qk);
    if (status) return status;
    write_kv(m, b, l->kv_cache, s->qk, s->qkv);
    status = heron_paged_decode_attention(s->qk, (H + Hkv) * D, l->kv_cache, m->num_blocks,
                                          m->block_size, Hkv, D, b->block_tables, b->table_stride,
                                          b->seq_lens, B, H, l->sliding_window, l->attn_scale,
                                          s->attn);
    if (!status) status = matmul(s->attn, B, H * D, &l->o, s->proj);
    if (!status) status = heron_add_rms_norm(s->x, hidden, s->proj, hidden, B, hidden,
                                             l->post_attn_scale, l->pre_ff_scale, m->eps, unit_offset,
                                             s->x, s->n);
    if (!status) status = matmul(s->n, B, hidden, &l->gate_up, s->gate_up);
    if (!status) status = heron_act_and_mul(s->gate_up, 2 * m->intermediate, B, m->intermediate,
                                            (int)m->activation, s->act);
    if (!status) status = matmul(s->act, B, m->intermediate, &l->down, s->proj);
    if (!status) status = heron_add_rms_norm(s->x, hidden, s->proj, hidden, B, hidden,
                                             l->post_ff_scale, l->next_scale, m->eps, unit_offset,
                                             s->x, s->n);
    return status;
}

/* Returns 0, or the first failing kernel's status (-2 also when out of memory). */
int heron_fused_decode(const heron_decode_model *m, const heron_decode_batch *b) {
    const int64_t B = b->num_tokens, H = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim;
    const int64_t hidden = m->hidden;
    const int64_t sizes[] = {hidden, hidden, (H + 2 * Hkv) * D, (H + Hkv) * D, H * D, hidden,
                             2 * m->intermediate, m->intermediate};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) total += B * sizes[i];
    uint16_t *memory = malloc(sizeof(uint16_t) * (size_t)total);
    if (!memory) return -2;
    buffers s;
    uint16_t *next = memory, **fields[] = {&s.x, &s.n, &s.qkv, &s.qk, &s.attn, &s.proj, &s.gate_up, &s.act};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        *fields[i] = next;
        next += B * sizes[i];
    }
    memcpy(s.x, b->x, sizeof(uint16_t) * (size_t)(B * hidden));
    int status = heron_add_rms_norm(s.x, hidden, NULL, 0, B, hidden, NULL, m->input_scale, m->eps,
                                    (int)m->unit_offset, s.x, s.n);
    for (int64_t i = 0; !status && i < m->num_layers; i++) status = layer(m, &m->layers[i], b, &s);
    if (!status) memcpy(b->out, s.n, sizeof(uint16_t) * (size_t)(B * hidden));
    free(memory);
    return status;
}
