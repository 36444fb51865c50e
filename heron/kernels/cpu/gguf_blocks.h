/*
 * GGUF's quantized block formats, as llama.cpp writes them (ggml-quants.c; gguf-py's
 * gguf/quants.py has the same formulas in numpy), and their decoding into one common form:
 *
 *     w[k] = a[k / 16] * c[k] + b[k / 32]        c: int8 code, a: float scale, b: float offset
 *
 * which every format fits with exactly the float32 operations of gguf.quants.dequantize
 * (a = d * sc and b = -(dmin * m) are rounded once each, as there). Formats, per block:
 *
 *   type   elems bytes  layout                                               c          b
 *   Q4_0     32    18   fp16 d | qs[16]: k<16 low nibble of qs[k],         nibble-8     0
 *                                      k>=16 high nibble of qs[k-16]
 *   Q5_0     32    22   fp16 d | u32 qh (bit k: 5th bit of k) | qs[16]     q5-16        0
 *   Q8_0     32    34   fp16 d | int8 qs[32]                               qs[k]        0
 *   Q4_K    256   144   fp16 d | fp16 dmin | scales[12]: 8 6-bit (sc, m)   nibble      -dmin m
 *                       | qs[128]: 64-element piece j = qs[32j..32j+31],
 *                       low nibbles first (sub-block 2j), then high (2j+1)
 *   Q5_K    256   176   as Q4_K with qh[32] before qs: 5th bit of element  q5        -dmin m
 *                       l of sub-block s is bit s of qh[l]
 *   Q6_K    256   210   ql[128] | qh[64] | int8 scales[16] | fp16 d;       q6-32        0
 *                       a = d * scales[k / 16]; see decode_q6_k
 *
 * All decoders are plain C over fixed-size loops: the compiler vectorizes them for whatever
 * target flags the variant is built with.
 */
#ifndef HERON_GGUF_BLOCKS_H
#define HERON_GGUF_BLOCKS_H

#include <stdint.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* ggml type ids (gguf.GGMLQuantizationType) */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q5_0 = 6, GGML_Q8_0 = 8,
    GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14
};

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);  /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  /* subnormal: exact as a float32 */
        const float v = (float)mant * (1.0f / 16777216.0f);  /* mant * 2^-24 */
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* Elements and bytes per block; 0 for a type without a decoder here. */
static inline int gguf_block_elems(int type) {
    switch (type) {
        case GGML_Q4_0: case GGML_Q5_0: case GGML_Q8_0: return 32;
        case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K: return 256;
        default: return 0;
    }
}

static inline int gguf_block_bytes(int type) {
    switch (type) {
        case GGML_Q4_0: return 18;
        case GGML_Q5_0: return 22;
        case GGML_Q8_0: return 34;
        case GGML_Q4_K: return 144;
        case GGML_Q5_K: return 176;
        case GGML_Q6_K: return 210;
        default: return 0;
    }
}

/* Whether the format has offsets (b != 0). */
static inline int gguf_has_offsets(int type) {
    return type == GGML_Q4_K || type == GGML_Q5_K;
}

/* One block -> c[elems], a[elems / 16], b[elems / 32] (b only where gguf_has_offsets). */

static inline void decode_q4_0(const uint8_t *blk, int8_t *c, float *a) {
    const uint8_t *qs = blk + 2;
    for (int j = 0; j < 16; j++) {
        c[j] = (int8_t)((qs[j] & 15) - 8);
        c[j + 16] = (int8_t)((qs[j] >> 4) - 8);
    }
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
}

static inline void decode_q5_0(const uint8_t *blk, int8_t *c, float *a) {
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    const uint8_t *qs = blk + 6;
    for (int j = 0; j < 16; j++) {
        c[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16);
        c[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
}

static inline void decode_q8_0(const uint8_t *blk, int8_t *c, float *a) {
    memcpy(c, blk + 2, 32);
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
}

/* The 6-bit scale and min of sub-block s (0..7) of a Q4_K / Q5_K block's scales[12]. */
static inline void k_scale_min(const uint8_t *q, int s, int *sc, int *m) {
    if (s < 4) {
        *sc = q[s] & 63;
        *m = q[s + 4] & 63;
    } else {
        *sc = (q[s + 4] & 15) | ((q[s - 4] >> 6) << 4);
        *m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
    }
}

static inline void k_scales(const uint8_t *blk, float *a, float *b) {
    const float d = fp16_to_fp32(load_u16(blk)), dmin = fp16_to_fp32(load_u16(blk + 2));
    for (int s = 0; s < 8; s++) {
        int sc, m;
        k_scale_min(blk + 4, s, &sc, &m);
        a[2 * s] = a[2 * s + 1] = d * (float)sc;
        b[s] = -(dmin * (float)m);
    }
}

static inline void decode_q4_k(const uint8_t *blk, int8_t *c, float *a, float *b) {
    const uint8_t *qs = blk + 16;
    for (int j = 0; j < 4; j++) {
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = (int8_t)(qs[32 * j + l] & 15);
            c[64 * j + 32 + l] = (int8_t)(qs[32 * j + l] >> 4);
        }
    }
    k_scales(blk, a, b);
}

static inline void decode_q5_k(const uint8_t *blk, int8_t *c, float *a, float *b) {
    const uint8_t *qh = blk + 16, *qs = blk + 48;
    for (int j = 0; j < 4; j++) {
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = (int8_t)((qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4));
            c[64 * j + 32 + l] = (int8_t)((qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
        }
    }
    k_scales(blk, a, b);
}

/* Q6_K, per half h of 128 elements: element 128 h + 32 s + l (s 0..3, l 0..31) has its low
 * 4 bits in ql[64 h + 32 (s & 1) + l] (low nibble for s < 2, high for s >= 2) and its high 2
 * bits at bits 2 s of qh[32 h + l]. */
static inline void decode_q6_k(const uint8_t *blk, int8_t *c, float *a) {
    const uint8_t *ql = blk, *qh = blk + 128;
    const int8_t *sc = (const int8_t *)(blk + 192);
    const float d = fp16_to_fp32(load_u16(blk + 208));
    for (int h = 0; h < 2; h++) {
        const uint8_t *l4 = ql + 64 * h, *h2 = qh + 32 * h;
        int8_t *o = c + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((l4[l] & 15) | ((h2[l] & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((l4[l + 32] & 15) | (((h2[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4)) - 32);
        }
    }
    for (int i = 0; i < 16; i++) a[i] = d * (float)sc[i];
}

/* A row of K elements (K a multiple of the block size) -> c[K], a[K / 16], b[K / 32]. */
static inline void decode_row(int type, const uint8_t *row, int64_t K, int8_t *c, float *a, float *b) {
    const int elems = gguf_block_elems(type), bytes = gguf_block_bytes(type);
    for (int64_t k = 0, i = 0; k < K; k += elems, i++) {
        const uint8_t *blk = row + i * bytes;
        switch (type) {
            case GGML_Q4_0: decode_q4_0(blk, c + k, a + k / 16); break;
            case GGML_Q5_0: decode_q5_0(blk, c + k, a + k / 16); break;
            case GGML_Q8_0: decode_q8_0(blk, c + k, a + k / 16); break;
            case GGML_Q4_K: decode_q4_k(blk, c + k, a + k / 16, b + k / 32); break;
            case GGML_Q5_K: decode_q5_k(blk, c + k, a + k / 16, b + k / 32); break;
            case GGML_Q6_K: decode_q6_k(blk, c + k, a + k / 16); break;
        }
    }
}

#endif
