/*
 * out[M, N] = x[M, K] @ W[N, K]^T with W in GGUF's quantized blocks, read in place (the
 * memory-mapped file). W may be several segments of rows in different formats stacked along
 * N (a fused q/k/v whose q and v are Q5_0 and Q8_0). Built per variant (avx512, avx2,
 * portable) by heron/kernels/cpu/build.py; formats and their decoding: gguf_blocks.h.
 *
 * Each thread takes a range of W's rows. A row is decoded once per call into codes c, scales
 * a (per 16) and offsets b (per 32) in a small buffer that stays in L1/L2, then every row of
 * x is multiplied with it, up to 8 at a time. Two modes:
 *
 *   exact (x float32 or bf16): w = a c + b in float32, then float32 dot products: the result
 *          is x @ dequantize(W)^T up to float rounding (summation order, fused multiply-add).
 *   int8  x quantized per call per row and group of 4 (xq = round(x / s), s = max |x| / 127:
 *          one scale per 32-bit lane of the integer sums, so finer groups cost nothing, and a
 *          transformer's outlier features spoil 3 neighbours, not 31); integer dot products
 *          per 4 elements, then
 *              out = sum_g4 a s_g (sum c xq)  +  sum_g32 b_g (sum x)      (b: the float sum)
 *          so the error against the exact result is at most sum_k |w_k| s_k / 2 (plus float
 *          rounding). AVX-512 VNNI: VPDPBUSD with x + 128 as the unsigned operand, minus
 *          128 sum c (one more VPDPBUSD per 64 weights, shared by the rows); AVX2 and AVX-512
 *          without VNNI: VPMADDUBSW on |c| and x with c's sign; portable: plain C.
 *
 * Rows of x and of the buffers are padded to a multiple of 64 elements with zeros. A segment
 * may also be float rows (F32, F16, BF16: a fused weight whose other parts are quantized);
 * those are multiplied in float32 in both modes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_blocks.h"
#include "kernels_gguf.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define PAD 64
#define MAX_TILE 8
#define XGROUP 4  /* elements of x per int8 scale: the 4 bytes one 32-bit lane sums */

/* The per-call form of x. */
typedef struct {
    int64_t K64;      /* K rounded up to PAD */
    float *xf;        /* exact: [M, K64] */
    int8_t *xq;       /* int8: [M, K64] codes (+128 as uint8 under VNNI) */
    float *s4;        /* int8: [M, K64 / 4] scale of each 4 elements (a vector lane's) */
    float *xqf;       /* int8, portable: [M, K64] the codes as floats */
    float *sum32;     /* int8: [M, K64 / 32] float sums of x per 32 */
} xprep;

/* One decoded row of W. */
typedef struct {
    int8_t *c;        /* [K64] */
    float *a;         /* [K64 / 16] */
    float *b;         /* [K64 / 32] */
    float *wf;        /* float segments, row lookups: [K64] the values */
} rowbuf;

static inline float bf16_to_fp32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t fp32_to_bf16(float f) {  /* round to nearest even; NaN stays quiet */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static void load_x_row(const void *x, int x_bf16, int64_t K, int64_t K64, float *dst) {
    if (x_bf16) {
        const uint16_t *src = x;
        for (int64_t k = 0; k < K; k++) dst[k] = bf16_to_fp32(src[k]);
    } else {
        memcpy(dst, x, sizeof(float) * (size_t)K);
    }
    for (int64_t k = K; k < K64; k++) dst[k] = 0.0f;
}

/* One row of x in float -> int8 codes and a scale per XGROUP (max |x| / 127), float sums per
 * 32. */
static void quantize_x_row(const float *v, int64_t K64, int8_t *q, float *s4, float *sum32) {
    for (int64_t g = 0; g < K64 / XGROUP; g++) {
        const float *vg = v + XGROUP * g;
        float amax = 0.0f;
        for (int j = 0; j < XGROUP; j++) amax = fabsf(vg[j]) > amax ? fabsf(vg[j]) : amax;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < XGROUP; j++) {
            int code = (int)nearbyintf(vg[j] * inv);
            code = code > 127 ? 127 : (code < -127 ? -127 : code);
#if defined(__AVX512VNNI__)
            q[XGROUP * g + j] = (int8_t)(code ^ 0x80);  /* as uint8: code + 128 */
#else
            q[XGROUP * g + j] = (int8_t)code;
#endif
        }
        s4[g] = amax / 127.0f;
    }
    for (int64_t g = 0; g < K64 / 32; g++) {
        float sum = 0.0f;
        for (int j = 0; j < 32; j++) sum += v[32 * g + j];
        sum32[g] = sum;
    }
}

