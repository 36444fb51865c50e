/*
 * GGUF's quantized block formats, as llama.cpp writes them (ggml-quants.c; gguf-py's
 * gguf/quants.py has the same formulas in numpy), and their decoding into one common form:
 *
 *     w[k] = a[k / 16] * c[k] + b[k / 32]        c: int8 code, a: float scale, b: float offset
 *
 * (Q2_K: b per 16, b[k / 16]: see gguf_offset_elems)
 *
 * which every format fits with exactly the float32 operations of gguf.quants.dequantize
 * (a = d * sc and b = -(dmin * m) are rounded once each, as there). Formats, per block:
 *
 *   type   elems bytes  layout                                               c          b
 *   Q4_0     32    18   fp16 d | qs[16]: k<16 low nibble of qs[k],         nibble-8     0
 *                                      k>=16 high nibble of qs[k-16]
 *   Q4_1     32    20   fp16 d | fp16 m | qs[16] as Q4_0's                 nibble       m
 *   Q5_0     32    22   fp16 d | u32 qh (bit k: 5th bit of k) | qs[16]     q5-16        0
 *   Q5_1     32    24   fp16 d | fp16 m | qh, qs as Q5_0's                 q5           m
 *   Q8_0     32    34   fp16 d | int8 qs[32]                               qs[k]        0
 *   Q2_K    256    84   scales[16]: (sc | m << 4) per 16 | qs[64] |          q2    -dmin m per 16
 *                       fp16 d | fp16 dmin; a = d sc per 16; see decode_q2_k
 *   Q3_K    256   110   hmask[32] | qs[64] | scales[12]: 16 6-bit sc | fp16 d;  q3           0
 *                       a = d * (sc - 32) per 16; see decode_q3_k
 *   Q4_K    256   144   fp16 d | fp16 dmin | scales[12]: 8 6-bit (sc, m)   nibble      -dmin m
 *                       | qs[128]: 64-element piece j = qs[32j..32j+31],
 *                       low nibbles first (sub-block 2j), then high (2j+1)
 *   Q5_K    256   176   as Q4_K with qh[32] before qs: 5th bit of element  q5        -dmin m
 *                       l of sub-block s is bit s of qh[l]
 *   Q6_K    256   210   ql[128] | qh[64] | int8 scales[16] | fp16 d;       q6-32        0
 *                       a = d * scales[k / 16]; see decode_q6_k
 *   IQ4_NL   32    18   fp16 d | qs[16] as Q4_0's                          IQ4[nibble]  0
 *   IQ4_XS  256   136   fp16 d | u16 scales_h | scales_l[4] | qs[128]:     IQ4[nibble]  0
 *                       32-element pieces as IQ4_NL's, a = d * (6-bit sc - 32) per 32
 *                       (IQ4: llama.cpp's 16 non-linear levels, kvalues_iq4nl)
 *
 * The decoders write codes with AVX2 integer operations where the variant has them, and in
 * plain C over fixed-size loops elsewhere (the compiler vectorizes them for its target).
 */
#ifndef HERON_GGUF_BLOCKS_H
#define HERON_GGUF_BLOCKS_H

#include <stdint.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ggml type ids (gguf.GGMLQuantizationType) */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7,
    GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14,
    GGML_IQ4_NL = 20, GGML_IQ4_XS = 23, GGML_BF16 = 30
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
        case GGML_Q4_0: case GGML_Q4_1: case GGML_Q5_0: case GGML_Q5_1: case GGML_Q8_0:
        case GGML_IQ4_NL: return 32;
        case GGML_Q2_K: case GGML_Q3_K: case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K:
        case GGML_IQ4_XS: return 256;
        default: return 0;
    }
}

static inline int gguf_block_bytes(int type) {
    switch (type) {
        case GGML_Q4_0: return 18;
        case GGML_Q4_1: return 20;
        case GGML_Q5_0: return 22;
        case GGML_Q5_1: return 24;
        case GGML_Q8_0: return 34;
        case GGML_Q2_K: return 84;
        case GGML_Q3_K: return 110;
        case GGML_Q4_K: return 144;
        case GGML_Q5_K: return 176;
        case GGML_Q6_K: return 210;
        case GGML_IQ4_NL: return 18;
        case GGML_IQ4_XS: return 136;
        default: return 0;
    }
}

