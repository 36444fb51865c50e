/*
 * The entry points of heron's CPU kernels, for a kernel built from several sources together
 * (fused_decode.c calls the others). Each is defined, and documented, in the file named.
 */
#ifndef HERON_KERNELS_H
#define HERON_KERNELS_H

#include <stdint.h>

/* q8_gemm.c */
int heron_q8_gemm(const void *x, int64_t ldx, int x_fp32, int64_t M, int64_t K,
                  const uint8_t *codes, const uint16_t *scales, int64_t N, void *out, int out_bf16);

/* elementwise.c */
int heron_add_rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *h, int64_t h_stride,
                       int64_t rows, int64_t dim, const float *post_scale,
                       const float *pre_scale, float eps, int unit_offset, uint16_t *x_out,
                       uint16_t *y_out);
int heron_qk_norm_rope(const uint16_t *qk, int64_t qk_stride, int64_t tokens, int64_t heads,
                       int64_t dim, const float *scale, float eps, int unit_offset,
                       const uint16_t *cos, const uint16_t *sin, uint16_t *out);
int heron_act_and_mul(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t d, int act,
                      uint16_t *out);

/* paged_attention.c */
int heron_paged_decode_attention(
        const uint16_t *q, int64_t q_stride, const uint16_t *kv, int64_t num_blocks,
        int64_t block_size, int64_t num_kv_heads, int64_t dim, const int64_t *table,
        int64_t table_stride, const int64_t *seq_lens, int64_t num_seqs, int64_t num_heads,
        int64_t sliding_window, float scale, uint16_t *out);

#endif