static int prepare_x(const void *x, int64_t ldx, int x_bf16, int64_t M, int64_t K, int exact,
                     xprep *p) {
    const int64_t K64 = (K + PAD - 1) / PAD * PAD;
    p->K64 = K64;
    p->xf = malloc(sizeof(float) * (size_t)(M * K64));
    if (!exact) {
        p->xq = malloc((size_t)(M * K64));
        p->s4 = malloc(sizeof(float) * (size_t)(M * K64 / XGROUP));
        p->sum32 = malloc(sizeof(float) * (size_t)(M * K64 / 32));
    }
#if !defined(__AVX2__)
    p->xqf = exact ? NULL : malloc(sizeof(float) * (size_t)(M * K64));
    if (!exact && !p->xqf) return -2;
#endif
    if (!p->xf || (!exact && (!p->xq || !p->s4 || !p->sum32))) return -2;
    const size_t elem = x_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        float *row = p->xf + m * K64;
        load_x_row((const char *)x + (size_t)(m * ldx) * elem, x_bf16, K, K64, row);
        if (exact) continue;
        quantize_x_row(row, K64, p->xq + m * K64, p->s4 + m * (K64 / XGROUP), p->sum32 + m * (K64 / 32));
        if (p->xqf)
            for (int64_t k = 0; k < K64; k++) p->xqf[m * K64 + k] = (float)p->xq[m * K64 + k];
    }
    return 0;
}

static void free_x(xprep *p) {
    free(p->xf), free(p->xq), free(p->s4), free(p->sum32), free(p->xqf);
}

/* ------------------------------------------------------------------------- float rows */

/* res[r] = wf . x_r for float values wf (a float segment). */
static inline __attribute__((always_inline)) void dot_f32_tile(
        const float *wf, const float *x, int64_t K64, int R, float *res) {
    float acc[MAX_TILE][16];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 16; j++) acc[r][j] = 0.0f;
    for (int64_t k = 0; k < K64; k += 16) {
        for (int r = 0; r < R; r++) {
            const float *xr = x + r * K64 + k;
            for (int j = 0; j < 16; j++) acc[r][j] += xr[j] * wf[k + j];
        }
    }
    for (int r = 0; r < R; r++) {
        float s = 0.0f;
        for (int j = 0; j < 16; j++) s += acc[r][j];
        res[r] = s;
    }
}

/* sum_g32 b_g sum32_g for the rows of a tile (int8 mode, formats with offsets only). */
static inline void offsets_tile(const float *b, const float *sum32, int64_t K64, int R, float *res) {
    const int64_t groups = K64 / 32;
    for (int r = 0; r < R; r++) {
        float acc[16] = {0};
        const float *s = sum32 + r * groups;
        int64_t g = 0;
        for (; g + 16 <= groups; g += 16)
            for (int j = 0; j < 16; j++) acc[j] += b[g + j] * s[g + j];
        float total = 0.0f;
        for (int j = 0; j < 16; j++) total += acc[j];
        for (; g < groups; g++) total += b[g] * s[g];
        res[r] += total;
    }
}

/*
 * Per variant, two tile kernels over a decoded row w and rows m0 .. m0 + R - 1 of x:
 *   dot_exact_tile  res[r] = sum_k (a c + b)_k x_rk, the weight made float per 16 (shared by
 *                   the rows), one FMA per row
 *   dot_int8_tile   res[r] = sum over 4-groups of a s (sum c xq)   (offsets: offsets_tile)
 */
#if defined(__AVX512F__) && defined(__AVX512BW__)

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __attribute__((always_inline)) void dot_exact_tile(
        const rowbuf *w, int offsets, const float *x, int64_t K64, int R, float *res) {
    __m512 acc[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 16) {
        const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w->c + k))));
        const __m512 wk = offsets ? _mm512_fmadd_ps(c, _mm512_set1_ps(w->a[k / 16]), _mm512_set1_ps(w->b[k / 32]))
                                  : _mm512_mul_ps(c, _mm512_set1_ps(w->a[k / 16]));
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K64 + k), wk, acc[r]);
    }
    for (int r = 0; r < R; r++) res[r] = hsum512(acc[r]);
}

