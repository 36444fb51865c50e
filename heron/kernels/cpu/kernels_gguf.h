/*
 * The entry points of gguf_matmul.c, for kernels built together with it (fused_decode.c).
 */
#ifndef HERON_KERNELS_GGUF_H
#define HERON_KERNELS_GGUF_H

#include <stdint.h>

/* Rows [rows, row_bytes] of one GGUF tensor, ggml type `type`, in place; row i of the segment
 * is stored row row_ids[i] (NULL: row i), e.g. llama.cpp's permuted q/k rows put back. */
typedef struct {
    const uint8_t *data;
    int64_t rows;
    int64_t row_bytes;
    int64_t type;
    const int64_t *row_ids;
} heron_gguf_segment;

int heron_gguf_check(const heron_gguf_segment *segs, int64_t nsegs, int64_t K);
int heron_gguf_matmul(const void *x, int64_t ldx, int x_bf16, int64_t M, int64_t K,
                      const heron_gguf_segment *segs, int64_t nsegs, void *out, int64_t ldo,
                      int out_bf16, int exact);
int heron_gguf_rows(const heron_gguf_segment *seg, int64_t K, const int64_t *ids, int64_t n,
                    void *out, int out_bf16);

#endif