/* Float rows (a segment of a fused weight whose other parts are quantized): bytes per element. */
static inline int gguf_float_bytes(int type) {
    return type == GGML_F32 ? 4 : (type == GGML_F16 || type == GGML_BF16) ? 2 : 0;
}

/* A float row -> wf[K] (exactly its values). */
static inline void decode_float_row(int type, const uint8_t *row, int64_t K, float *wf) {
    if (type == GGML_F32) {
        memcpy(wf, row, sizeof(float) * (size_t)K);
    } else if (type == GGML_F16) {
        for (int64_t k = 0; k < K; k++) wf[k] = fp16_to_fp32(load_u16(row + 2 * k));
    } else {
        for (int64_t k = 0; k < K; k++) {
            const uint32_t bits = (uint32_t)load_u16(row + 2 * k) << 16;
            memcpy(wf + k, &bits, 4);
        }
    }
}

/* Whether the format's codes go beyond -32 .. 31 (the AVX2 panels' unsigned form would overflow
 * its 16-bit sums: these take the sign form). */
static inline int gguf_wide_codes(int type) {
    return type == GGML_Q8_0 || type == GGML_IQ4_NL || type == GGML_IQ4_XS;
}

/* Whether the format has offsets per 32 (b[k / 32] != 0). */
static inline int gguf_has_offsets(int type) {
    return type == GGML_Q4_1 || type == GGML_Q5_1 || type == GGML_Q4_K || type == GGML_Q5_K;
}

/* Elements per scale a: 16 (Q2_K, Q3_K, Q6_K) or 32 (the other quantized formats: a[2j] = a[2j + 1]). */
static inline int gguf_scale_elems(int type) {
    return type == GGML_Q2_K || type == GGML_Q3_K || type == GGML_Q6_K ? 16 : 32;
}

/* Elements per offset: 32 (gguf_has_offsets), 16 (Q2_K: b[k / 16]), or 0 (no offsets). */
static inline int gguf_offset_elems(int type) {
    return gguf_has_offsets(type) ? 32 : type == GGML_Q2_K ? 16 : 0;
}

/* One block -> c[elems], a[elems / 16], b[elems / 32] (b only where gguf_has_offsets; Q2_K:
 * b[elems / 16]). The
 * codes are written by 256-bit integer operations where the variant has AVX2 (avx2 and
 * avx512), by plain C elsewhere; the same bytes either way. */

#if defined(__AVX2__)
#include <immintrin.h>

static inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline __m256i high_nibbles(__m256i v) {
    return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
}
/* 16 bytes -> 32 codes: low nibbles, then high nibbles */
static inline __m256i nibbles_16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
/* bit j of bits -> byte j = 16 (bit set) or 0 */
static inline __m256i bits_to_16s(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), _mm256_set_epi64x(
        0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
    const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
    return _mm256_and_si256(set, _mm256_set1_epi8(16));
}
/* bits [shift, shift + width) of each byte, moved up to bit 4 */
static inline __m256i bits_at_4(__m256i v, int shift, int mask) {
    return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8((char)mask)), 4);
}
static inline void store32(int8_t *c, __m256i v) { _mm256_storeu_si256((__m256i *)c, v); }
#endif

static inline void decode_q4_0(const uint8_t *blk, int8_t *c, float *a) {
    const uint8_t *qs = blk + 2;
#if defined(__AVX2__)
    store32(c, _mm256_sub_epi8(nibbles_16(qs), _mm256_set1_epi8(8)));
#else
    for (int j = 0; j < 16; j++) {
        c[j] = (int8_t)((qs[j] & 15) - 8);
        c[j + 16] = (int8_t)((qs[j] >> 4) - 8);
    }
#endif
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
}

#if !defined(__AVX2__) && defined(__SSE2__)
/* FIFTH16[b]: byte i (little-endian) = 16 * bit i of b */
#define FIFTH_BIT(b, i) ((uint64_t)(((b) >> (i)) & 1) << (8 * (i) + 4))
#define FIFTH(b) (FIFTH_BIT(b, 0) | FIFTH_BIT(b, 1) | FIFTH_BIT(b, 2) | FIFTH_BIT(b, 3) | \
                  FIFTH_BIT(b, 4) | FIFTH_BIT(b, 5) | FIFTH_BIT(b, 6) | FIFTH_BIT(b, 7))