static inline __m512i dot_quads(__m512i acc, __m512i xq, __m512i wc) {
    /* acc + per lane i: sum_{j<4} c[4i+j] xq[4i+j] (xq + 128 as uint8 under VNNI, where acc
     * arrives holding -128 sum c) */
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, xq, wc);
#else
    const __m512i signed_x = _mm512_mask_sub_epi8(xq, _mm512_movepi8_mask(wc), _mm512_setzero_si512(), xq);
    const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(wc), signed_x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void dot_int8_tile(
        const rowbuf *w, const xprep *p, int64_t m0, int R, float *res) {
    const int64_t K64 = p->K64;
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64) {
        const __m512i wc = _mm512_loadu_si512((const void *)(w->c + k));
#if defined(__AVX512VNNI__)
        const __m512i base = _mm512_sub_epi32(_mm512_setzero_si512(),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), wc));
#else
        const __m512i base = _mm512_setzero_si512();
#endif
        const __m512 a = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(w->a + k / 16)));
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const __m512i s = dot_quads(base, _mm512_loadu_si512((const void *)(p->xq + m * K64 + k)), wc);
            const __m512 scale = _mm512_mul_ps(a, _mm512_loadu_ps(p->s4 + m * (K64 / XGROUP) + k / XGROUP));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum512(acc[r]);
}

#elif defined(__AVX2__)

static inline float hsum256(__m256 v) {
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static inline __attribute__((always_inline)) void dot_exact_tile(
        const rowbuf *w, int offsets, const float *x, int64_t K64, int R, float *res) {
    __m256 acc[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K64; k += 8) {
        const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w->c + k))));
        const __m256 wk = offsets ? _mm256_fmadd_ps(c, _mm256_set1_ps(w->a[k / 16]), _mm256_set1_ps(w->b[k / 32]))
                                  : _mm256_mul_ps(c, _mm256_set1_ps(w->a[k / 16]));
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K64 + k), wk, acc[r]);
    }
    for (int r = 0; r < R; r++) res[r] = hsum256(acc[r]);
}

static inline __attribute__((always_inline)) void dot_int8_tile(
        const rowbuf *w, const xprep *p, int64_t m0, int R, float *res) {
    const int64_t K64 = p->K64;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K64; k += 32) {
        const __m256i wc = _mm256_loadu_si256((const __m256i *)(w->c + k));
        const __m256i wabs = _mm256_abs_epi8(wc);
        const __m256 a = _mm256_set_m128(_mm_set1_ps(w->a[k / 16 + 1]), _mm_set1_ps(w->a[k / 16]));
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(p->xq + m * K64 + k));
            const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, wc)), ones);
            const __m256 scale = _mm256_mul_ps(a, _mm256_loadu_ps(p->s4 + m * (K64 / XGROUP) + k / XGROUP));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum256(acc[r]);
}

#else  /* portable */

static inline __attribute__((always_inline)) void dot_exact_tile(
        const rowbuf *w, int offsets, const float *x, int64_t K64, int R, float *res) {
    float acc[MAX_TILE][16];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 16; j++) acc[r][j] = 0.0f;
    for (int64_t k = 0; k < K64; k += 16) {
        float wk[16];
        const float a = w->a[k / 16], b = offsets ? w->b[k / 32] : 0.0f;
        for (int j = 0; j < 16; j++) wk[j] = a * (float)w->c[k + j] + b;
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 16; j++) acc[r][j] += x[r * K64 + k + j] * wk[j];
    }
    for (int r = 0; r < R; r++) {
        float total = 0.0f;
        for (int j = 0; j < 16; j++) total += acc[r][j];
        res[r] = total;
    }
}

/* The integer sums of 4 products computed in float, where they are exact (|sum| < 2^24): the
 * same numbers as the integer code, in a form plain C vectorizes (SSE2 has no int8 products). */
