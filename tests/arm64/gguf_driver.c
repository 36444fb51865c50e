/*
 * Runs heron_gguf_matmul (heron/kernels/cpu/gguf_matmul.c, portable variant) on cases read from
 * a file and writes the results to another: the ARM64 check of tests/test_kernels_arm64.py,
 * cross-compiled and run under qemu-aarch64, where no Python runs.
 *
 * Input: int64 count, then per case int64 M, K, N, type, row_bytes, exact; N * row_bytes bytes
 * of blocks; M * K float32 activations. Output: per case M * N float32 (or one int64 status
 * where the kernel refused the case).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels_gguf.h"

static int read_all(FILE *f, void *dst, size_t bytes) { return fread(dst, 1, bytes, f) == bytes; }

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return 3;
    int64_t count;
    if (!read_all(in, &count, sizeof count)) return 4;
    for (int64_t c = 0; c < count; c++) {
        int64_t h[6];
        if (!read_all(in, h, sizeof h)) return 4;
        const int64_t M = h[0], K = h[1], N = h[2];
        uint8_t *blocks = malloc((size_t)(N * h[4]));
        float *x = malloc(sizeof(float) * (size_t)(M * K)), *y = malloc(sizeof(float) * (size_t)(M * N));
        if (!blocks || !x || !y) return 5;
        if (!read_all(in, blocks, (size_t)(N * h[4])) || !read_all(in, x, sizeof(float) * (size_t)(M * K)))
            return 4;
        heron_gguf_segment seg = {blocks, N, h[4], h[3], NULL};
        int64_t status = heron_gguf_matmul(x, K, 0, M, K, &seg, 1, y, N, 0, (int)h[5]);
        if (status) fwrite(&status, sizeof status, 1, out);
        else fwrite(y, sizeof(float), (size_t)(M * N), out);
        free(blocks), free(x), free(y);
    }
    return fclose(out) != 0;
}