#define FIFTH4(b) FIFTH(b), FIFTH((b) + 1), FIFTH((b) + 2), FIFTH((b) + 3)
#define FIFTH16(b) FIFTH4(b), FIFTH4((b) + 4), FIFTH4((b) + 8), FIFTH4((b) + 12)
#define FIFTH64(b) FIFTH16(b), FIFTH16((b) + 16), FIFTH16((b) + 32), FIFTH16((b) + 48)
static const uint64_t FIFTH16[256] = {FIFTH64(0), FIFTH64(64), FIFTH64(128), FIFTH64(192)};

/* Byte j = 16 * bit j of the low 16 bits. */
static inline __m128i bits_to_16s_sse2(uint32_t bits) {
    return _mm_set_epi64x((long long)FIFTH16[(bits >> 8) & 0xFF], (long long)FIFTH16[bits & 0xFF]);
}
#endif

static inline void decode_q5_0(const uint8_t *blk, int8_t *c, float *a) {
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    const uint8_t *qs = blk + 6;
#if defined(__AVX2__)
    store32(c, _mm256_sub_epi8(_mm256_or_si256(nibbles_16(qs), bits_to_16s(qh)), _mm256_set1_epi8(16)));
#elif defined(__SSE2__)
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), low = _mm_set1_epi8(15);
    const __m128i bias = _mm_set1_epi8(16);
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    _mm_storeu_si128((__m128i *)c, _mm_sub_epi8(_mm_or_si128(lo, bits_to_16s_sse2(qh)), bias));
    _mm_storeu_si128((__m128i *)(c + 16),
                     _mm_sub_epi8(_mm_or_si128(hi, bits_to_16s_sse2(qh >> 16)), bias));