static inline __attribute__((always_inline)) void dot_int8_tile(
        const rowbuf *w, const xprep *p, int64_t m0, int R, float *res) {
    const int64_t K64 = p->K64;
    float acc[MAX_TILE][4];
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 4; l++) acc[r][l] = 0.0f;
    for (int64_t k = 0; k < K64; k += 16) {
        float c[16];
        for (int j = 0; j < 16; j++) c[j] = (float)w->c[k + j];
        const float a = w->a[k / 16];
        for (int r = 0; r < R; r++) {
            const float *xq = p->xqf + (m0 + r) * K64 + k, *s = p->s4 + (m0 + r) * (K64 / XGROUP) + k / XGROUP;
            float prod[16];
            for (int j = 0; j < 16; j++) prod[j] = c[j] * xq[j];
            for (int l = 0; l < 4; l++)
                acc[r][l] += (prod[4 * l] + prod[4 * l + 1] + prod[4 * l + 2] + prod[4 * l + 3]) * (a * s[l]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
}

#endif

static inline void store_out(void *out, int out_bf16, int64_t index, float v) {
    if (out_bf16) ((uint16_t *)out)[index] = fp32_to_bf16(v);
    else ((float *)out)[index] = v;
}

/* ------------------------------------------------------------------------- small batches */

/*
 * Rows of 32-element blocks (Q4_0, Q5_0, Q8_0: most of a Q4_K_M file's bytes) times up to
 * SMALL_M rows of x in int8 mode, each pair of blocks decoded in registers instead of through
 * the row buffer: the decode-only shape. Per row the same integer sums, scales and order of
 * float additions as dot_int8_tile, so the results are bit for bit those of the general path
 * (a row's result does not depend on the batch it is in).
 */
#define SMALL_M 4

#if defined(__AVX2__)
static inline int small_path(int type, int exact, int64_t M) {
    return !exact && M <= SMALL_M && (type == GGML_Q4_0 || type == GGML_Q5_0 || type == GGML_Q8_0);
}
#else  /* portable: the general path only */
static inline int small_path(int type, int exact, int64_t M) {
    (void)type, (void)exact, (void)M;
    return 0;
}
#endif

#if defined(__AVX2__)
static inline __attribute__((always_inline)) __m256i block_codes(int type, const uint8_t *blk) {
    if (type == GGML_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    if (type == GGML_Q4_0) return _mm256_sub_epi8(nibbles_16(blk + 2), _mm256_set1_epi8(8));
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    return _mm256_sub_epi8(_mm256_or_si256(nibbles_16(blk + 6), bits_to_16s(qh)), _mm256_set1_epi8(16));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)

/* The codes of two 32-element blocks (the second all zero where absent) in one register:
 * both blocks' nibbles split at once, Q5_0's fifth bits set from a 64-bit mask. */
static inline __attribute__((always_inline)) __m512i pair_codes(int type, const uint8_t *b0,
                                                                const uint8_t *b1, int two) {
    if (type == GGML_Q8_0) {
        const __m256i c1 = two ? _mm256_loadu_si256((const __m256i *)(b1 + 2)) : _mm256_setzero_si256();
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))), c1, 1);
    }
    const int off = type == GGML_Q4_0 ? 2 : 6;
    const __m128i q1 = two ? _mm_loadu_si128((const __m128i *)(b1 + off)) : _mm_set1_epi8(type == GGML_Q4_0 ? (char)0x88 : 0);
    const __m256i v = _mm256_set_m128i(q1, _mm_loadu_si128((const __m128i *)(b0 + off)));
    const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(low_nibbles(v)), high_nibbles(v), 1);
    __m512i q = _mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0));  /* lo0 hi0 lo1 hi1 */
    if (type == GGML_Q4_0) return _mm512_sub_epi8(q, _mm512_set1_epi8(8));
    uint32_t h0, h1 = 0;
    memcpy(&h0, b0 + 2, 4);
    if (two) memcpy(&h1, b1 + 2, 4);
    q = _mm512_or_si512(q, _mm512_maskz_mov_epi8((__mmask64)h0 | ((__mmask64)h1 << 32), _mm512_set1_epi8(16)));
    const __m512i codes = _mm512_sub_epi8(q, _mm512_set1_epi8(16));
    return two ? codes : _mm512_inserti64x4(codes, _mm256_setzero_si256(), 1);
}

static inline __attribute__((always_inline)) void blocks32_tile(
        int type, const uint8_t *row, int64_t K, const xprep *p, int64_t m0, int R, float *res) {
    const int64_t bytes = gguf_block_bytes(type), blocks = K / 32, K64 = p->K64;
    __m512 acc[SMALL_M];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < blocks; i += 2) {
        const uint8_t *b0 = row + i * bytes, *b1 = b0 + bytes;
        const int two = i + 1 < blocks;
        const __m512i wc = pair_codes(type, b0, b1, two);
        const float d0 = fp16_to_fp32(load_u16(b0)), d1 = two ? fp16_to_fp32(load_u16(b1)) : 0.0f;
        const __m512 a = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
#if defined(__AVX512VNNI__)
        const __m512i base = _mm512_sub_epi32(_mm512_setzero_si512(),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), wc));
#else
        const __m512i base = _mm512_setzero_si512();