#else
    for (int j = 0; j < 16; j++) {
        c[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16);
        c[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
#endif
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
}

/* Q4_1 / Q5_1: Q4_0's / Q5_0's codes without their zero point, after d and m. */
static inline void decode_q4_1(const uint8_t *blk, int8_t *c, float *a, float *b) {
    const uint8_t *qs = blk + 4;
#if defined(__AVX2__)
    store32(c, nibbles_16(qs));
#else
    for (int j = 0; j < 16; j++) {
        c[j] = (int8_t)(qs[j] & 15);
        c[j + 16] = (int8_t)(qs[j] >> 4);
    }
#endif
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
    b[0] = fp16_to_fp32(load_u16(blk + 2));
}

static inline void decode_q5_1(const uint8_t *blk, int8_t *c, float *a, float *b) {
    uint32_t qh;
    memcpy(&qh, blk + 4, 4);
    const uint8_t *qs = blk + 8;
#if defined(__AVX2__)
    store32(c, _mm256_or_si256(nibbles_16(qs), bits_to_16s(qh)));
#else
    for (int j = 0; j < 16; j++) {
        c[j] = (int8_t)((qs[j] & 15) | (((qh >> j) & 1) << 4));
        c[j + 16] = (int8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
#endif
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
    b[0] = fp16_to_fp32(load_u16(blk + 2));
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

/* a[16] = d sc per 16 elements, b[8] = -(dmin m) per 32, of a Q4_K / Q5_K block. AVX2: the 8
 * scales and 8 mins unpacked in 32-bit words (k_scale_min's formulas, 4 sub-blocks at a time)
 * and made float together: the same numbers, a fifth of the instructions. */
static inline void k_scales(const uint8_t *blk, float *a, float *b) {
    const float d = fp16_to_fp32(load_u16(blk)), dmin = fp16_to_fp32(load_u16(blk + 2));
#if defined(__AVX2__)
    uint32_t u0, u1, u2;  /* scales[0..4), [4..8), [8..12) */
    memcpy(&u0, blk + 4, 4), memcpy(&u1, blk + 8, 4), memcpy(&u2, blk + 12, 4);
    const uint32_t sc_lo = u0 & 0x3f3f3f3fu, m_lo = u1 & 0x3f3f3f3fu;
    const uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    const uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
    const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo)));
    const __m256 av = _mm256_mul_ps(_mm256_set1_ps(d), sc);
    _mm256_storeu_ps(a, _mm256_permutevar8x32_ps(av, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    _mm256_storeu_ps(a + 8, _mm256_permutevar8x32_ps(av, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
    /* -(dmin m): the sign bit flipped, as negation does (also for zeros) */
    _mm256_storeu_ps(b, _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(dmin), m), _mm256_set1_ps(-0.0f)));
#else
    for (int s = 0; s < 8; s++) {
        int sc, m;
        k_scale_min(blk + 4, s, &sc, &m);
        a[2 * s] = a[2 * s + 1] = d * (float)sc;
        b[s] = -(dmin * (float)m);
    }
#endif
}

static inline void decode_q4_k(const uint8_t *blk, int8_t *c, float *a, float *b) {
    const uint8_t *qs = blk + 16;
    for (int j = 0; j < 4; j++) {
#if defined(__AVX2__)
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        store32(c + 64 * j, low_nibbles(v));
        store32(c + 64 * j + 32, high_nibbles(v));
#else
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = (int8_t)(qs[32 * j + l] & 15);
            c[64 * j + 32 + l] = (int8_t)(qs[32 * j + l] >> 4);
        }
#endif
    }
    k_scales(blk, a, b);
}

static inline void decode_q5_k(const uint8_t *blk, int8_t *c, float *a, float *b) {
    const uint8_t *qh = blk + 16, *qs = blk + 48;
#if defined(__AVX2__)
    const __m256i high = _mm256_loadu_si256((const __m256i *)qh);
#endif
    for (int j = 0; j < 4; j++) {
#if defined(__AVX2__)
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        store32(c + 64 * j, _mm256_or_si256(low_nibbles(v), bits_at_4(high, 2 * j, 1)));
        store32(c + 64 * j + 32, _mm256_or_si256(high_nibbles(v), bits_at_4(high, 2 * j + 1, 1)));
#else
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = (int8_t)((qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4));
            c[64 * j + 32 + l] = (int8_t)((qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
        }
#endif
    }
    k_scales(blk, a, b);
}

/* a[16] = d (sc - 32) of a Q3_K block's 16 sub-blocks: the 6-bit scale of sub-block i (16
 * elements) has its low nibble in scales[i % 8] (low nibble for i < 8, high for i >= 8) and
 * its 2 high bits at bits 2 (i / 4) of scales[8 + i % 4]. */
static inline void q3_k_scales(const uint8_t *blk, float *a) {
    const uint8_t *sc = blk + 96;
    const float d = fp16_to_fp32(load_u16(blk + 108));
#if defined(__AVX2__)  /* the 16 scales' bytes at once: the same numbers */
    uint64_t low;
    uint32_t high;
    memcpy(&low, sc, 8), memcpy(&high, sc + 8, 4);
    const __m128i lo = _mm_set_epi64x((long long)((low >> 4) & 0x0F0F0F0F0F0F0F0FULL),
                                      (long long)(low & 0x0F0F0F0F0F0F0F0FULL));
    const __m128i hi = _mm_set_epi32((int)((high >> 6) & 0x03030303u), (int)((high >> 4) & 0x03030303u),
                                     (int)((high >> 2) & 0x03030303u), (int)(high & 0x03030303u));
    const __m128i v = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
    const __m256 dv = _mm256_set1_ps(d);
    _mm256_storeu_ps(a, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
    _mm256_storeu_ps(a + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))));
#else
    for (int i = 0; i < 16; i++) {
        const int low = (sc[i % 8] >> (i < 8 ? 0 : 4)) & 15, high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        a[i] = d * (float)((low | high << 4) - 32);
    }
#endif
}

/* Q2_K: a[16] = d sc, b[16] = -(dmin m) of a block's 16 sub-blocks (scales[i]: sc in the low
 * nibble, m in the high one). */
static inline void q2_k_scales(const uint8_t *blk, float *a, float *b) {
    const float d = fp16_to_fp32(load_u16(blk + 80)), dmin = fp16_to_fp32(load_u16(blk + 82));
#if defined(__AVX2__)  /* 8 sub-blocks at a time: the same numbers */
    for (int h = 0; h < 2; h++) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * h)));
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
        const __m256 m = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        _mm256_storeu_ps(a + 8 * h, _mm256_mul_ps(_mm256_set1_ps(d), sc));
        _mm256_storeu_ps(b + 8 * h, _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(dmin), m), _mm256_set1_ps(-0.0f)));
    }
#else
    for (int i = 0; i < 16; i++) {
        a[i] = d * (float)(blk[i] & 15);
        b[i] = -(dmin * (float)(blk[i] >> 4));
    }
#endif
}

/* Q2_K: element e = 128 h + 32 s + l (h 0..1, s 0..3, l 0..31) is bits 2 s of qs[32 h + l]:
 * codes 0 .. 3. */
static inline void decode_q2_k(const uint8_t *blk, int8_t *c, float *a, float *b) {
    const uint8_t *qs = blk + 16;
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++) {
            int8_t *o = c + 32 * (4 * h + s);
#if defined(__AVX2__)
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
            store32(o, _mm256_and_si256(_mm256_srli_epi16(q, 2 * s), _mm256_set1_epi8(3)));
#else
            for (int l = 0; l < 32; l++) o[l] = (int8_t)((qs[32 * h + l] >> (2 * s)) & 3);
#endif
        }
    q2_k_scales(blk, a, b);
}

/* Q3_K: element e = 128 h + 32 s + l (h 0..1, s 0..3, l 0..31) has its 2 low bits at bits 2 s
 * of qs[32 h + l] and is less 4 where bit e / 32 of hmask[l] is clear: codes -4 .. 3. */
static inline void decode_q3_k(const uint8_t *blk, int8_t *c, float *a) {
    const uint8_t *hmask = blk, *qs = blk + 32;
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++) {
            const int j = 4 * h + s;  /* e / 32 */
            int8_t *o = c + 32 * j;
#if defined(__AVX2__)
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
            const __m256i low = _mm256_and_si256(_mm256_srli_epi16(q, 2 * s), _mm256_set1_epi8(3));
            const __m256i bit = _mm256_set1_epi8((char)(1 << j));
            const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)hmask), bit), bit);
            store32(o, _mm256_sub_epi8(low, _mm256_andnot_si256(set, _mm256_set1_epi8(4))));
#else
            for (int l = 0; l < 32; l++)
                o[l] = (int8_t)(((qs[32 * h + l] >> (2 * s)) & 3) - ((hmask[l] >> j) & 1 ? 0 : 4));
#endif
        }
    q3_k_scales(blk, a);
}

/* Q6_K: a[16] = d scales[i] (int8). AVX2: 8 at a time (GCC leaves the loop scalar), the same
 * numbers. */
static inline void q6_k_scales(const uint8_t *blk, float *a) {
    const int8_t *sc = (const int8_t *)(blk + 192);
    const float d = fp16_to_fp32(load_u16(blk + 208));
#if defined(__AVX2__)
    for (int h = 0; h < 2; h++)
        _mm256_storeu_ps(a + 8 * h, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + 8 * h))))));
#else
    for (int i = 0; i < 16; i++) a[i] = d * (float)sc[i];
#endif
}

/* Q6_K, per half h of 128 elements: element 128 h + 32 s + l (s 0..3, l 0..31) has its low
 * 4 bits in ql[64 h + 32 (s & 1) + l] (low nibble for s < 2, high for s >= 2) and its high 2
 * bits at bits 2 s of qh[32 h + l]. */
static inline void decode_q6_k(const uint8_t *blk, int8_t *c, float *a) {
    const uint8_t *ql = blk, *qh = blk + 128;
    for (int h = 0; h < 2; h++) {
        const uint8_t *l4 = ql + 64 * h, *h2 = qh + 32 * h;
        int8_t *o = c + 128 * h;
#if defined(__AVX2__)
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)l4);
        const __m256i q1 = _mm256_loadu_si256((const __m256i *)(l4 + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i *)h2), bias = _mm256_set1_epi8(32);
        store32(o, _mm256_sub_epi8(_mm256_or_si256(low_nibbles(q0), bits_at_4(hb, 0, 3)), bias));
        store32(o + 32, _mm256_sub_epi8(_mm256_or_si256(low_nibbles(q1), bits_at_4(hb, 2, 3)), bias));
        store32(o + 64, _mm256_sub_epi8(_mm256_or_si256(high_nibbles(q0), bits_at_4(hb, 4, 3)), bias));
        store32(o + 96, _mm256_sub_epi8(_mm256_or_si256(high_nibbles(q1), bits_at_4(hb, 6, 3)), bias));