#endif
        const int64_t k = 32 * i;
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const __m512i sums = dot_quads(base, _mm512_loadu_si512((const void *)(p->xq + m * K64 + k)), wc);
            const __m512 scale = _mm512_mul_ps(a, _mm512_loadu_ps(p->s4 + m * (K64 / XGROUP) + k / XGROUP));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum512(acc[r]);
}

#elif defined(__AVX2__)

static inline __attribute__((always_inline)) void blocks32_tile(
        int type, const uint8_t *row, int64_t K, const xprep *p, int64_t m0, int R, float *res) {
    const int64_t bytes = gguf_block_bytes(type), blocks = K / 32, K64 = p->K64;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[SMALL_M];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < blocks; i++) {
        const uint8_t *blk = row + i * bytes;
        const __m256i wc = block_codes(type, blk), wabs = _mm256_abs_epi8(wc);
        const __m256 a = _mm256_set1_ps(fp16_to_fp32(load_u16(blk)));
        const int64_t k = 32 * i;
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(p->xq + m * K64 + k));
            const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, wc)), ones);
            const __m256 scale = _mm256_mul_ps(a, _mm256_loadu_ps(p->s4 + m * (K64 / XGROUP) + k / XGROUP));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum256(acc[r]);
}

#else

static inline void blocks32_tile(int type, const uint8_t *row, int64_t K, const xprep *p,
                                 int64_t m0, int R, float *res) {  /* never called (small_path) */
    (void)type, (void)row, (void)K, (void)p, (void)m0;
    for (int r = 0; r < R; r++) res[r] = 0.0f;
}

#endif

#define SMALL_CASE(T, R) case R: blocks32_tile(T, row, K, p, 0, R, res); break;
#define SMALL_TYPE(T) case T: switch (M) { SMALL_CASE(T, 1) SMALL_CASE(T, 2) SMALL_CASE(T, 3) \
    SMALL_CASE(T, 4) } break;

/* out[:, n] for M <= SMALL_M rows of x from row `row` of a 32-element-block segment. */
static void small_rows_times_x(const heron_gguf_segment *seg, int64_t row_index, int64_t K,
                               const xprep *p, int64_t M, void *out, int64_t ldo, int out_bf16,
                               int64_t n) {
    const int64_t stored = seg->row_ids ? seg->row_ids[row_index] : row_index;
    const uint8_t *row = seg->data + stored * seg->row_bytes;
    float res[SMALL_M] = {0};
    switch ((int)seg->type) {
        SMALL_TYPE(GGML_Q4_0) SMALL_TYPE(GGML_Q5_0) SMALL_TYPE(GGML_Q8_0)
        default: return;
    }
    for (int64_t m = 0; m < M; m++) store_out(out, out_bf16, m * ldo + n, res[m]);
}

/* ------------------------------------------------------------------------- driver */

#define TILE_CASE(R) case R: \
    if (float_rows) dot_f32_tile(w->wf, p->xf + m0 * p->K64, p->K64, R, res); \
    else if (exact) dot_exact_tile(w, offsets, p->xf + m0 * p->K64, p->K64, R, res); \
    else { dot_int8_tile(w, p, m0, R, res); if (offsets) \
        offsets_tile(w->b, p->sum32 + m0 * (p->K64 / 32), p->K64, R, res); } \
    break;

/* out[:, n] for every row of x, from W's row decoded into w. */
static void row_times_x(const rowbuf *w, const xprep *p, int64_t M, int exact, int float_rows,
                        int offsets, void *out, int64_t ldo, int out_bf16, int64_t n) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE) {
        float res[MAX_TILE];
        const int R = M - m0 < MAX_TILE ? (int)(M - m0) : MAX_TILE;
        switch (R) {
            TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
            TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
        }
        for (int r = 0; r < R; r++) store_out(out, out_bf16, (m0 + r) * ldo + n, res[r]);
    }
}

/* wf = a c + b rounded as gguf.quants.dequantize rounds it: the product, then the sum (no
 * fused multiply-add: GCC would contract the two statements, Clang contracts only within one). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void expand_row(const rowbuf *w, int64_t K, int offsets) {
    for (int64_t k = 0; k < K; k++) {
        const float product = w->a[k / 16] * (float)w->c[k];
        w->wf[k] = offsets ? product + w->b[k / 32] : product;
    }
}

/* Row `row` of a segment into w: codes and scales, or (a float segment; values = 1: the
 * values of any row, rounded as gguf does) its float values. */