#else
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((l4[l] & 15) | ((h2[l] & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((l4[l + 32] & 15) | (((h2[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4)) - 32);
        }
#endif
    }
    q6_k_scales(blk, a);
}

/* IQ4_NL / IQ4_XS: the 16 levels a nibble selects (llama.cpp's kvalues_iq4nl) */
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1, 13, 25, 38, 53, 69, 89, 113};

/* 32 codes from 16 bytes of nibbles (low nibbles first, as Q4_0's): their levels. */
static inline void iq4_levels(const uint8_t *qs, int8_t *c) {
#if defined(__AVX2__)
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
    store32(c, _mm256_shuffle_epi8(table, nibbles_16(qs)));
#else
    for (int j = 0; j < 16; j++) {
        c[j] = IQ4_LEVELS[qs[j] & 15];
        c[j + 16] = IQ4_LEVELS[qs[j] >> 4];
    }
#endif
}

static inline void decode_iq4_nl(const uint8_t *blk, int8_t *c, float *a) {
    iq4_levels(blk + 2, c);
    a[0] = a[1] = fp16_to_fp32(load_u16(blk));
}

/* IQ4_XS: piece i (32 elements) has its nibbles in qs[16 i .. 16 i + 15] and its 6-bit scale's
 * low nibble in scales_l[i / 2] (low for even i), high 2 bits at bits 2 i of scales_h. */
static inline void iq4_xs_scales(const uint8_t *blk, float *a) {
    const float d = fp16_to_fp32(load_u16(blk));
    const unsigned high = load_u16(blk + 2);
#if defined(__AVX2__)  /* the 8 scales in 32-bit lanes at once: the same numbers */
    uint32_t low;  /* nibble i: the low 4 bits of scale i */
    memcpy(&low, blk + 4, 4);
    const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)low),
                                                          _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                        _mm256_set1_epi32(15));
    const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)high),
                                                          _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                        _mm256_set1_epi32(3));
    const __m256i sc = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
    const __m256 av = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sc));
    _mm256_storeu_ps(a, _mm256_permutevar8x32_ps(av, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    _mm256_storeu_ps(a + 8, _mm256_permutevar8x32_ps(av, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
#else
    const uint8_t *low = blk + 4;
    for (int i = 0; i < 8; i++) {
        const int sc = (((low[i / 2] >> (4 * (i % 2))) & 15) | (int)(((high >> (2 * i)) & 3) << 4)) - 32;
        a[2 * i] = a[2 * i + 1] = d * (float)sc;
    }
#endif
}

static inline void decode_iq4_xs(const uint8_t *blk, int8_t *c, float *a) {
    for (int i = 0; i < 8; i++) iq4_levels(blk + 8 + 16 * i, c + 32 * i);
    iq4_xs_scales(blk, a);
}

/* A row of K elements (K a multiple of the block size) -> c[K], a[K / 16], b[K / 32] (Q2_K:
 * b[K / 16]); the format is dispatched once per row. */
#define DECODE_BLOCKS(call, elems, bytes) \
    for (int64_t k = 0, i = 0; k < K; k += (elems), i++) { const uint8_t *blk = row + i * (bytes); call; } \
    break;

static inline void decode_row(int type, const uint8_t *row, int64_t K, int8_t *c, float *a, float *b) {
    switch (type) {
        case GGML_Q4_0: DECODE_BLOCKS(decode_q4_0(blk, c + k, a + k / 16), 32, 18)
        case GGML_Q4_1: DECODE_BLOCKS(decode_q4_1(blk, c + k, a + k / 16, b + k / 32), 32, 20)
        case GGML_Q5_0: DECODE_BLOCKS(decode_q5_0(blk, c + k, a + k / 16), 32, 22)
        case GGML_Q5_1: DECODE_BLOCKS(decode_q5_1(blk, c + k, a + k / 16, b + k / 32), 32, 24)
        case GGML_Q8_0: DECODE_BLOCKS(decode_q8_0(blk, c + k, a + k / 16), 32, 34)
        case GGML_Q2_K: DECODE_BLOCKS(decode_q2_k(blk, c + k, a + k / 16, b + k / 16), 256, 84)
        case GGML_Q3_K: DECODE_BLOCKS(decode_q3_k(blk, c + k, a + k / 16), 256, 110)
        case GGML_Q4_K: DECODE_BLOCKS(decode_q4_k(blk, c + k, a + k / 16, b + k / 32), 256, 144)
        case GGML_Q5_K: DECODE_BLOCKS(decode_q5_k(blk, c + k, a + k / 16, b + k / 32), 256, 176)
        case GGML_Q6_K: DECODE_BLOCKS(decode_q6_k(blk, c + k, a + k / 16), 256, 210)
        case GGML_IQ4_NL: DECODE_BLOCKS(decode_iq4_nl(blk, c + k, a + k / 16), 32, 18)
        case GGML_IQ4_XS: DECODE_BLOCKS(decode_iq4_xs(blk, c + k, a + k / 16), 256, 136)
        default: break;
    }
}

#endif