static void decode_into(const heron_gguf_segment *seg, int64_t row, int64_t K, int values,
                        rowbuf *w) {
    const int type = (int)seg->type;
    const uint8_t *data = seg->data + (seg->row_ids ? seg->row_ids[row] : row) * seg->row_bytes;
    if (gguf_float_bytes(type)) {
        decode_float_row(type, data, K, w->wf);
        return;
    }
    decode_row(type, data, K, w->c, w->a, w->b);
    if (values) expand_row(w, K, gguf_has_offsets(type));
}

static int rowbuf_alloc(rowbuf *w, int64_t K64) {
    w->c = calloc((size_t)K64, 1);
    w->a = calloc((size_t)(K64 / 16), sizeof(float));
    w->b = calloc((size_t)(K64 / 32), sizeof(float));
    w->wf = calloc((size_t)K64, sizeof(float));
    return w->c && w->a && w->b && w->wf;
}

static void rowbuf_free(rowbuf *w) {
    free(w->c), free(w->a), free(w->b), free(w->wf);
}

int heron_gguf_check(const heron_gguf_segment *segs, int64_t nsegs, int64_t K) {
    if (K <= 0 || K % 32) return -1;
    for (int64_t s = 0; s < nsegs; s++) {
        const int type = (int)segs[s].type, elems = gguf_block_elems(type);
        if (!elems && !gguf_float_bytes(type)) return -3;
        if (elems && K % elems) return -1;
        const int64_t row_bytes = elems ? K / elems * gguf_block_bytes(type)
                                        : K * gguf_float_bytes(type);
        if (segs[s].row_bytes != row_bytes) return -1;
    }
    return 0;
}

/*
 * x: [M, K] float32 (x_bf16 = 0) or bf16, row stride ldx elements; out: [M, N] float32 or
 * bf16 (out_bf16), row stride ldo; N = the segments' rows together. exact: 1 float32 mode,
 * 0 int8 mode. Returns 0; -1 for a K the formats do not divide; -2 out of memory; -3 an
 * unknown format.
 */
int heron_gguf_matmul(const void *x, int64_t ldx, int x_bf16, int64_t M, int64_t K,
                      const heron_gguf_segment *segs, int64_t nsegs, void *out, int64_t ldo,
                      int out_bf16, int exact) {
    int status = heron_gguf_check(segs, nsegs, K);
    if (status) return status;
    xprep p = {0};
    if (prepare_x(x, ldx, x_bf16, M, K, exact, &p)) {
        free_x(&p);
        return -2;
    }
    int64_t N = 0;
    for (int64_t s = 0; s < nsegs; s++) N += segs[s].rows;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        rowbuf w;
        if (!rowbuf_alloc(&w, p.K64)) failed = 1;
        int64_t seg = 0, first = 0;  /* the segment of the last row seen, and its first row */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (failed) continue;
            while (n < first) first -= segs[--seg].rows;
            while (n >= first + segs[seg].rows) first += segs[seg++].rows;
            const int type = (int)segs[seg].type;
            if (small_path(type, exact, M)) {
                small_rows_times_x(&segs[seg], n - first, K, &p, M, out, ldo, out_bf16, n);
                continue;
            }
            decode_into(&segs[seg], n - first, K, 0, &w);
            row_times_x(&w, &p, M, exact, gguf_float_bytes(type) != 0, gguf_has_offsets(type), out,
                        ldo, out_bf16, n);
        }
        rowbuf_free(&w);
    }
    free_x(&p);
    return failed ? -2 : 0;
}

/* out[i, :] = the dequantized row ids[i] of one segment (float32 or bf16). */
int heron_gguf_rows(const heron_gguf_segment *seg, int64_t K, const int64_t *ids, int64_t n,
                    void *out, int out_bf16) {
    int status = heron_gguf_check(seg, 1, K);
    if (status) return status;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= seg->rows) return -4;
    const int64_t K64 = (K + PAD - 1) / PAD * PAD;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (n >= 8)
    {
        rowbuf w;
        if (!rowbuf_alloc(&w, K64)) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            if (failed) continue;
            decode_into(seg, ids[i], K, 1, &w);
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + i * K;
                for (int64_t k = 0; k < K; k++) o[k] = fp32_to_bf16(w.wf[k]);
            } else {
                memcpy((float *)out + i * K, w.wf, sizeof(float) * (size_t)K);
            }
        }
        rowbuf_free(&w);
    }
    return failed ? -2 : 0;
}
