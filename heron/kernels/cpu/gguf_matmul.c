/*
 * out[M, N] = x[M, K] @ W[N, K]^T with W in GGUF's quantized blocks, read in place (the
 * memory-mapped file). W may be several segments of rows in different formats stacked along
 * N (a fused q/k/v whose q and v are Q5_0 and Q8_0). Built per variant (avx512, avx2vnni, avx2,
 * portable) by heron/kernels/cpu/build.py; formats and their decoding: gguf_blocks.h, which
 * turns a row into codes c (int8), scales a (per 16) and offsets b (per 32; Q2_K's per 16):
 * w = a c + b.
 * Two modes:
 *
 *   exact (x float32 or bf16): each thread takes a range of W's rows; a row is decoded once
 *          per call into a small buffer, made float (w = a c + b) per 16 and multiplied with
 *          every row of x, up to 8 at a time, in float32: the result is x @ dequantize(W)^T up
 *          to float rounding (summation order, fused multiply-add).
 *   int8  x quantized per call per row and group of 8 (xq = round(x / s), s = max |x| / 127:
 *          a transformer's outlier features spoil 7 neighbours, not 31), exact integer sums
 *          I_g of c xq per group g of 8, then in float32 per block j of 16 elements (one a):
 *              out = sum_j a_j (s_2j I_2j + s_2j+1 I_2j+1)  +  sum_g32 b_g (sum_g32 x)
 *          (Q2_K: + sum_j b_j (sum_j x), its offsets per 16; AVX-512 multiplies a pair of
 *          blocks with one a, a_2j = a_2j+1, as a_2j (t_2j + t_2j+1), t_j the bracket above)
 *          (the offsets b with the float sums of x), so the error against the exact result is
 *          at most sum_k |a_k c_k| s_k / 2, s_k the scale of k's group, plus float rounding.
 *          For more than a few rows of x, each thread takes panels of LANES rows of W (16; 8
 *          with AVX2) and decodes a panel into per-thread scratch (L1/L2; the file's blocks
 *          stay the only copy of W) with the rows interleaved: 32-bit lane l of a vector = 4
 *          consecutive codes of row l. 4 codes of a row of x are broadcast and multiplied with
 *          all the panel's rows at once (VPDPBUSD; VPMADDUBSW without VNNI): per 16 elements
 *          per row of x, 4 integer dot-product instructions, 2 converts and 3 float
 *          operations for all LANES rows of W. The variant fixes the order of the float
 *          operations (see panel_tile); where it also has a path for 1-2 rows of x (AVX-512:
 *          row_tile, one row of W at a time; AVX2: rowform_tile, a panel whose codes are not
 *          interleaved: the integer sums are transposed instead, and rowdirect_tile, the same
 *          straight from the blocks of Q4_0 / Q5_0 / Q8_0 rows), that path does the same
 *          operations in another layout, so a row's result never depends on the batch it is in.
 *          Integer forms: VNNI: VPDPBUSD with x + 128 as the unsigned operand and -128 sum c
 *          (per group, per row of W: the panel's `corr`) as the starting sum; in the row path,
 *          formats whose codes are q - z with q unsigned (Q4_0, Q5_0, Q4_K, Q6_K) take q as the
 *          unsigned operand and x as the signed one, from -z sum x (per 4, per row of x). AVX2 and
 *          AVX-512 without VNNI: VPMADDUBSW of x + 128 and c, two of them summed in 16 bits
 *          (|c| <= 32: no overflow), VPMADDWD; a panel with Q8_0 rows (|c| up to 128) uses
 *          |c| and x with c's sign instead. Portable: no interleave; the codes of x and of 4
 *          rows of W as int16, PMADDWD on SSE2 (SMULL / SMLAL on ARM64, plain C elsewhere) per
 *          row, then the 4 rows' sums of a group brought into one vector's lanes (panel_tile).
 *
 * Rows of x and of the buffers are padded to a multiple of 128 elements with zeros. A segment
 * may also be float rows (F32, F16, BF16: a fused weight whose other parts are quantized);
 * those are multiplied in float32 in both modes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gguf_blocks.h"
#include "kernels_gguf.h"

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/*
 * The avx2vnni variant: the avx2 variant's code with VPDPBUSD on ymm registers (AVX-VNNI's
 * VEX form, or AVX512-VNNI with VL's EVEX form where a CPU has that instead) where the avx2
 * variant sums products with VPMADDUBSW and VPMADDWD. The integer sums are the same (both are
 * exact), so the two variants' results are equal bit for bit.
 */
#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512BW__)) && \
    (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
#define AVX2_VNNI 1
static inline __attribute__((always_inline)) __m256i dpbusd256(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_dpbusd_epi32(acc, u, s);
#endif
}
#endif

#define PAD 128
#define MAX_TILE 8
#define XGROUP 8  /* elements of x per int8 scale */
#define WAYS 4  /* one row of x: rows of W multiplied at once (row_int8_ways) */
#define X_QUAD_ROWS 2  /* AVX-512 VNNI: up to this many rows of x (the row path) get q4 */

/* The per-call form of x. */
typedef struct {
    int64_t K64;      /* K rounded up to PAD */
    float *xf;        /* exact (and float segments): [M, K64] */
    uint8_t *xu;      /* int8: [M, K64] codes + 128 */
    int8_t *xs;       /* int8: [M, K64] codes */
    int16_t *x16;     /* int8, portable: [M, K64] the codes widened (widen_codes) */
    float *s4;        /* int8, portable: [M, K64 / 8][4] each scale of s8 four times */
    float *s8;        /* int8: [M, K64 / 8] scale of each group of 8 */
    float *sum32;     /* int8: [M, K64 / 32] float sums of x per 32 */
    float *sum16;     /* int8, a Q2_K segment: [M, K64 / 16] float sums of x per 16 (its offsets) */
    int32_t *q4;      /* int8, AVX-512 VNNI, M <= 2: [M, K64 / 4] minus the sums of xs per 4 */
} xprep;

/* One decoded row of W. */
typedef struct {
    int8_t *c;        /* [K64] */
    float *a;         /* [K64 / 16] */
    float *b;         /* [K64 / 16]: per 32 (b[k / 32]), or per 16 (Q2_K: b[k / 16]) */
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

/* AVX-512: where block j (0-7) of 16 elements of a 128 is kept in its row path's vectors of 8:
 * the even blocks, then the odd ones (0 2 4 6 1 3 5 7), so that a pair of blocks (32
 * elements) is lane l of the first half and of the second. */
#define BLOCK_AT(j) ((((j) >> 1) & 3) | (((j) & 1) << 2))

/* Where the scale of group g is stored: AVX-512 keeps the even groups' scales of each 128
 * elements, then the odd ones', each 8 in BLOCK_AT's order (its row path reads them as two
 * vectors of 8). */
static inline int64_t s8_index(int64_t g) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return (g & ~(int64_t)15) | ((g & 1) << 3) | BLOCK_AT((g >> 1) & 7);
#else
    return g;
#endif
}

/* One row of x in float -> int8 codes (also + 128 as uint8) and a scale per XGROUP
 * (max |x| / 127), float sums per 32 and (sum16 not NULL) per 16. */
static void quantize_x_row(const float *v, int64_t K64, uint8_t *xu, int8_t *xs, float *s8,
                           float *sum32, float *sum16) {
    int64_t g = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    /* 2 groups per vector, the same operations as below (NaN is no group's maximum) */
    for (; g + 2 <= K64 / XGROUP; g += 2) {
        const __m512 x = _mm512_loadu_ps(v + XGROUP * g);
        const __m512 a = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_abs_ps(x));
        __m512 m = _mm512_max_ps(a, _mm512_permute_ps(a, 0xB1));
        m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4E));
        m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xB1));  /* each lane: its group's max */
        const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ),
                                               _mm512_set1_ps(127.0f), m);
        __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv));
        code = _mm512_min_epi32(_mm512_max_epi32(code, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
        const __m128i bytes = _mm512_cvtepi32_epi8(code);
        _mm_storeu_si128((__m128i *)(xs + XGROUP * g), bytes);
        _mm_storeu_si128((__m128i *)(xu + XGROUP * g), _mm_xor_si128(bytes, _mm_set1_epi8((char)0x80)));
        const __m512 scale = _mm512_div_ps(m, _mm512_set1_ps(127.0f));
        s8[s8_index(g)] = _mm512_cvtss_f32(scale);
        s8[s8_index(g + 1)] = _mm512_cvtss_f32(_mm512_shuffle_f32x4(scale, scale, 0x02));
    }
#endif
    for (; g < K64 / XGROUP; g++) {
        const float *vg = v + XGROUP * g;
        float amax = 0.0f;
        for (int j = 0; j < XGROUP; j++) amax = fabsf(vg[j]) > amax ? fabsf(vg[j]) : amax;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < XGROUP; j++) {
            int code = (int)nearbyintf(vg[j] * inv);
            code = code > 127 ? 127 : (code < -127 ? -127 : code);
            xs[XGROUP * g + j] = (int8_t)code;
            xu[XGROUP * g + j] = (uint8_t)(code + 128);
        }
        s8[s8_index(g)] = amax / 127.0f;
    }
    for (int64_t g = 0; g < K64 / 32; g++) {
        float sum = 0.0f;
        for (int j = 0; j < 32; j++) sum += v[32 * g + j];
        sum32[g] = sum;
    }
    for (int64_t g = 0; sum16 && g < K64 / 16; g++) {
        float sum = 0.0f;
        for (int j = 0; j < 16; j++) sum += v[16 * g + j];
        sum16[g] = sum;
    }
}

/* Portable: n int8 codes (n a multiple of 16) as int16, per 16 the even ones, then the odd
 * ones (so that SSE2 widens 16 codes in three shifts). */
static void widen_codes(const int8_t *c, int64_t n, int16_t *dst) {
    for (int64_t k = 0; k < n; k += 16) {
#if defined(__SSE2__)
        const __m128i v = _mm_loadu_si128((const __m128i *)(c + k));
        _mm_storeu_si128((__m128i *)(dst + k), _mm_srai_epi16(_mm_slli_epi16(v, 8), 8));
        _mm_storeu_si128((__m128i *)(dst + k + 8), _mm_srai_epi16(v, 8));
#else
        for (int i = 0; i < 8; i++) dst[k + i] = c[k + 2 * i], dst[k + 8 + i] = c[k + 2 * i + 1];
#endif
    }
}

static int prepare_x(const void *x, int64_t ldx, int x_bf16, int64_t M, int64_t K, int exact,
                     int floats, int per16, xprep *p) {
    const int64_t K64 = (K + PAD - 1) / PAD * PAD;
    p->K64 = K64;
    /* int8 mode with no float segment: the float rows are only a step on the way (no M x K64
     * float32 copy: at M = 2048, K = 4864 it was 40 MB of fresh pages per call) */
    const int keep = exact || floats;
    p->xf = keep ? malloc(sizeof(float) * (size_t)(M * K64)) : NULL;
    if (!exact) {
        p->xu = malloc((size_t)(M * K64));
        p->xs = malloc((size_t)(M * K64));
        p->s8 = malloc(sizeof(float) * (size_t)(M * K64 / XGROUP));
        p->sum32 = malloc(sizeof(float) * (size_t)(M * K64 / 32));
        p->sum16 = per16 ? malloc(sizeof(float) * (size_t)(M * K64 / 16)) : NULL;
    }
#if !defined(__AVX2__)
    p->x16 = exact ? NULL : malloc(sizeof(int16_t) * (size_t)(M * K64));
    p->s4 = exact ? NULL : malloc(sizeof(float) * (size_t)(M * K64 / 2));
    if (!exact && (!p->x16 || !p->s4)) return -2;
#endif
    if ((keep && !p->xf) || (!exact && (!p->xu || !p->xs || !p->s8 || !p->sum32 || (per16 && !p->sum16))))
        return -2;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (!exact && M <= X_QUAD_ROWS && !(p->q4 = malloc(sizeof(int32_t) * (size_t)(M * K64 / 4))))
        return -2;
#endif
    const size_t elem = x_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (M >= 16)
    {
        float *scratch = keep ? NULL : malloc(sizeof(float) * (size_t)K64);
        if (!keep && !scratch) failed = 1;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            if (failed) continue;
            float *row = keep ? p->xf + m * K64 : scratch;
            load_x_row((const char *)x + (size_t)(m * ldx) * elem, x_bf16, K, K64, row);
            if (exact) continue;
            quantize_x_row(row, K64, p->xu + m * K64, p->xs + m * K64, p->s8 + m * (K64 / XGROUP),
                           p->sum32 + m * (K64 / 32), p->sum16 ? p->sum16 + m * (K64 / 16) : NULL);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
            if (p->q4)  /* -(1 * xs) per 4: VPDPBUSD with ones as the unsigned operand */
                for (int64_t k = 0; k < K64; k += 64) {
                    const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1),
                                                             _mm512_loadu_si512((const void *)(p->xs + m * K64 + k)));
                    _mm512_storeu_si512((void *)(p->q4 + (m * K64 + k) / 4),
                                        _mm512_sub_epi32(_mm512_setzero_si512(), sums));
                }
#endif
            if (!p->x16) continue;
            widen_codes(p->xs + m * K64, K64, p->x16 + m * K64);
            for (int64_t k = 0; k < K64 / 2; k++) p->s4[m * K64 / 2 + k] = p->s8[m * K64 / 8 + k / 4];
        }
        free(scratch);
    }
    return failed ? -2 : 0;
}

static void free_x(xprep *p) {
    free(p->xf), free(p->xu), free(p->xs), free(p->s8), free(p->sum32), free(p->sum16), free(p->x16);
    free(p->s4);
    free(p->q4);
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

/* Where offset b of element k is, for offsets elements per offset (gguf_offset_elems): k >> this. */
static inline int b_shift(int offsets) { return offsets == 16 ? 4 : 5; }

/*
 * Per variant, the exact mode's tile kernel over a decoded row w and rows m0 .. m0 + R - 1 of
 * x: res[r] = sum_k (a c + b)_k x_rk, the weight made float per 16 (shared by the rows), one
 * FMA per row. offsets: elements per offset (gguf_offset_elems).
 */
#if defined(__AVX512F__) && defined(__AVX512BW__)

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __attribute__((always_inline)) void dot_exact_tile(
        const rowbuf *w, int offsets, const float *x, int64_t K64, int R, float *res) {
    __m512 acc[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 16) {
        const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w->c + k))));
        const __m512 wk = offsets ? _mm512_fmadd_ps(c, _mm512_set1_ps(w->a[k / 16]), _mm512_set1_ps(w->b[k >> b_shift(offsets)]))
                                  : _mm512_mul_ps(c, _mm512_set1_ps(w->a[k / 16]));
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K64 + k), wk, acc[r]);
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
        const __m256 wk = offsets ? _mm256_fmadd_ps(c, _mm256_set1_ps(w->a[k / 16]), _mm256_set1_ps(w->b[k >> b_shift(offsets)]))
                                  : _mm256_mul_ps(c, _mm256_set1_ps(w->a[k / 16]));
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K64 + k), wk, acc[r]);
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
        const float a = w->a[k / 16], b = offsets ? w->b[k >> b_shift(offsets)] : 0.0f;
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

#endif

static inline void store_out(void *out, int out_bf16, int64_t index, float v) {
    if (out_bf16) ((uint16_t *)out)[index] = fp32_to_bf16(v);
    else ((float *)out)[index] = v;
}

/* ------------------------------------------------------------------------- int8 panels */

/*
 * A panel: LANES rows of W decoded and interleaved. Rows first decode into rows / ra / rb
 * (row-major, as gguf_blocks.h writes them), then go through a transpose of 32-bit units:
 *   c     SIMD: [K64 / 4][LANES][4] (vector q holds codes 4q .. 4q + 3 of every row)
 *   w16   portable: [LANES][K64] the rows' codes widened (widen_codes), not interleaved
 *   corr  SIMD: [K64 / 8][LANES] -128 x the sum of each row's 8 codes (x + 128 form)
 *   a, b  [A16][LANES], [B32][LANES]: the scales per 16 and offsets per 32 of every row
 *   b16   [A16][LANES]: offsets per 16 (Q2_K rows; zeros in the other rows where the panel has any)
 * Absent rows and float rows have all zeros (their lanes give 0: float rows are done apart).
 */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LANES 16
#define MTILE 4
#define ROW_M 2  /* up to this many rows of x: row_tile, one row of W at a time */
#define WIDENED 0
#define PREFETCH_NEXT 1  /* for 3+ rows of x the multiply of a panel outlasts the hardware's prefetch */
#define ROW_PREFETCH 4
#elif defined(__AVX2__)
#define LANES 8
#define MTILE 4
#define WIDENED 0
#define PREFETCH_NEXT 1  /* decoded panels (the row form too: Q4_K / Q6_K rows) */
#else
#define LANES 16
#define MTILE 4
#define WIDENED 1  /* the codes in w16, not c */
#define PREFETCH_NEXT 1  /* its longer multiply leaves the hardware's prefetch behind */
#endif

typedef struct {
    int64_t K64, A16, B32;  /* A16, B32: K64 / 16 and K64 / 32 rounded up to LANES */
    int8_t *rows;
    float *ra, *rb, *rb16;
    int8_t *c;
    int16_t *w16;     /* portable: [LANES][K64] the rows' codes widened (widen_codes) */
    int32_t *corr;
    float *a, *b, *b16;
    int offsets;      /* 1: some row has offsets per 32, 2: some row has offsets per 16 (both: 3) */
    int wide;         /* some row's codes go beyond -32 .. 31 (gguf_wide_codes) */
    unsigned floats;  /* bit l: row l is a float row */
    unsigned quant;   /* bit l: row l is a quantized row */
    unsigned pairs;   /* bit l: row l is a quantized row with one scale per 32 (gguf_scale_elems) */
    int narrow;       /* portable: w16 left unwritten, the codes widened as read from rows */
} panel;

static void *alloc64(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p) memset(p, 0, (bytes + 63) / 64 * 64);
    return p;
}

static int panel_alloc(panel *P, int64_t K64) {
    P->K64 = K64;
    P->A16 = (K64 / 16 + LANES - 1) / LANES * LANES;
    P->B32 = (K64 / 32 + LANES - 1) / LANES * LANES;
    P->rows = alloc64((size_t)(LANES * K64));
    P->ra = alloc64(sizeof(float) * (size_t)(LANES * P->A16));
    P->rb = alloc64(sizeof(float) * (size_t)(LANES * P->B32));
    P->rb16 = alloc64(sizeof(float) * (size_t)(LANES * P->A16));
    P->c = alloc64((size_t)(LANES * K64));
    P->corr = alloc64(sizeof(int32_t) * (size_t)(LANES * K64 / 8));
    P->w16 = WIDENED ? alloc64(sizeof(int16_t) * (size_t)(LANES * K64)) : NULL;
    P->a = alloc64(sizeof(float) * (size_t)(LANES * P->A16));
    P->b = alloc64(sizeof(float) * (size_t)(LANES * P->B32));
    P->b16 = alloc64(sizeof(float) * (size_t)(LANES * P->A16));
    return P->rows && P->ra && P->rb && P->rb16 && P->c && P->corr && P->a && P->b && P->b16 &&
           (P->w16 || !WIDENED);
}

static void panel_free(panel *P) {
    free(P->rows), free(P->ra), free(P->rb), free(P->rb16), free(P->c), free(P->corr), free(P->a);
    free(P->b), free(P->b16);
    free(P->w16);
}

/* dst[i][l] = src[l * stride + i] for i, l < LANES: a transpose of 32-bit units */
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* dst[i][l] = unit i of r[l]: the transpose of 16 registers of 16 32-bit units, stored */
static inline __attribute__((always_inline)) void transpose16(const __m512i r[16], void *dst) {
    __m512i t[16];
    for (int g = 0; g < 16; g += 4) {  /* 4x4 within each 128-bit lane, per 4 rows */
        const __m512i t0 = _mm512_unpacklo_epi32(r[g], r[g + 1]), t1 = _mm512_unpackhi_epi32(r[g], r[g + 1]);
        const __m512i t2 = _mm512_unpacklo_epi32(r[g + 2], r[g + 3]), t3 = _mm512_unpackhi_epi32(r[g + 2], r[g + 3]);
        t[g] = _mm512_unpacklo_epi64(t0, t2), t[g + 1] = _mm512_unpackhi_epi64(t0, t2);
        t[g + 2] = _mm512_unpacklo_epi64(t1, t3), t[g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    int32_t *d = dst;
    for (int i = 0; i < 4; i++) {  /* then the 128-bit lanes of the 4 row groups */
        const __m512i x0 = _mm512_shuffle_i32x4(t[i], t[4 + i], 0x44), x1 = _mm512_shuffle_i32x4(t[i], t[4 + i], 0xEE);
        const __m512i x2 = _mm512_shuffle_i32x4(t[8 + i], t[12 + i], 0x44), x3 = _mm512_shuffle_i32x4(t[8 + i], t[12 + i], 0xEE);
        _mm512_storeu_si512((void *)(d + 16 * i), _mm512_shuffle_i32x4(x0, x2, 0x88));
        _mm512_storeu_si512((void *)(d + 16 * (4 + i)), _mm512_shuffle_i32x4(x0, x2, 0xDD));
        _mm512_storeu_si512((void *)(d + 16 * (8 + i)), _mm512_shuffle_i32x4(x1, x3, 0x88));
        _mm512_storeu_si512((void *)(d + 16 * (12 + i)), _mm512_shuffle_i32x4(x1, x3, 0xDD));
    }
}

static inline void transpose_lanes(const void *src, int64_t stride, void *dst) {
    const int32_t *s = src;
    __m512i r[16];
    for (int l = 0; l < 16; l++) r[l] = _mm512_loadu_si512((const void *)(s + l * stride));
    transpose16(r, dst);
}
#elif defined(__AVX2__)
/* r[i][l] <- r[l][i] for an 8 x 8 block of 32-bit units held in registers */
static inline __attribute__((always_inline)) void transpose8(__m256i r[8]) {
    __m256i t[8];
    for (int g = 0; g < 8; g += 4) {
        const __m256i t0 = _mm256_unpacklo_epi32(r[g], r[g + 1]), t1 = _mm256_unpackhi_epi32(r[g], r[g + 1]);
        const __m256i t2 = _mm256_unpacklo_epi32(r[g + 2], r[g + 3]), t3 = _mm256_unpackhi_epi32(r[g + 2], r[g + 3]);
        t[g] = _mm256_unpacklo_epi64(t0, t2), t[g + 1] = _mm256_unpackhi_epi64(t0, t2);
        t[g + 2] = _mm256_unpacklo_epi64(t1, t3), t[g + 3] = _mm256_unpackhi_epi64(t1, t3);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2x128_si256(t[i], t[4 + i], 0x20);
        r[4 + i] = _mm256_permute2x128_si256(t[i], t[4 + i], 0x31);
    }
}

static inline void transpose_lanes(const void *src, int64_t stride, void *dst) {
    const int32_t *s = src;
    __m256i r[8];
    for (int l = 0; l < 8; l++) r[l] = _mm256_loadu_si256((const __m256i *)(s + l * stride));
    transpose8(r);
    for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)((int32_t *)dst + 8 * i), r[i]);
}
#else
static inline void transpose_lanes(const void *src, int64_t stride, void *dst) {
    const int32_t *s = src;
    int32_t *d = dst;
    for (int i = 0; i < LANES; i++)
        for (int l = 0; l < LANES; l++) d[i * LANES + l] = s[l * stride + i];
}
#endif

/* The interleaved scales and offsets, and (codes) the interleaved codes and the correction
 * sums, from the decoded rows. */
static void panel_interleave(panel *P, int codes) {
    const int64_t K64 = P->K64;
    if (codes != 2) {  /* 2: scales and codes are interleaved already, the sums are left */
        for (int64_t j = 0; j < P->A16; j += LANES)
            transpose_lanes(P->ra + j, P->A16, P->a + j * LANES);
        if (P->offsets)  /* (also for 2 alone: the tiles then add both kinds, these zeros) */
            for (int64_t j = 0; j < P->B32; j += LANES)
                transpose_lanes(P->rb + j, P->B32, P->b + j * LANES);
        if (P->offsets & 2)
            for (int64_t j = 0; j < P->A16; j += LANES)
                transpose_lanes(P->rb16 + j, P->A16, P->b16 + j * LANES);
    }
    if (!codes) return;
#if defined(__AVX2__)
    if (codes != 2)
        for (int64_t k = 0; k < K64; k += 4 * LANES)
            transpose_lanes(P->rows + k, K64 / 4, P->c + k * LANES);
#if defined(__AVX512F__) && defined(__AVX512BW__)
#if !defined(__AVX512VNNI__)
    if (P->wide) return;  /* the sign form: no correction sums */
#endif
    for (int64_t g = 0; g < K64 / 8; g++) {
        const __m512i c0 = _mm512_loadu_si512((const void *)(P->c + 128 * g));
        const __m512i c1 = _mm512_loadu_si512((const void *)(P->c + 128 * g + 64));
#if defined(__AVX512VNNI__)
        const __m512i hi = _mm512_set1_epi8((char)0x80);
        const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, c0), hi, c1);
        _mm512_storeu_si512((void *)(P->corr + 16 * g), _mm512_sub_epi32(_mm512_setzero_si512(), sum));
#else
        const __m512i ones = _mm512_set1_epi8(1);
        const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(ones, c0), _mm512_maddubs_epi16(ones, c1));
        _mm512_storeu_si512((void *)(P->corr + 16 * g), _mm512_madd_epi16(pairs, _mm512_set1_epi16(-128)));
#endif
    }
#else
#if !defined(AVX2_VNNI)
    if (P->wide) return;  /* the sign form: no correction sums */
#endif
    for (int64_t g = 0; g < K64 / 8; g++) {
        const __m256i ones = _mm256_set1_epi8(1);
        const __m256i c0 = _mm256_loadu_si256((const __m256i *)(P->c + 64 * g));
        const __m256i c1 = _mm256_loadu_si256((const __m256i *)(P->c + 64 * g + 32));
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(ones, c0), _mm256_maddubs_epi16(ones, c1));
        _mm256_storeu_si256((__m256i *)(P->corr + 8 * g), _mm256_madd_epi16(pairs, _mm256_set1_epi16(-128)));
    }
#endif
#else
    if (!P->narrow)
        for (int l = 0; l < LANES; l++) widen_codes(P->rows + l * K64, K64, P->w16 + l * K64);
#endif
}

/* Rows n0 .. n0 + count - 1 of the stacked segments where they are rows of one Q4_0 / Q5_0 /
 * Q8_0 segment: their addresses into rows (lanes from count on repeat the first row) and the
 * segment; else NULL. *seg, *first: the segment cursor (as in the driver). */
static inline const heron_gguf_segment *block_rows(const heron_gguf_segment *segs, int64_t *seg,
                                                   int64_t *first, int64_t n0, int count,
                                                   const uint8_t *rows[LANES]) {
    while (n0 < *first) *first -= segs[--*seg].rows;
    while (n0 >= *first + segs[*seg].rows) *first += segs[(*seg)++].rows;
    const heron_gguf_segment *s = &segs[*seg];
    if ((s->type != GGML_Q4_0 && s->type != GGML_Q5_0 && s->type != GGML_Q8_0) ||
        n0 + count > *first + s->rows)
        return NULL;
    for (int l = 0; l < LANES; l++) {
        const int64_t row = n0 - *first + (l < count ? l : 0);
        rows[l] = s->data + (s->row_ids ? s->row_ids[row] : row) * s->row_bytes;
    }
    return s;
}

/* Row `row` + LANES of segment s (the same row of the next panel) towards L2, from data, row
 * `row`'s bytes: the next panel's rows are read while this one's are multiplied (into L1, a
 * row's lines at once wait for its fill buffers). */
static inline void prefetch_next(const heron_gguf_segment *s, const uint8_t *data, int64_t row) {
    if (s->row_ids || row + LANES >= s->rows) return;
    const uint8_t *next = data + LANES * s->row_bytes;
    for (int64_t i = 0; i < s->row_bytes; i += 64) __builtin_prefetch(next + i, 0, 2);
}

#ifndef ROW_PREFETCH
#define ROW_PREFETCH 0  /* the row path for 2 rows of x: how many rows ahead to prefetch */
#endif

/* Row `row` of segment s (if it has one, in file order) towards L1. */
static inline void prefetch_row(const heron_gguf_segment *s, int64_t row) {
    if (s->row_ids || row >= s->rows) return;
    const uint8_t *data = s->data + row * s->row_bytes;
    for (int64_t i = 0; i < s->row_bytes; i += 64) __builtin_prefetch(data + i, 0, 3);
}

/* Rows n0 .. n0 + count - 1 of W into P; *seg, *first: the segment cursor (as in the
 * driver); codes = 0: the codes stay row-major (the AVX2 row form reads them so). */
static void panel_decode(const heron_gguf_segment *segs, int64_t *seg, int64_t *first, int64_t n0,
                         int count, int64_t K, int64_t M, int codes, panel *P) {
    const int64_t K64 = P->K64;
    P->offsets = 0;
    /* VPMADDUBSW: for 1-2 rows of x the sign form costs less than the correction sums */
    P->wide = M <= 2;
    P->narrow = M <= 2;  /* each code read once or twice: widening in place costs less */
    P->floats = 0, P->quant = 0, P->pairs = 0;
    unsigned per16 = 0;  /* bit l: row l has offsets per 16 */
    for (int l = 0; l < LANES; l++) {
        int8_t *c = P->rows + l * K64;
        float *a = P->ra + l * P->A16, *b = P->rb + l * P->B32;
        int type = -1;
        const uint8_t *data = NULL;
        if (l < count) {
            const int64_t n = n0 + l;
            while (n < *first) *first -= segs[--*seg].rows;
            while (n >= *first + segs[*seg].rows) *first += segs[(*seg)++].rows;
            const heron_gguf_segment *s = &segs[*seg];
            const int64_t row = n - *first;
            type = (int)s->type;
            data = s->data + (s->row_ids ? s->row_ids[row] : row) * s->row_bytes;
        }
        if (type < 0 || gguf_float_bytes(type)) {
            if (type >= 0) P->floats |= 1u << l;
            memset(c, 0, (size_t)K64), memset(a, 0, sizeof(float) * (size_t)P->A16);
            memset(b, 0, sizeof(float) * (size_t)P->B32);
            continue;
        }
        const int per = gguf_offset_elems(type);
        if (per == 32) P->offsets |= 1;
        else memset(b, 0, sizeof(float) * (size_t)P->B32);
        if (per == 16) P->offsets |= 2, per16 |= 1u << l;
        if (gguf_wide_codes(type)) P->wide = 1;
        P->quant |= 1u << l;
        if (gguf_scale_elems(type) == 32) P->pairs |= 1u << l;
        decode_row(type, data, K, c, a, per == 16 ? P->rb16 + l * P->A16 : b);
        if (PREFETCH_NEXT) prefetch_next(&segs[*seg], data, n0 + l - *first);
    }
    if (P->offsets & 2)  /* the other rows' offsets per 16 are 0 */
        for (int l = 0; l < LANES; l++)
            if (!(per16 >> l & 1)) memset(P->rb16 + l * P->A16, 0, sizeof(float) * (size_t)P->A16);
    panel_interleave(P, codes);
}

/*
 * Per variant, the int8 kernel over a panel and rows m0 .. m0 + R - 1 of x: acc[r][l] = the
 * int8 mode's sum for row l of the panel (offsets: with the b terms; wide: the sign form of
 * the products where VPMADDUBSW is used).
 */
static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

/*
 * AVX-512: out[n, m] = (acc_0 + acc_2) + (acc_1 + acc_3), acc_q the sequence of fused
 * multiply-adds over the pairs of blocks p = q, q + 4, q + 8, ... (blocks j = 2p and 2p + 1 of
 * 16 elements, groups 2j and 2j + 1 of 8), with t_j = fma(I_2j+1, s_2j+1, I_2j s_2j):
 *     a format with one scale per 32 (a_2p = a_2p+1; all but Q2_K, Q3_K, Q6_K: `pairs`):
 *         acc_q = fma(t_2p + t_2p+1, a_2p, acc_q)
 *     else: acc_q = fma(t_2p, a_2p, acc_q), then fma(t_2p+1, a_2p+1, acc_q), each followed
 *         by acc_q = fma(b_j, sum_j x, acc_q) where the offsets are per 16 (Q2_K)
 *     then, offsets per 32: acc_q = fma(b_p, sum_p x, acc_q)
 * The pairs form is one FMA per 32 elements less; the FMA pipes bound the panel (4 VPDPBUSD
 * and 3 multiplies per 16 elements, 4 rows of x by 16 of W, VCVTDQ2PS beside them on its
 * own pipe): one thread, M = 128, the second model's gate/up (Q5_0) 9.64 -> 8.85 ms, its
 * qkv 1.19 -> 1.10 ms. A panel runs the 4 sequences for 16 rows of W at once (a vector per
 * q; 4 rows of x at a time); a panel with rows of both kinds runs both ways and takes each
 * row's own (pair_mode). A single row of W (row_tile, for up to ROW_M rows of x) runs them in
 * the 4 lanes of one vector: the same numbers. s8 is stored per 128 elements as the 8 even
 * groups' scales, then the 8 odd ones', each in BLOCK_AT's order (the row path reads them as
 * two vectors of 8 whose halves are the even blocks and the odd ones: the pair sum is one add).
 */
typedef __m512 acc_t;

/* The integer sums of 8 products per lane: codes c0 (4 k), c1 (the next 4) by x's 8 codes. */
static inline __attribute__((always_inline)) __m512i sums8(
        __m512i corr, const uint8_t *xu, const int8_t *xs, __m512i c0, __m512i c1, int wide) {
#if defined(__AVX512VNNI__)
    (void)xs, (void)wide;
    const __m512i s = _mm512_dpbusd_epi32(corr, _mm512_set1_epi32(load_i32(xu)), c0);
    return _mm512_dpbusd_epi32(s, _mm512_set1_epi32(load_i32(xu + 4)), c1);
#else
    const __m512i ones = _mm512_set1_epi16(1);
    if (!wide) {
        const __m512i p0 = _mm512_maddubs_epi16(_mm512_set1_epi32(load_i32(xu)), c0);
        const __m512i p1 = _mm512_maddubs_epi16(_mm512_set1_epi32(load_i32(xu + 4)), c1);
        return _mm512_add_epi32(_mm512_madd_epi16(_mm512_add_epi16(p0, p1), ones), corr);
    }
    const __m512i x0 = _mm512_set1_epi32(load_i32(xs)), x1 = _mm512_set1_epi32(load_i32(xs + 4));
    const __m512i z = _mm512_setzero_si512();
    const __m512i p0 = _mm512_maddubs_epi16(_mm512_abs_epi8(c0), _mm512_mask_sub_epi8(x0, _mm512_movepi8_mask(c0), z, x0));
    const __m512i p1 = _mm512_maddubs_epi16(_mm512_abs_epi8(c1), _mm512_mask_sub_epi8(x1, _mm512_movepi8_mask(c1), z, x1));
    return _mm512_add_epi32(_mm512_madd_epi16(p0, ones), _mm512_madd_epi16(p1, ones));
#endif
}

static inline __attribute__((always_inline)) void panel_tile(
        const panel *P, const xprep *p, int64_t m0, int R, int offsets, int wide, int pairs,
        acc_t *out) {
    const int64_t K64 = p->K64, G8 = K64 / 8, G32 = K64 / 32;
    __m512 acc[MTILE][4], even[MTILE];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < K64 / 16; j0 += 8) {
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++) {
            const int64_t j = j0 + q;
            const int8_t *cj = P->c + 256 * j;
            const __m512i c0 = _mm512_load_si512((const void *)cj), c1 = _mm512_load_si512((const void *)(cj + 64));
            const __m512i c2 = _mm512_load_si512((const void *)(cj + 128)), c3 = _mm512_load_si512((const void *)(cj + 192));
            const __m512i k0 = _mm512_load_si512((const void *)(P->corr + 32 * j));
            const __m512i k1 = _mm512_load_si512((const void *)(P->corr + 32 * j + 16));
            const __m512 a = _mm512_load_ps(P->a + 16 * j);
            for (int r = 0; r < R; r++) {
                const int64_t m = m0 + r;
                const uint8_t *xu = p->xu + m * K64 + 16 * j;
                const int8_t *xs = p->xs + m * K64 + 16 * j;
                const float *s = p->s8 + m * G8 + 2 * j0;  /* even groups, then odd (s8_index) */
                const __m512 i0 = _mm512_cvtepi32_ps(sums8(k0, xu, xs, c0, c1, wide));
                const __m512 i1 = _mm512_cvtepi32_ps(sums8(k1, xu + 8, xs + 8, c2, c3, wide));
                const __m512 t = _mm512_fmadd_ps(i1, _mm512_set1_ps(s[8 + BLOCK_AT(q)]),
                                                 _mm512_mul_ps(i0, _mm512_set1_ps(s[BLOCK_AT(q)])));
                __m512 *accp = &acc[r][(q >> 1) & 3];  /* the sequence of block pair j / 2 */
                if (pairs) {
                    if (!(q & 1)) {
                        even[r] = t;
                        continue;
                    }
                    *accp = _mm512_fmadd_ps(_mm512_add_ps(even[r], t), a, *accp);
                } else {
                    *accp = _mm512_fmadd_ps(t, a, *accp);
                    if (offsets & 2)
                        *accp = _mm512_fmadd_ps(_mm512_load_ps(P->b16 + 16 * j),
                                                _mm512_set1_ps(p->sum16[m * (K64 / 16) + j]), *accp);
                }
                if ((offsets & 1) && (q & 1))
                    *accp = _mm512_fmadd_ps(_mm512_load_ps(P->b + 16 * (j / 2)),
                                            _mm512_set1_ps(p->sum32[m * G32 + j / 2]), *accp);
            }
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][2]), _mm512_add_ps(acc[r][1], acc[r][3]));
}

static inline void acc_store(acc_t v, float *dst) { _mm512_storeu_ps(dst, v); }

/* A row's 4-element sums (as 32-bit lanes) of 64 codes wc by 64 of x's. */
static inline __m512i dot_quads(__m512i base, const uint8_t *xu, const int8_t *xs, __m512i wc) {
#if defined(__AVX512VNNI__)
    (void)xs;  /* base: -128 sum c per lane (x + 128 is the unsigned operand) */
    return _mm512_dpbusd_epi32(base, _mm512_loadu_si512((const void *)xu), wc);
#else
    (void)xu, (void)base;
    const __m512i x = _mm512_loadu_si512((const void *)xs);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(wc), _mm512_setzero_si512(), x);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(wc), signed_x), _mm512_set1_epi16(1));
#endif
}

static inline __m512i quad_base(__m512i wc) {
#if defined(__AVX512VNNI__)
    return _mm512_sub_epi32(_mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), wc));
#else
    (void)wc;
    return _mm512_setzero_si512();
#endif
}

/* The 64 nibbles of two 32-element blocks' 16 bytes q0, q1 (low nibbles first, as Q4_0's):
 * 128-bit lanes q0 q0 q1 q1 (broadcast loads), lanes 1 and 3 shifted to their high nibbles. */
static inline __attribute__((always_inline)) __m512i nibble_blocks(const uint8_t *q0, const uint8_t *q1) {
    const __m512i qs = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q0))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q1)), 1);
    return _mm512_and_si512(_mm512_mask_srli_epi64(qs, 0xCC, qs, 4), _mm512_set1_epi8(15));
}

/* The 64 levels of two 32-element IQ4 pieces; unsign: each level + 128 (its sign bit flipped). */
static inline __attribute__((always_inline)) __m512i iq4_pair(const uint8_t *q0, const uint8_t *q1,
                                                              int unsign) {
    const __m512i levels = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
    return _mm512_shuffle_epi8(unsign ? _mm512_xor_si512(levels, _mm512_set1_epi8((char)0x80)) : levels,
                               nibble_blocks(q0, q1));
}

/* The codes of two 32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) in one register,
 * decoded in place: both blocks' nibbles split at once, the fifth bits set from a 64-bit mask. */
static inline __attribute__((always_inline)) __m512i pair_codes_as(int type, const uint8_t *b0,
                                                                   const uint8_t *b1, int unsign) {
    if (type == GGML_Q8_0) {
        const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                             _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
        return unsign ? _mm512_xor_si512(c, _mm512_set1_epi8((char)0x80)) : c;  /* c + 128 */
    }
    if (type == GGML_IQ4_NL) return iq4_pair(b0 + 2, b1 + 2, unsign);
    /* the nibbles after d (Q4_0), d m (Q4_1), d qh (Q5_0), d m qh (Q5_1) */
    const int off = type == GGML_Q4_0 ? 2 : type == GGML_Q4_1 ? 4 : type == GGML_Q5_0 ? 6 : 8;
    const __m512i q = nibble_blocks(b0 + off, b1 + off);
    if (type == GGML_Q4_0) return unsign ? q : _mm512_sub_epi8(q, _mm512_set1_epi8(8));
    if (type == GGML_Q4_1) return q;
    uint32_t h0, h1;  /* Q5_0: q5 - 16, i.e. the nibble less 16 where the fifth bit is 0 */
    memcpy(&h0, b0 + off - 4, 4);
    memcpy(&h1, b1 + off - 4, 4);
    const __mmask64 fifth = (__mmask64)h0 | ((__mmask64)h1 << 32);
    if (unsign || type == GGML_Q5_1) return _mm512_mask_add_epi8(q, fifth, q, _mm512_set1_epi8(16));  /* q5 itself */
    return _mm512_mask_sub_epi8(q, ~fifth, q, _mm512_set1_epi8(16));
}

/* The codes as decode_row writes them (signed: q - 8 for Q4_0, q - 16 for Q5_0). */
static inline __attribute__((always_inline)) __m512i pair_codes(int type, const uint8_t *b0,
                                                                const uint8_t *b1) {
    return pair_codes_as(type, b0, b1, 0);
}

/* The 64 codes of Q4_K's 32 bytes q (low nibbles, then high), or of Q6_K's 64 elements from
 * 32 bytes of ql (nibbles from `shift`: 0 low, 4 high) and qh (2 bits each at qshift, +2 for the
 * second 32): as decode_q4_k / decode_q6_k write them. */
static inline __attribute__((always_inline)) __m512i nibble_pairs(const uint8_t *q) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q));
    return _mm512_and_si512(_mm512_mask_srli_epi64(v, 0xF0, v, 4), _mm512_set1_epi8(15));
}

static inline __attribute__((always_inline)) __m512i q6_codes(const uint8_t *ql, const uint8_t *qh,
                                                              int shift, int qshift, int unsign) {
    /* elements 0-31: ql[0..32) and qh bits qshift; 32-63: ql[32..64) and qh bits qshift + 2 */
    const __m512i low = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512((const void *)ql), shift),
                                         _mm512_set1_epi8(15));
    const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh));
    const __m512i hs = _mm512_srlv_epi16(h, _mm512_inserti64x4(_mm512_set1_epi16((short)qshift),
                                                               _mm256_set1_epi16((short)(qshift + 2)), 1));
    const __m512i high = _mm512_slli_epi16(_mm512_and_si512(hs, _mm512_set1_epi8(3)), 4);
    const __m512i q = _mm512_or_si512(low, high);
    return unsign ? q : _mm512_sub_epi8(q, _mm512_set1_epi8(32));
}

/* 64 Q3_K codes of a half (qs: its 32 bytes, hm: the block's hmask): pieces s0 and s0 + 1 of
 * 32 (s0 0 or 2), bit j0 = 4 h + s0 of hmask for the first; unsign: q3 + 4 (0 .. 7). */
static inline __attribute__((always_inline)) __m512i q3_codes(const uint8_t *qs, const uint8_t *hm,
                                                              int s0, int j0, int unsign) {
    const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs));
    const __m512i low = _mm512_and_si512(
        _mm512_srlv_epi16(q, _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * s0)), _mm256_set1_epi16((short)(2 * s0 + 2)), 1)),
        _mm512_set1_epi8(3));
    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << j0)), _mm256_set1_epi8((char)(1 << (j0 + 1))), 1);
    const __mmask64 set = _mm512_test_epi8_mask(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)hm)), bit);
    const __m512i u = _mm512_mask_add_epi8(low, set, low, _mm512_set1_epi8(4));
    return unsign ? u : _mm512_sub_epi8(u, _mm512_set1_epi8(4));
}

/* 64 Q5_K codes of piece j (qs: its 32 bytes, qh: the block's; j0 = 2 j): nibble_pairs' codes
 * with their fifth bits, bit j0 of qh[l] for the low nibbles, j0 + 1 for the high ones. */
static inline __attribute__((always_inline)) __m512i q5k_codes(const uint8_t *qs, const uint8_t *qh, int j0) {
    const __m512i q = nibble_pairs(qs);
    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << j0)), _mm256_set1_epi8((char)(1 << (j0 + 1))), 1);
    const __mmask64 set = _mm512_test_epi8_mask(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh)), bit);
    return _mm512_mask_add_epi8(q, set, q, _mm512_set1_epi8(16));
}

/* 64 Q2_K codes of a half (qs: its 32 bytes): bits s0 (elements 0-31) and s0 + 2 (32-63) of
 * each byte, s0 0 or 4: as decode_q2_k writes them. */
static inline __attribute__((always_inline)) __m512i q2_codes(const uint8_t *qs, int s0) {
    const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs));
    return _mm512_and_si512(
        _mm512_srlv_epi16(q, _mm512_inserti64x4(_mm512_set1_epi16((short)s0), _mm256_set1_epi16((short)(s0 + 2)), 1)),
        _mm512_set1_epi8(3));
}

/* The fp16 values at p, p + stride, p + 2 stride, p + 3 stride (4 blocks' d, or Q4_1 / Q5_1's
 * m at + 2), gathered in a general register: no vector inserts. */
static inline __m128 fp16_x4(const uint8_t *p, int64_t stride) {
    const uint64_t v4 = (uint64_t)load_u16(p) | (uint64_t)load_u16(p + stride) << 16 |
                        (uint64_t)load_u16(p + 2 * stride) << 32 | (uint64_t)load_u16(p + 3 * stride) << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v4));
}

/* 128 codes (w0, w1) and their 8 scales of a row: from the decoded row w, or (type a format
 * of 32-element blocks, K a multiple of 128; Q2_K / Q3_K / Q4_K / Q5_K / Q6_K / IQ4_XS, K a
 * multiple of 256, with the super-block's scales ka from the caller) straight from the row's blocks.
 * unsign: the codes before their zero point is taken off (see zero_shift). */
static inline __attribute__((always_inline)) void row_chunk(
        int type, const uint8_t *row, const rowbuf *w, int64_t i, const float *ka, int unsign,
        __m512i *w0, __m512i *w1, __m256 *a) {
    if (type == GGML_Q4_K || type == GGML_Q6_K || type == GGML_IQ4_XS || type == GGML_Q3_K ||
        type == GGML_Q2_K || type == GGML_Q5_K) {
        const int h = (int)(i & 1);  /* which half of the super-block */
        const uint8_t *blk = row + (i / 2) * gguf_block_bytes(type);
        if (type == GGML_Q5_K) {  /* pieces 2h and 2h + 1 */
            const uint8_t *qs = blk + 48 + 64 * h;
            *w0 = q5k_codes(qs, blk + 16, 4 * h), *w1 = q5k_codes(qs + 32, blk + 16, 4 * h + 2);
        } else if (type == GGML_Q2_K) {
            const uint8_t *qs = blk + 16 + 32 * h;
            *w0 = q2_codes(qs, 0), *w1 = q2_codes(qs, 4);
        } else if (type == GGML_Q4_K) {
            const uint8_t *qs = blk + 16 + 64 * h;
            *w0 = nibble_pairs(qs), *w1 = nibble_pairs(qs + 32);
        } else if (type == GGML_IQ4_XS) {  /* pieces 4h .. 4h + 3 */
            const uint8_t *qs = blk + 8 + 64 * h;
            *w0 = iq4_pair(qs, qs + 16, unsign), *w1 = iq4_pair(qs + 32, qs + 48, unsign);
        } else if (type == GGML_Q3_K) {
            const uint8_t *qs = blk + 32 + 32 * h;
            *w0 = q3_codes(qs, blk, 0, 4 * h, unsign), *w1 = q3_codes(qs, blk, 2, 4 * h + 2, unsign);
        } else {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            *w0 = q6_codes(ql, qh, 0, 0, unsign), *w1 = q6_codes(ql, qh, 4, 4, unsign);
        }
        *a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(ka + 8 * h), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
        return;
    }
    if (type < 0) {
        *w0 = _mm512_loadu_si512((const void *)(w->c + 128 * i));
        *w1 = _mm512_loadu_si512((const void *)(w->c + 128 * i + 64));
        *a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(w->a + 8 * i), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
        return;
    }
    const int64_t bytes = gguf_block_bytes(type);
    const uint8_t *b0 = row + 4 * i * bytes, *b1 = b0 + bytes, *b2 = b1 + bytes, *b3 = b2 + bytes;
    *w0 = pair_codes_as(type, b0, b1, unsign);
    *w1 = pair_codes_as(type, b2, b3, unsign);
    const __m128 d = fp16_x4(b0, bytes);  /* a of blocks 2l and 2l + 1: lanes l and 4 + l */
    *a = _mm256_insertf128_ps(_mm256_castps128_ps256(d), d, 1);
}

/*
 * VNNI: log2 of the zero point z of a format whose codes are q - z with q in 0 .. 255 (Q4_0 8,
 * Q5_0 16, Q6_K 32, Q3_K 4; Q2_K, Q4_K, Q5_K, Q4_1, Q5_1 0: their codes are q; Q8_0 and IQ4 128: their
 * signed codes c are q - 128 for q = c with its sign bit flipped), else -1. For those, row_tile
 * takes q as VPDPBUSD's unsigned operand and x's signed codes as the other, starting from
 * -z sum4 xs (p->q4 << shift): the same integer sums as x + 128 by c from -128 sum4 c, without
 * the second VPDPBUSD per 64 codes of W that made -128 sum4 c, and without taking z off. One
 * thread, cache-warm, M = 1: the second model's ffn_down (Q4_K / Q6_K) 0.25 -> 0.21-0.22 ms,
 * its gate/up (Q5_0) 0.43-0.44 -> 0.41-0.43 ms.
 */
static inline int zero_shift(int type) {
#if defined(__AVX512VNNI__)
    return type == GGML_Q4_0 ? 3 : type == GGML_Q5_0 ? 4 : type == GGML_Q6_K ? 5 : type == GGML_Q3_K ? 2
         : type == GGML_Q8_0 || type == GGML_IQ4_NL || type == GGML_IQ4_XS ? 7
         : type == GGML_Q2_K || type == GGML_Q4_K || type == GGML_Q5_K || type == GGML_Q4_1 ||
           type == GGML_Q5_1 ? 0 : -1;
#else
    (void)type;
    return -1;
#endif
}

/*
 * NW rows of W (rows[0 .. NW - 1]; a decoded row w: NW = 1) times rows m0 .. m0 + R - 1 of x:
 * res[n * ROW_M + r]; lane q of acc runs sequence q. A row's sequences are a chain of dependent
 * FMAs (8 per 128 elements, in its 4 lanes), so one row of x times one row of W waits on their
 * latency; two rows of W (or of x) run two chains at once (row_int8_ways: four). With the zero
 * points above, one thread, cache-warm, M = 1: the second model's gate/up (Q5_0, K = 896) 0.43
 * -> 0.38-0.40 ms; its Q8_0 LM head from DRAM 5.5-6.3 -> 5.1 ms. Decode at batch 1, in process
 * (3 alternating runs): default model 9.0-9.1 -> 8.6-8.7 ms a step, second 15.2-15.4 -> 14.2-14.5.
 *
 * Where its time goes (Zen 4, one thread, M = 1, the second model's projections, timing hacks
 * against this code, alternating 2-3 x): it is bound by its instructions, not by memory (256
 * rows of gate/up, L2-resident, take as long a row as 4864). Without the float work after the
 * two VPDPBUSD (f, t, the pair sum and the FMA into acc) gate/up ran at 88 against 52 GFLOP/s
 * and down (Q4_K) at 146 against 50: the sums of groups of 8 and the per-8 scales of x cost
 * about 40 % of the time. Of that, the two cross-lane permutes that make the group sums cost
 * 12-14 % (52 -> 59 GFLOP/s without them); summing adjacent quads in-lane first and one permute
 * was slower (49); fp16_x4's scalar gather of the block scales 5-7 %. The float order is the
 * panel's (a row's result never depends on its batch), and on Zen 4 a zmm operation costs two
 * ymm ones, so regrouping the same operations over 2 or 4 rows of W saves nothing; a cheaper
 * row path needs a float order both paths share (e.g. x's scales per 16, or W decoded so that
 * VPDPBUSD chains give the group sums). Prefetching the next rows of the 4 streams
 * (prefetch_row 2 rows ahead, all layers from DRAM, 2 threads) gained nothing.
 */
static inline __attribute__((always_inline)) void row_tile(
        int type, const uint8_t *const *rows, int NW, const rowbuf *w, const xprep *p, int64_t m0,
        int R, int offsets, int pairs, float *res) {
    const int64_t K64 = p->K64, G8 = K64 / 8, G32 = K64 / 32;
    /* quads 4j and 4j + 2 (j < 8, lane BLOCK_AT(j)) of u (quads 0-15) and v (16-31), then
     * 4j + 1 and 4j + 3: their sum is the even groups' sums, then the odd groups' */
    const __m512i first = _mm512_set_epi32(30, 22, 14, 6, 26, 18, 10, 2, 28, 20, 12, 4, 24, 16, 8, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(1));
    const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  /* natural order -> BLOCK_AT's */
    __m128 acc[WAYS][ROW_M];
    for (int n = 0; n < NW; n++)
        for (int r = 0; r < R; r++) acc[n][r] = _mm_setzero_ps();
    const int kquant = type == GGML_Q4_K || type == GGML_Q6_K || type == GGML_IQ4_XS || type == GGML_Q3_K ||
                       type == GGML_Q2_K || type == GGML_Q5_K;
    const int shift = zero_shift(type);
    /* a K-quant super-block's scales (per 16) and offsets (per 32; Q2_K: per 16) */
    float ka[WAYS][16], kb[WAYS][16];
    for (int64_t i = 0; i < K64 / 128; i++) {
      /* unrolled: each row's accumulators stay in registers (rolled, GCC kept them on the stack
       * and every sum went through a store and a load). One thread, cache-warm, M = 1, min of
       * 3000 calls, alternating 3 x: the default model's gate/up (Q5_0) 110-115 -> 104-106 us,
       * 8192 rows of its Q8_0 LM head 170-186 -> 165 us; Q4_K / Q6_K alike */
#pragma GCC unroll 4
      for (int n = 0; n < NW; n++) {
        const uint8_t *row = rows[n];
        if (kquant && !(i & 1)) {  /* as decode_q4_k / decode_q6_k / decode_iq4_xs compute them */
            const uint8_t *blk = row + (i / 2) * gguf_block_bytes(type);
            if (type == GGML_Q4_K || type == GGML_Q5_K) {
                k_scales(blk, ka[n], kb[n]);
            } else if (type == GGML_Q2_K) {
                q2_k_scales(blk, ka[n], kb[n]);
            } else if (type == GGML_IQ4_XS) {
                iq4_xs_scales(blk, ka[n]);
            } else if (type == GGML_Q3_K) {
                q3_k_scales(blk, ka[n]);
            } else {
                q6_k_scales(blk, ka[n]);
            }
        }
        __m512i w0, w1;
        __m256 a;
        row_chunk(type, row, w, i, ka[n], shift >= 0, &w0, &w1, &a);
        const __m512i base0 = shift >= 0 ? _mm512_setzero_si512() : quad_base(w0);
        const __m512i base1 = shift >= 0 ? _mm512_setzero_si512() : quad_base(w1);
        const __m128 b = !offsets || offsets == 2 ? _mm_setzero_ps()
                         : kquant ? _mm_loadu_ps(kb[n] + 4 * (i & 1))
                         : type >= 0 ? fp16_x4(row + 4 * i * gguf_block_bytes(type) + 2, gguf_block_bytes(type))
                         : _mm_loadu_ps(w->b + 4 * i);
        __m128 *accn = acc[n];
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r, k = m * K64 + 128 * i;
            __m512i u, v;
#if defined(__AVX512VNNI__)
            if (shift >= 0) {
                const int32_t *q4 = p->q4 + k / 4;
                const __m512i z0 = shift ? _mm512_slli_epi32(_mm512_loadu_si512((const void *)q4), (unsigned)shift)
                                         : _mm512_setzero_si512();
                const __m512i z1 = shift ? _mm512_slli_epi32(_mm512_loadu_si512((const void *)(q4 + 16)), (unsigned)shift)
                                         : _mm512_setzero_si512();
                u = _mm512_dpbusd_epi32(z0, w0, _mm512_loadu_si512((const void *)(p->xs + k)));
                v = _mm512_dpbusd_epi32(z1, w1, _mm512_loadu_si512((const void *)(p->xs + k + 64)));
            } else
#endif
            {
                u = dot_quads(base0, p->xu + k, p->xs + k, w0);
                v = dot_quads(base1, p->xu + k + 64, p->xs + k + 64, w1);
            }
            const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_permutex2var_epi32(u, first, v),
                                                                 _mm512_permutex2var_epi32(u, second, v)));
            const __m512 s = _mm512_loadu_ps(p->s8 + m * G8 + 16 * i);
            const __m256 even = _mm256_mul_ps(_mm512_castps512_ps256(f), _mm512_castps512_ps256(s));
            const __m256 t = _mm256_fmadd_ps(_mm512_extractf32x8_ps(f, 1), _mm512_extractf32x8_ps(s, 1), even);
            const __m128 sx = offsets == 1 ? _mm_loadu_ps(p->sum32 + m * G32 + 4 * i) : _mm_setzero_ps();
            const float *sx16 = offsets == 2 ? p->sum16 + m * (K64 / 16) + 8 * i : NULL;
            /* t, a: the even blocks' in the first half, the odd ones' in the second (BLOCK_AT);
             * lane l of acc: block pair l of each 128 */
            const __m128 t_even = _mm256_castps256_ps128(t), t_odd = _mm256_extractf128_ps(t, 1);
            if (pairs) {
                accn[r] = _mm_fmadd_ps(_mm_add_ps(t_even, t_odd), _mm256_castps256_ps128(a), accn[r]);
            } else {
                const __m256 b16 = offsets == 2 ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(kb[n] + 8 * (i & 1)), evens)
                                                : _mm256_setzero_ps();
                const __m256 s16 = offsets == 2 ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(sx16), evens)
                                                : _mm256_setzero_ps();
                accn[r] = _mm_fmadd_ps(t_even, _mm256_castps256_ps128(a), accn[r]);
                if (offsets == 2)
                    accn[r] = _mm_fmadd_ps(_mm256_castps256_ps128(b16), _mm256_castps256_ps128(s16), accn[r]);
                accn[r] = _mm_fmadd_ps(t_odd, _mm256_extractf128_ps(a, 1), accn[r]);
                if (offsets == 2)
                    accn[r] = _mm_fmadd_ps(_mm256_extractf128_ps(b16, 1), _mm256_extractf128_ps(s16, 1), accn[r]);
            }
            if (offsets == 1) accn[r] = _mm_fmadd_ps(b, sx, accn[r]);
        }
      }
    }
    for (int n = 0; n < NW; n++)
        for (int r = 0; r < R; r++) {
            const __m128 h2 = _mm_add_ps(acc[n][r], _mm_movehl_ps(acc[n][r], acc[n][r]));  /* 0 + 2, 1 + 3 */
            res[n * ROW_M + r] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
        }
}

#define ROW_PATH 1

/* panel_decode for LANES rows of one Q4_0 / Q5_0 / Q8_0 segment and K a multiple of 64,
 * straight from the blocks: each row's 64 codes (two blocks, pair_codes) go into one register
 * and the 16 registers are transposed into the interleaved codes, without the row-major copy;
 * the 16 rows' block scales are converted together. The next panel's rows are prefetched as
 * these are read (the same prefetches issued all at once after the panel, as panel_decode's
 * are per row, made this path 50 % slower than panel_decode). The same panel as panel_decode's.
 * One thread, M=16: the default model's Q8_0 LM head 34.1 -> 31.3 ms, a Q5_0 gate/up 0.56 ->
 * 0.53 ms. Returns 0 (nothing done) where it does not apply. */
static int panel_decode_blocks(const heron_gguf_segment *segs, int64_t *seg, int64_t *first,
                               int64_t n0, int count, int64_t K, int64_t M, panel *P) {
    const uint8_t *rows[LANES];
    const heron_gguf_segment *s = count == LANES && K % 64 == 0
        ? block_rows(segs, seg, first, n0, count, rows) : NULL;
    if (!s) return 0;
    const int type = (int)s->type;
    const int64_t r0 = n0 - *first, bytes = gguf_block_bytes(type);  /* blocks start with d */
    const int ahead = PREFETCH_NEXT && !s->row_ids && r0 + 2 * LANES <= s->rows;
    for (int64_t m = 0; m < K / 64; m++) {
        __m512i r[LANES];
        for (int l = 0; l < LANES; l++) {
            const uint8_t *b0 = rows[l] + 2 * m * bytes;
            if (ahead) {  /* this row's next 2 blocks of the next panel */
                __builtin_prefetch(b0 + LANES * s->row_bytes, 0, 2);
                __builtin_prefetch(b0 + LANES * s->row_bytes + 2 * bytes - 1, 0, 2);
            }
            r[l] = pair_codes(type, b0, b0 + bytes);
        }
        transpose16(r, P->c + 64 * m * LANES);
        for (int h = 0; h < 2; h++) {  /* a[2j] = a[2j + 1] = block j's d, per row */
            const int64_t j = 2 * m + h;
            uint16_t d[LANES];
            for (int l = 0; l < LANES; l++) d[l] = load_u16(rows[l] + j * bytes);
            const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
            _mm512_storeu_ps(P->a + 2 * j * LANES, a);
            _mm512_storeu_ps(P->a + (2 * j + 1) * LANES, a);
        }
    }
    P->offsets = 0, P->wide = M <= 2 || type == GGML_Q8_0, P->narrow = M <= 2, P->floats = 0;
    P->quant = P->pairs = (1u << LANES) - 1;  /* Q4_0 / Q5_0 / Q8_0: one scale per 32 */
    panel_interleave(P, 2);
    return 1;
}

#elif defined(__AVX2__)

typedef __m256 acc_t;

static inline __attribute__((always_inline)) __m256i sums8(
        __m256i corr, const uint8_t *xu, const int8_t *xs, __m256i c0, __m256i c1, int wide) {
#if defined(AVX2_VNNI)
    /* x + 128 by c from -128 sum c (the panel's corr, kept for wide panels too): sum c x */
    (void)xs, (void)wide;
    const __m256i s = dpbusd256(corr, _mm256_set1_epi32(load_i32(xu)), c0);
    return dpbusd256(s, _mm256_set1_epi32(load_i32(xu + 4)), c1);
#endif
    const __m256i ones = _mm256_set1_epi16(1);
    if (!wide) {
        const __m256i p0 = _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(xu)), c0);
        const __m256i p1 = _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(xu + 4)), c1);
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones), corr);
    }
    const __m256i x0 = _mm256_set1_epi32(load_i32(xs)), x1 = _mm256_set1_epi32(load_i32(xs + 4));
    const __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(c0), _mm256_sign_epi8(x0, c0));
    const __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(c1), _mm256_sign_epi8(x1, c1));
    return _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
}

static inline __attribute__((always_inline)) void panel_tile(
        const panel *P, const xprep *p, int64_t m0, int R, int offsets, int wide, int pairs,
        acc_t *acc) {
    const int64_t K64 = p->K64, G8 = K64 / 8, G32 = K64 / 32;
    (void)pairs;  /* AVX2: one order for every format */
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t j2 = 0; j2 < G32; j2++) {
        for (int64_t j = 2 * j2; j < 2 * j2 + 2; j++) {
            const int8_t *cj = P->c + 16 * LANES * j;
            const __m256i c0 = _mm256_loadu_si256((const __m256i *)cj), c1 = _mm256_loadu_si256((const __m256i *)(cj + 32));
            const __m256i c2 = _mm256_loadu_si256((const __m256i *)(cj + 64)), c3 = _mm256_loadu_si256((const __m256i *)(cj + 96));
            const __m256i k0 = _mm256_loadu_si256((const __m256i *)(P->corr + 16 * j));
            const __m256i k1 = _mm256_loadu_si256((const __m256i *)(P->corr + 16 * j + 8));
            const __m256 a = _mm256_loadu_ps(P->a + 8 * j);
            for (int r = 0; r < R; r++) {
                const int64_t m = m0 + r;
                const uint8_t *xu = p->xu + m * K64 + 16 * j;
                const int8_t *xs = p->xs + m * K64 + 16 * j;
                const float *s = p->s8 + m * G8 + 2 * j;
                const __m256 i0 = _mm256_cvtepi32_ps(sums8(k0, xu, xs, c0, c1, wide));
                const __m256 i1 = _mm256_cvtepi32_ps(sums8(k1, xu + 8, xs + 8, c2, c3, wide));
                const __m256 t = _mm256_fmadd_ps(i1, _mm256_set1_ps(s[1]), _mm256_mul_ps(i0, _mm256_set1_ps(s[0])));
                acc[r] = _mm256_fmadd_ps(t, a, acc[r]);
                if (offsets & 2)
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(P->b16 + 8 * j),
                                             _mm256_set1_ps(p->sum16[m * (K64 / 16) + j]), acc[r]);
            }
        }
        if (offsets & 1) {
            const __m256 b = _mm256_loadu_ps(P->b + 8 * j2);
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(b, _mm256_set1_ps(p->sum32[(m0 + r) * G32 + j2]), acc[r]);
        }
    }
}

static inline void acc_store(acc_t v, float *dst) { _mm256_storeu_ps(dst, v); }

/*
 * The row form, for up to ROW_M rows of x: the panel's codes stay row-major (no interleave),
 * each row of W gives its sums of 8 per 64 elements in one vector (VPMADDUBSW in the sign
 * form, VPMADDWD, VPHADDD; avx2vnni: VPDPBUSD of c + 128 by x from -128 sum4 x, VPHADDD), 8
 * rows' sums are transposed to lanes, then the same float operations as panel_tile in the
 * same order: the same numbers. One thread, M = 1, the default model's ffn_down (Q6_K)
 * 84 us with avx2, 76 us with avx2vnni in the sign form, 70-73 us so.
 */
#define ROW_FORM 1
#define ROW_M 2

/* panel_decode for LANES rows of one Q4_0 / Q5_0 / Q8_0 segment, interleaved (3+ rows of x),
 * straight from the blocks: each row's 32 codes of a block in a register (as decode_q4_0 /
 * decode_q5_0 / decode_q8_0 make them), 8 registers transposed, the 8 rows' block scales
 * converted together, the next panel prefetched as the rows are read (as the AVX-512 one). The
 * same panel as panel_decode's. Returns 0 (nothing done) where it does not apply. */
static int panel_decode_blocks(const heron_gguf_segment *segs, int64_t *seg, int64_t *first,
                               int64_t n0, int count, int64_t K, int64_t M, panel *P) {
    const uint8_t *rows[LANES];
    const heron_gguf_segment *s = count == LANES ? block_rows(segs, seg, first, n0, count, rows) : NULL;
    if (!s) return 0;
    const int type = (int)s->type;
    const int64_t r0 = n0 - *first, bytes = gguf_block_bytes(type);  /* blocks start with d */
    const int ahead = PREFETCH_NEXT && !s->row_ids && r0 + 2 * LANES <= s->rows;
    for (int64_t j = 0; j < K / 32; j++) {
        __m256i r[LANES];
        uint16_t d[LANES];
        for (int l = 0; l < LANES; l++) {
            const uint8_t *blk = rows[l] + j * bytes;
            if (ahead) {  /* this row's block of the next panel */
                __builtin_prefetch(blk + LANES * s->row_bytes, 0, 2);
                __builtin_prefetch(blk + LANES * s->row_bytes + bytes - 1, 0, 2);
            }
            d[l] = load_u16(blk);
            if (type == GGML_Q8_0) {
                r[l] = _mm256_loadu_si256((const __m256i *)(blk + 2));
            } else if (type == GGML_Q4_0) {
                r[l] = _mm256_sub_epi8(nibbles_16(blk + 2), _mm256_set1_epi8(8));
            } else {
                uint32_t qh;
                memcpy(&qh, blk + 2, 4);
                r[l] = _mm256_sub_epi8(_mm256_or_si256(nibbles_16(blk + 6), bits_to_16s(qh)),
                                       _mm256_set1_epi8(16));
            }
        }
        transpose8(r);
        for (int i = 0; i < LANES; i++)
            _mm256_storeu_si256((__m256i *)(P->c + 32 * j * LANES) + i, r[i]);
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d));
        _mm256_storeu_ps(P->a + 2 * j * LANES, a);
        _mm256_storeu_ps(P->a + (2 * j + 1) * LANES, a);
    }
    P->offsets = 0, P->wide = M <= 2 || type == GGML_Q8_0, P->narrow = M <= 2, P->floats = 0;
    P->quant = P->pairs = (1u << LANES) - 1;  /* Q4_0 / Q5_0 / Q8_0: one scale per 32 */
    panel_interleave(P, 2);
    return 1;
}

/* A row's sums of 8 products for 64 codes c0, c1 (int8: the sign form) by x's x0, x1, in
 * VPHADDD's order: groups 0 1 4 5 | 2 3 6 7. */
static inline __attribute__((always_inline)) __m256i sign_sums(__m256i c0, __m256i c1, __m256i x0,
                                                               __m256i x1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(c0), _mm256_sign_epi8(x0, c0));
    const __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(c1), _mm256_sign_epi8(x1, c1));
    return _mm256_hadd_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
}

#if defined(AVX2_VNNI)
/* VNNI: -z times x's sums of 4 (lanes as VPDPBUSD's), z a format's zero point, for row_sums */
static inline __attribute__((always_inline)) __m256i minus_sums4(__m256i x, int z) {
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            dpbusd256(_mm256_setzero_si256(), _mm256_set1_epi8((char)z), x));
}

/* VNNI: sign_sums' integers from u = c + z (unsigned: for z = 128, c with its sign bit
 * flipped) by x, starting from -z sum4 x (z0, z1: minus_sums4): one VPDPBUSD per 32 codes and
 * row of x. */
static inline __attribute__((always_inline)) __m256i row_sums(__m256i u0, __m256i u1, __m256i x0,
                                                              __m256i x1, __m256i z0, __m256i z1) {
    return _mm256_hadd_epi32(dpbusd256(z0, u0, x0), dpbusd256(z1, u1, x1));
}
#endif

/* after transpose8 of 8 rows' sign_sums, vector at[g] holds group g of the 8 in 64 elements */
static const int rowform_at[8] = {0, 1, 4, 5, 2, 3, 6, 7};

/* Block h (of 16 elements) of 64 in the row form: acc = fma(I_2h+1 s_2h+1 + I_2h s_2h, a, acc),
 * g the transposed sums, s x's scales of the 8 groups. */
static inline __attribute__((always_inline)) __m256 rowform_block(
        const __m256i g[8], const float *s, int h, __m256 a, __m256 acc) {
    const __m256 i0 = _mm256_cvtepi32_ps(g[rowform_at[2 * h]]);
    const __m256 i1 = _mm256_cvtepi32_ps(g[rowform_at[2 * h + 1]]);
    const __m256 t = _mm256_fmadd_ps(i1, _mm256_set1_ps(s[2 * h + 1]),
                                     _mm256_mul_ps(i0, _mm256_set1_ps(s[2 * h])));
    return _mm256_fmadd_ps(t, a, acc);
}

static inline __attribute__((always_inline)) void rowform_tile(
        const panel *P, const xprep *p, int64_t m0, int R, int offsets, acc_t *acc) {
    const int64_t K64 = p->K64, G8 = K64 / 8, G32 = K64 / 32;
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64) {
        __m256i g[ROW_M][8];
        __m256i x0[ROW_M], x1[ROW_M];
        for (int r = 0; r < R; r++) {
            x0[r] = _mm256_loadu_si256((const __m256i *)(p->xs + (m0 + r) * K64 + k));
            x1[r] = _mm256_loadu_si256((const __m256i *)(p->xs + (m0 + r) * K64 + k + 32));
        }
#if defined(AVX2_VNNI)
        __m256i z0[ROW_M], z1[ROW_M];
        for (int r = 0; r < R; r++) z0[r] = minus_sums4(x0[r], 128), z1[r] = minus_sums4(x1[r], 128);
#endif
        for (int l = 0; l < LANES; l++) {
            const int8_t *c = P->rows + l * K64 + k;
            const __m256i c0 = _mm256_loadu_si256((const __m256i *)c);
            const __m256i c1 = _mm256_loadu_si256((const __m256i *)(c + 32));
#if defined(AVX2_VNNI)
            const __m256i flip = _mm256_set1_epi8((char)0x80);
            const __m256i u0 = _mm256_xor_si256(c0, flip), u1 = _mm256_xor_si256(c1, flip);
            for (int r = 0; r < R; r++) g[r][l] = row_sums(u0, u1, x0[r], x1[r], z0[r], z1[r]);
#else
            for (int r = 0; r < R; r++) g[r][l] = sign_sums(c0, c1, x0[r], x1[r]);
#endif
        }
        for (int r = 0; r < R; r++) {
            transpose8(g[r]);
            const int64_t m = m0 + r;
            const float *s = p->s8 + m * G8 + k / 8;
            for (int h = 0; h < 4; h++) {  /* blocks of 16: j = k / 16 + h */
                const int64_t j = k / 16 + h;
                acc[r] = rowform_block(g[r], s, h, _mm256_loadu_ps(P->a + LANES * j), acc[r]);
                if (offsets & 2)
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(P->b16 + LANES * j),
                                             _mm256_set1_ps(p->sum16[m * (K64 / 16) + j]), acc[r]);
                if ((offsets & 1) && (h & 1))
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(P->b + LANES * (j / 2)),
                                             _mm256_set1_ps(p->sum32[m * G32 + j / 2]), acc[r]);
            }
        }
    }
}

/*
 * The row form straight from the file's blocks (Q4_0, Q5_0, Q8_0 rows of one segment, K a
 * multiple of 128): no decoded panel. The same integer sums of 8 and, after the transpose,
 * the same float operations as rowform_tile: the same numbers. Q4_0 and Q5_0 multiply their
 * unsigned codes u (c = u - off, off 8 or 16) with x in VPMADDUBSW, sum 4 products in 16 bits
 * (VPHADDW: at most 4 x 31 x 127) and take off x (x's sum per 8) away: sum c x exactly
 * (avx2vnni: VPDPBUSD of u by x from -off sum4 x; Q8_0: of c + 128 from -128 sum4 x).
 */
#define ROW_DIRECT 1
/* Reading 8 rows a chunk at a time defeats the hardware's prefetch (the Q8_0 LM head took 2.5x
 * as long); each chunk prefetches its own bytes this far ahead into L2. */
#define DIRECT_AHEAD 32768

/* 64 codes of a row (two blocks at blk) as two vectors of 32; unsigned (u) but for Q8_0. */
static inline __attribute__((always_inline)) void direct_codes(int type, const uint8_t *blk,
                                                                __m256i *c0, __m256i *c1) {
    if (type == GGML_Q8_0) {
        *c0 = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *c1 = _mm256_loadu_si256((const __m256i *)(blk + 36));
        return;
    }
    const int bytes = type == GGML_Q4_0 ? 18 : 22, off = type == GGML_Q4_0 ? 2 : 6;
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), low = _mm256_set1_epi8(15);
    for (int b = 0; b < 2; b++) {
        const uint8_t *q = blk + b * bytes;
        const __m128i packed = _mm_loadu_si128((const __m128i *)(q + off));
        const __m256i both = _mm256_broadcastsi128_si256(packed);
        __m256i u = _mm256_and_si256(_mm256_srlv_epi32(both, shift), low);
        if (type == GGML_Q5_0) {
            uint32_t qh;
            memcpy(&qh, q + 2, 4);
            u = _mm256_or_si256(u, bits_to_16s(qh));
        }
        *(b ? c1 : c0) = u;
    }
}

/* Lane l: the fp16 scale at byte `at` of row l. */
static inline __m256 direct_scales(const uint8_t *const rows[LANES], int64_t at) {
    return _mm256_cvtph_ps(_mm_setr_epi16(
        (short)load_u16(rows[0] + at), (short)load_u16(rows[1] + at), (short)load_u16(rows[2] + at),
        (short)load_u16(rows[3] + at), (short)load_u16(rows[4] + at), (short)load_u16(rows[5] + at),
        (short)load_u16(rows[6] + at), (short)load_u16(rows[7] + at)));
}

static inline __attribute__((always_inline)) void rowdirect_tile(
        int type, const uint8_t *const rows[LANES], int64_t ahead, const xprep *p, int64_t m0,
        int R, acc_t *acc) {
    const int64_t K64 = p->K64, G8 = K64 / 8;
    const int bytes = gguf_block_bytes(type);
#if defined(AVX2_VNNI)
    /* VPDPBUSD of u = c + z by x from -z sum4 x; z: Q8_0's 128 (its codes' sign bits flipped),
     * Q4_0 / Q5_0's off (their unsigned codes as read) */
    const int z = type == GGML_Q8_0 ? 128 : type == GGML_Q4_0 ? 8 : 16;
#else
    const __m256i ones = _mm256_set1_epi16(1), off = _mm256_set1_epi16(type == GGML_Q4_0 ? 8 : 16);
#endif
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64) {
        const int64_t blk = k / 32 * bytes;
        __m256i g[ROW_M][8];
        __m256i x0[ROW_M], x1[ROW_M];
#if defined(AVX2_VNNI)
        __m256i z0[ROW_M], z1[ROW_M];
#else
        __m256i corr[ROW_M];
#endif
        for (int r = 0; r < R; r++) {
            x0[r] = _mm256_loadu_si256((const __m256i *)(p->xs + (m0 + r) * K64 + k));
            x1[r] = _mm256_loadu_si256((const __m256i *)(p->xs + (m0 + r) * K64 + k + 32));
#if defined(AVX2_VNNI)
            z0[r] = minus_sums4(x0[r], z), z1[r] = minus_sums4(x1[r], z);
#else
            /* off x the sums of x per 8, in the order of the sums */
            const __m256i u1 = _mm256_set1_epi8(1);
            corr[r] = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_maddubs_epi16(u1, x0[r]),
                                                          _mm256_maddubs_epi16(u1, x1[r])), off);
#endif
        }
        for (int l = 0; l < LANES; l++) {
            if (ahead) {
                __builtin_prefetch(rows[l] + blk + ahead, 0, 2);
                __builtin_prefetch(rows[l] + blk + ahead + 64, 0, 2);
            }
            __m256i c0, c1;
            direct_codes(type, rows[l] + blk, &c0, &c1);
#if defined(AVX2_VNNI)
            if (type == GGML_Q8_0) {
                const __m256i flip = _mm256_set1_epi8((char)0x80);
                c0 = _mm256_xor_si256(c0, flip), c1 = _mm256_xor_si256(c1, flip);
            }
            for (int r = 0; r < R; r++) g[r][l] = row_sums(c0, c1, x0[r], x1[r], z0[r], z1[r]);
#else
            for (int r = 0; r < R; r++) {
                if (type == GGML_Q8_0) {
                    g[r][l] = sign_sums(c0, c1, x0[r], x1[r]);
                    continue;
                }
                const __m256i h = _mm256_hadd_epi16(_mm256_maddubs_epi16(c0, x0[r]),
                                                    _mm256_maddubs_epi16(c1, x1[r]));
                g[r][l] = _mm256_sub_epi32(_mm256_madd_epi16(h, ones), corr[r]);
            }
#endif
        }
        const __m256 d0 = direct_scales(rows, blk), d1 = direct_scales(rows, blk + bytes);
        for (int r = 0; r < R; r++) {
            transpose8(g[r]);
            const float *s = p->s8 + (m0 + r) * G8 + k / 8;
            for (int h = 0; h < 4; h++) acc[r] = rowform_block(g[r], s, h, h < 2 ? d0 : d1, acc[r]);
        }
    }
}

#else  /* portable */

/*
 * Portable: a panel is 4 quads of 4 rows of W; a vector f4 holds one value per row of a quad,
 * in the order of the other variants' lanes: per block j of 16 elements
 *     acc += (I_2j s_2j + I_2j+1 s_2j+1) a_j,  then for odd j: acc += b_j/2 sum_j/2 x
 * (no fused multiply-add where the target has none). The integer sums come from the rows'
 * widened codes and x's (int16, multiplied into int32: PMADDWD on SSE2, SMLAL on ARM64).
 */
typedef struct { float v[LANES]; } acc_t;

#if defined(__SSE2__)
typedef __m128 f4;
static inline f4 f4_zero(void) { return _mm_setzero_ps(); }
static inline f4 f4_set1(float v) { return _mm_set1_ps(v); }
static inline f4 f4_load(const float *p) { return _mm_loadu_ps(p); }
static inline f4 f4_add(f4 u, f4 v) { return _mm_add_ps(u, v); }
static inline f4 f4_mul(f4 u, f4 v) { return _mm_mul_ps(u, v); }
static inline void f4_store(f4 v, float *p) { _mm_storeu_ps(p, v); }

/* Lane i: 2 partial sums of group 0, then 2 of group 1 (pairs of even codes, of odd ones);
 * the codes widened (w16) or int8 (narrow). */
static inline __attribute__((always_inline)) __m128i row_parts(const void *w, int narrow,
                                                               const int16_t *x) {
    __m128i even, odd;
    if (narrow) {
        const __m128i v = _mm_loadu_si128((const __m128i *)w);
        even = _mm_srai_epi16(_mm_slli_epi16(v, 8), 8), odd = _mm_srai_epi16(v, 8);
    } else {
        even = _mm_load_si128((const __m128i *)w);
        odd = _mm_load_si128((const __m128i *)w + 1);
    }
    return _mm_add_epi32(_mm_madd_epi16(even, _mm_loadu_si128((const __m128i *)x)),
                         _mm_madd_epi16(odd, _mm_loadu_si128((const __m128i *)(x + 8))));
}

/* [u0 + u1, u2 + u3, v0 + v1, v2 + v3] */
static inline __m128 pair_sums(__m128i u, __m128i v) {
    const __m128 fu = _mm_castsi128_ps(u), fv = _mm_castsi128_ps(v);
    return _mm_castsi128_ps(_mm_add_epi32(
        _mm_castps_si128(_mm_shuffle_ps(fu, fv, _MM_SHUFFLE(2, 0, 2, 0))),
        _mm_castps_si128(_mm_shuffle_ps(fu, fv, _MM_SHUFFLE(3, 1, 3, 1)))));
}

/* The sums of the 2 groups of 8 of 16 elements for the 4 rows of a quad (codes at w, row
 * stride K64 codes: int16, or int8 where narrow), as floats: i0[i], i1[i] for row i. */
static inline __attribute__((always_inline)) void quad_sums(const void *w, int narrow, int64_t K64,
                                                             const int16_t *x, f4 *i0, f4 *i1) {
    const int64_t stride = narrow ? K64 : 2 * K64;
    const char *c = w;
    const __m128 ab = pair_sums(row_parts(c, narrow, x), row_parts(c + stride, narrow, x));
    const __m128 cd = pair_sums(row_parts(c + 2 * stride, narrow, x),
                                row_parts(c + 3 * stride, narrow, x));
    *i0 = _mm_cvtepi32_ps(_mm_castps_si128(_mm_shuffle_ps(ab, cd, _MM_SHUFFLE(2, 0, 2, 0))));
    *i1 = _mm_cvtepi32_ps(_mm_castps_si128(_mm_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 1, 3, 1))));
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
typedef float32x4_t f4;
static inline f4 f4_zero(void) { return vdupq_n_f32(0.0f); }
static inline f4 f4_set1(float v) { return vdupq_n_f32(v); }
static inline f4 f4_load(const float *p) { return vld1q_f32(p); }
static inline f4 f4_add(f4 u, f4 v) { return vaddq_f32(u, v); }
static inline f4 f4_mul(f4 u, f4 v) { return vmulq_f32(u, v); }
static inline void f4_store(f4 v, float *p) { vst1q_f32(p, v); }

/* Lane i: a partial sum of group g (0, 1) of a row's 16 codes by x's: SMULL / SMLAL. */
static inline __attribute__((always_inline)) void row_parts(const void *w, int narrow,
                                                            const int16_t *x, int32x4_t *g) {
    int16x8_t even, odd;
    if (narrow) {
        const int8x8x2_t v = vld2_s8((const int8_t *)w);  /* even codes, odd codes */
        even = vmovl_s8(v.val[0]), odd = vmovl_s8(v.val[1]);
    } else {
        even = vld1q_s16((const int16_t *)w), odd = vld1q_s16((const int16_t *)w + 8);
    }
    const int16x8_t xe = vld1q_s16(x), xo = vld1q_s16(x + 8);
    g[0] = vmlal_s16(vmull_s16(vget_low_s16(even), vget_low_s16(xe)), vget_low_s16(odd),
                     vget_low_s16(xo));
    g[1] = vmlal_high_s16(vmull_high_s16(even, xe), odd, xo);
}

static inline __attribute__((always_inline)) void quad_sums(const void *w, int narrow, int64_t K64,
                                                             const int16_t *x, f4 *i0, f4 *i1) {
    const int64_t stride = narrow ? K64 : 2 * K64;
    const char *c = w;
    int32x4_t a[2], b[2], cc[2], d[2];
    row_parts(c, narrow, x, a), row_parts(c + stride, narrow, x, b);
    row_parts(c + 2 * stride, narrow, x, cc), row_parts(c + 3 * stride, narrow, x, d);
    *i0 = vcvtq_f32_s32(vpaddq_s32(vpaddq_s32(a[0], b[0]), vpaddq_s32(cc[0], d[0])));
    *i1 = vcvtq_f32_s32(vpaddq_s32(vpaddq_s32(a[1], b[1]), vpaddq_s32(cc[1], d[1])));
}
#else
typedef struct { float v[4]; } f4;
static inline f4 f4_zero(void) { return (f4){{0.0f, 0.0f, 0.0f, 0.0f}}; }
static inline f4 f4_set1(float v) { return (f4){{v, v, v, v}}; }
static inline f4 f4_load(const float *p) { f4 r; memcpy(r.v, p, sizeof r.v); return r; }
static inline f4 f4_add(f4 u, f4 v) {
    for (int i = 0; i < 4; i++) u.v[i] += v.v[i];
    return u;
}
static inline f4 f4_mul(f4 u, f4 v) {
    for (int i = 0; i < 4; i++) u.v[i] *= v.v[i];
    return u;
}
static inline void f4_store(f4 v, float *p) { memcpy(p, v.v, sizeof v.v); }

static inline __attribute__((always_inline)) void quad_sums(const void *w, int narrow, int64_t K64,
                                                             const int16_t *x, f4 *i0, f4 *i1) {
    for (int i = 0; i < 4; i++) {
        int16_t wi[16];  /* widened as widen_codes does */
        if (narrow) widen_codes((const int8_t *)w + i * K64, 16, wi);
        else memcpy(wi, (const int16_t *)w + i * K64, sizeof wi);
        int32_t s0 = 0, s1 = 0;
        for (int t = 0; t < 4; t++) {
            s0 += wi[t] * x[t] + wi[8 + t] * x[8 + t];
            s1 += wi[4 + t] * x[4 + t] + wi[12 + t] * x[12 + t];
        }
        i0->v[i] = (float)s0, i1->v[i] = (float)s1;
    }
}
#endif

static inline __attribute__((always_inline)) void panel_tile(
        const panel *P, const xprep *p, int64_t m0, int R, int offsets, int narrow, int pairs,
        acc_t *acc) {
    const int64_t K64 = p->K64, G8 = K64 / 8, G32 = K64 / 32;
    (void)pairs;  /* portable: one order for every format */
    for (int q = 0; q < LANES; q += 4) {
        const int8_t *c = P->rows + q * K64;  /* rows q .. q + 3 */
        const int16_t *w = P->w16 + q * K64;
        f4 sum[MTILE];
        for (int r = 0; r < R; r++) sum[r] = f4_zero();
        for (int64_t j = 0; j < K64 / 16; j++) {
            const f4 a = f4_load(P->a + LANES * j + q);
            for (int r = 0; r < R; r++) {
                const int64_t m = m0 + r;
                const float *s = p->s4 + 4 * (m * G8 + 2 * j);
                f4 i0, i1;
                const void *codes = narrow ? (const void *)(c + 16 * j)
                                           : (const void *)(w + 16 * j);
                quad_sums(codes, narrow, K64, p->x16 + m * K64 + 16 * j, &i0, &i1);
                const f4 t = f4_add(f4_mul(i0, f4_load(s)), f4_mul(i1, f4_load(s + 4)));
                sum[r] = f4_add(sum[r], f4_mul(t, a));
                if (offsets & 2)
                    sum[r] = f4_add(sum[r], f4_mul(f4_load(P->b16 + LANES * j + q),
                                                   f4_set1(p->sum16[m * (K64 / 16) + j])));
            }
            if ((offsets & 1) && (j & 1)) {
                const f4 b = f4_load(P->b + LANES * (j / 2) + q);
                for (int r = 0; r < R; r++)
                    sum[r] = f4_add(sum[r], f4_mul(b, f4_set1(p->sum32[(m0 + r) * G32 + j / 2])));
            }
        }
        for (int r = 0; r < R; r++) f4_store(sum[r], acc[r].v + q);
    }
}

static inline void acc_store(acc_t v, float *dst) { memcpy(dst, v.v, sizeof v.v); }

#endif

#if defined(__AVX512VNNI__) || defined(AVX2_VNNI)
#define PANEL_WIDE(P) 0  /* one integer form for every format */
#elif !defined(__AVX2__)
#define PANEL_WIDE(P) ((P)->narrow)  /* portable: the codes' source */
#else
#define PANEL_WIDE(P) ((P)->wide)
#endif

/* AVX-512: 1 where every quantized row of the panel has one scale per 32 (panel_tile's pairs),
 * 0 where none has, 2 where some have (the panel runs both ways; each row takes its own) */
static inline int pair_mode(const panel *P) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return P->pairs == P->quant ? 1 : P->pairs ? 2 : 0;
#else
    (void)P;
    return 0;
#endif
}

/* acc[r]'s lanes in mask from both[r] */
static inline void blend_pairs(acc_t *acc, const acc_t *both, int R, unsigned mask) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (int r = 0; r < R; r++) acc[r] = _mm512_mask_mov_ps(acc[r], (__mmask16)mask, both[r]);
#else
    (void)acc, (void)both, (void)R, (void)mask;
#endif
}

#if defined(__AVX512VNNI__) || defined(AVX2_VNNI)
#define PANEL_CALL(R, OFF, PAIRS, ACC) panel_tile(P, p, m0, R, OFF, 0, PAIRS, ACC);
#else
#define PANEL_CALL(R, OFF, PAIRS, ACC) \
    { if (wide) panel_tile(P, p, m0, R, OFF, 1, PAIRS, ACC); else panel_tile(P, p, m0, R, OFF, 0, PAIRS, ACC); }
#endif

/* A tile of R rows of x in the order of every format (pairs 0) or of the formats with one scale
 * per 32 (pairs 1: the offsets per 16 of a panel's Q2_K rows are none of theirs). */
#define PANEL_TILE(R, PAIRS, ACC) \
    if (PAIRS && (P->offsets & 1)) PANEL_CALL(R, 1, PAIRS, ACC) \
    else if (PAIRS) PANEL_CALL(R, 0, PAIRS, ACC) \
    else if (P->offsets & 2) PANEL_CALL(R, 3, PAIRS, ACC) \
    else if (P->offsets) PANEL_CALL(R, 1, PAIRS, ACC) \
    else PANEL_CALL(R, 0, PAIRS, ACC)

#define PANEL_CASE(R, PAIRS) case R: PANEL_TILE(R, PAIRS, acc) break;

/* The tiles of every form: AVX-512 keeps the pairs' forms inlined into panel_times_x and the
 * others in a function of their own (GCC's memory with all of them inlined was 480 MB, 273 MB
 * before the pairs: a first start's peak holds the compiler; the pairs' forms in a function of
 * their own ran 3-5 % slower at 128 rows of x, the others did not). Elsewhere all inlined, as
 * before the pairs (as a function, the AVX2 variant's prefill was slower). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PLAIN_ATTR __attribute__((noinline))
#else
#define PLAIN_ATTR inline __attribute__((always_inline))
#endif
#define PANEL_TILES(NAME, PAIRS, ATTR) \
    static ATTR void NAME(const panel *P, const xprep *p, int64_t m0, int R, int wide, \
                          acc_t *acc) { \
        (void)wide; \
        switch (R) { \
            PANEL_CASE(1, PAIRS) \
            PANEL_CASE(2, PAIRS) \
            PANEL_CASE(3, PAIRS) \
            PANEL_CASE(4, PAIRS) \
        } \
    }
PANEL_TILES(plain_tiles, 0, PLAIN_ATTR)
#if defined(__AVX512F__) && defined(__AVX512BW__)
PANEL_TILES(pairs_tiles, 1, inline __attribute__((always_inline)))
#endif

/* dst[l] = fp32_to_bf16(v[l]) for the LANES values of a tile row, in vectors: the same bits. */
static inline void bf16_lanes(const float *v, uint16_t *dst) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(v)), high = _mm512_srli_epi32(b, 16);
    const __m512i up = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(high, _mm512_set1_epi32(1)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    const __m512i r = _mm512_mask_mov_epi32(_mm512_srli_epi32(_mm512_add_epi32(b, up), 16), nan,
                                            _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(r));
#elif defined(__AVX2__)
    const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(v)), high = _mm256_srli_epi32(b, 16);
    const __m256i up = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(high, _mm256_set1_epi32(1)));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));  /* both >= 0 */
    const __m256i r = _mm256_blendv_epi8(_mm256_srli_epi32(_mm256_add_epi32(b, up), 16),
                                         _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  /* r <= 0xFFFF */
    _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(packed));
#else
    for (int l = 0; l < LANES; l++) dst[l] = fp32_to_bf16(v[l]);
#endif
}

/* Rows m0 .. m0 + R - 1 of out[:, n0 .. n0 + count - 1] from acc (but lanes set in floats). */
static void store_tile(const acc_t *acc, int64_t m0, int R, unsigned floats, void *out,
                       int64_t ldo, int out_bf16, int64_t n0, int count) {
    for (int r = 0; r < R; r++) {
        float res[LANES];
        acc_store(acc[r], res);
        const int64_t m = m0 + r;
        if (count == LANES && !floats) {  /* a whole tile row: copied, or converted in vectors */
            if (!out_bf16) {
                memcpy((float *)out + m * ldo + n0, res, sizeof res);
            } else {
                bf16_lanes(res, (uint16_t *)out + m * ldo + n0);
            }
            continue;
        }
        for (int l = 0; l < count; l++)
            if (!(floats >> l & 1)) store_out(out, out_bf16, m * ldo + n0 + l, res[l]);
    }
}

/* out[:, n0 .. n0 + count - 1] for every row of x, from the panel (but its float rows);
 * rowform: the panel's codes are row-major and M <= ROW_M. */
static void panel_times_x(const panel *P, const xprep *p, int64_t M, void *out, int64_t ldo,
                          int out_bf16, int64_t n0, int count, int rowform) {
    const int wide = PANEL_WIDE(P), pairs = pair_mode(P);
    for (int64_t m0 = 0; m0 < M; m0 += MTILE) {
        acc_t acc[MTILE];
        const int R = M - m0 < MTILE ? (int)(M - m0) : MTILE;
#if defined(ROW_FORM)
        if (rowform) {
            if (P->offsets & 2) { if (R == 1) rowform_tile(P, p, m0, 1, 3, acc); else rowform_tile(P, p, m0, 2, 3, acc); }
            else if (P->offsets) { if (R == 1) rowform_tile(P, p, m0, 1, 1, acc); else rowform_tile(P, p, m0, 2, 1, acc); }
            else { if (R == 1) rowform_tile(P, p, m0, 1, 0, acc); else rowform_tile(P, p, m0, 2, 0, acc); }
        } else
#else
        (void)rowform;
#endif
        {
#if defined(__AVX512F__) && defined(__AVX512BW__)
            if (pairs != 1) plain_tiles(P, p, m0, R, wide, acc);
            if (pairs) {
                acc_t both[MTILE];
                pairs_tiles(P, p, m0, R, wide, pairs == 1 ? acc : both);
                if (pairs == 2) blend_pairs(acc, both, R, P->pairs);
            }
#else
            plain_tiles(P, p, m0, R, wide, acc);
#endif
        }
        store_tile(acc, m0, R, P->floats, out, ldo, out_bf16, n0, count);
    }
}

#if defined(ROW_DIRECT)
/* The rows n0 .. n0 + count - 1 where they are rows of one segment in a format that
 * rowdirect_tile reads and K is a multiple of 128: their addresses (absent lanes repeat the
 * first row) and the format; else -1. *seg, *first: the segment cursor (as in the driver). */
static int direct_rows(const heron_gguf_segment *segs, int64_t *seg, int64_t *first, int64_t n0,
                       int count, int64_t K, const uint8_t *rows[LANES]) {
    const heron_gguf_segment *s = K % 128 ? NULL : block_rows(segs, seg, first, n0, count, rows);
    return s ? (int)s->type : -1;
}

/* The row form's prefetch distance in bytes for a panel from row `row` of segment s: 0 where
 * the rows are not in file order or the distance runs past the segment's end. */
static inline int64_t direct_ahead(const heron_gguf_segment *s, int64_t row) {
    const int64_t end = (row + LANES) * s->row_bytes + DIRECT_AHEAD;
    return s->row_ids || end > s->rows * s->row_bytes ? 0 : DIRECT_AHEAD;
}

#define DIRECT_CASE(T) case T: \
    if (M == 1) rowdirect_tile(T, rows, ahead, p, 0, 1, acc); \
    else rowdirect_tile(T, rows, ahead, p, 0, 2, acc); \
    break;

/* out[:, n0 .. n0 + count - 1] for M <= ROW_M rows of x from the rows' blocks of format type. */
static void direct_times_x(int type, const uint8_t *const rows[LANES], int64_t ahead,
                           const xprep *p, int64_t M, void *out, int64_t ldo, int out_bf16,
                           int64_t n0, int count) {
    acc_t acc[ROW_M];
    switch (type) {
        DIRECT_CASE(GGML_Q4_0) DIRECT_CASE(GGML_Q5_0) DIRECT_CASE(GGML_Q8_0)
        default: return;
    }
    store_tile(acc, 0, (int)M, 0, out, ldo, out_bf16, n0, count);
}
#endif

#if defined(ROW_PATH)
/* row_tile's offsets: 1 per 32, 2 per 16 */
#define OFFSETS(T) ((T) == GGML_Q2_K ? 2 : (T) == -1 || (T) == GGML_Q4_K || (T) == GGML_Q5_K || \
                    (T) == GGML_Q4_1 || (T) == GGML_Q5_1)
/* row_tile's pairs: the format (T, or the segment's `type` for a decoded row) has a scale per 32 */
#define PAIRS(T) (gguf_scale_elems((T) < 0 ? type : (T)) == 32)
#define ROW_CASE(T, R) case R: row_tile(T, rows, 1, w, p, 0, R, OFFSETS(T), PAIRS(T), res); break;
#define ROW_TYPE(T) switch ((int)M) { ROW_CASE(T, 1) ROW_CASE(T, 2) }

/* out[:, n] for M <= ROW_M rows of x from row `index` of a quantized segment (int8 mode);
 * w: a buffer for the decoded row. */
static void row_int8_times_x(const heron_gguf_segment *seg, int64_t index, int64_t K, rowbuf *w,
                             const xprep *p, int64_t M, void *out, int64_t ldo, int out_bf16,
                             int64_t n) {
    const int type = (int)seg->type, offsets = gguf_has_offsets(type);
    const uint8_t *rows[1] = {seg->data + (seg->row_ids ? seg->row_ids[index] : index) * seg->row_bytes};
    float res[ROW_M] = {0};
    if (K % 128 == 0 && type == GGML_Q4_0) { ROW_TYPE(GGML_Q4_0) }
    else if (K % 128 == 0 && type == GGML_Q5_0) { ROW_TYPE(GGML_Q5_0) }
    else if (K % 128 == 0 && type == GGML_Q8_0) { ROW_TYPE(GGML_Q8_0) }
    else if (K % 128 == 0 && type == GGML_IQ4_NL) { ROW_TYPE(GGML_IQ4_NL) }
    else if (K % 128 == 0 && type == GGML_Q4_1) { ROW_TYPE(GGML_Q4_1) }
    else if (K % 128 == 0 && type == GGML_Q5_1) { ROW_TYPE(GGML_Q5_1) }
    else if (type == GGML_Q4_K) { ROW_TYPE(GGML_Q4_K) }  /* K: a multiple of 256 */
    else if (type == GGML_Q6_K) { ROW_TYPE(GGML_Q6_K) }
    else if (type == GGML_IQ4_XS) { ROW_TYPE(GGML_IQ4_XS) }
    else if (type == GGML_Q3_K) { ROW_TYPE(GGML_Q3_K) }
    else if (type == GGML_Q2_K) { ROW_TYPE(GGML_Q2_K) }
    else if (type == GGML_Q5_K) { ROW_TYPE(GGML_Q5_K) }
    else {
        decode_row(type, rows[0], K, w->c, w->a, w->b);
        if (offsets) { ROW_TYPE(-1) }
        else { ROW_TYPE(-2) }
    }
    for (int64_t m = 0; m < M; m++) store_out(out, out_bf16, m * ldo + n, res[m]);
}

#define WAYS_CASE(T) row_tile(T, rows, WAYS, NULL, p, 0, 1, OFFSETS(T), PAIRS(T), res); break

/* out[0, n + i H] (i < WAYS) for one row of x from rows index + i H of a segment (Q4_0, Q5_0,
 * Q8_0, IQ4_NL, Q4_1, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS; not permuted): WAYS sequential streams through the file, each followed by
 * the hardware's prefetch (rows index and index + 1 together, interleaved by 128 elements, ran
 * at a third of the speed from DRAM: the second model's LM head 5.5 -> 16.5 ms). Four rows
 * rather than two, one thread: the default model's Q8_0 LM head 7.1-7.2 -> 6.4 ms. Returns 0
 * (nothing done) where it does not apply. */
static int row_int8_ways(const heron_gguf_segment *seg, int64_t index, int64_t H, int64_t K,
                         const xprep *p, void *out, int out_bf16, int64_t n) {
    const int type = (int)seg->type;
    const int blocks256 = type == GGML_Q4_K || type == GGML_Q6_K || type == GGML_IQ4_XS || type == GGML_Q3_K ||
                          type == GGML_Q2_K || type == GGML_Q5_K;
    const int signed_codes = type == GGML_Q8_0 || type == GGML_IQ4_NL || type == GGML_IQ4_XS;
    if ((zero_shift(type) < 0 && !signed_codes) || seg->row_ids || (K % 128 && !blocks256))
        return 0;
    const uint8_t *rows[WAYS];
    for (int i = 0; i < WAYS; i++) rows[i] = seg->data + (index + i * H) * seg->row_bytes;
    float res[WAYS * ROW_M] = {0};
    switch (type) {
        case GGML_Q4_0: WAYS_CASE(GGML_Q4_0);
        case GGML_Q5_0: WAYS_CASE(GGML_Q5_0);
        case GGML_Q4_K: WAYS_CASE(GGML_Q4_K);
        case GGML_Q8_0: WAYS_CASE(GGML_Q8_0);
        case GGML_IQ4_NL: WAYS_CASE(GGML_IQ4_NL);
        case GGML_IQ4_XS: WAYS_CASE(GGML_IQ4_XS);
        case GGML_Q3_K: WAYS_CASE(GGML_Q3_K);
        case GGML_Q2_K: WAYS_CASE(GGML_Q2_K);
        case GGML_Q5_K: WAYS_CASE(GGML_Q5_K);
        case GGML_Q4_1: WAYS_CASE(GGML_Q4_1);
        case GGML_Q5_1: WAYS_CASE(GGML_Q5_1);
        default: WAYS_CASE(GGML_Q6_K);
    }
    for (int i = 0; i < WAYS; i++) store_out(out, out_bf16, n + i * H, res[i * ROW_M]);
    return 1;
}
#endif

/* ------------------------------------------------------------------------- driver */

#define TILE_CASE(R) case R: \
    if (float_rows) dot_f32_tile(w->wf, p->xf + m0 * p->K64, p->K64, R, res); \
    else dot_exact_tile(w, offsets, p->xf + m0 * p->K64, p->K64, R, res); \
    break;

/* out[:, n] for every row of x, from W's row decoded into w (exact mode, float rows). */
static void row_times_x(const rowbuf *w, const xprep *p, int64_t M, int float_rows,
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
        w->wf[k] = offsets ? product + w->b[k >> b_shift(offsets)] : product;
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
    if (values) expand_row(w, K, gguf_offset_elems(type));
}

static int rowbuf_alloc(rowbuf *w, int64_t K64) {
    w->c = calloc((size_t)K64, 1);
    w->a = calloc((size_t)(K64 / 16), sizeof(float));
    w->b = calloc((size_t)(K64 / 16), sizeof(float));  /* per 32, or per 16 (Q2_K) */
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

/* The exact mode, and the int8 mode for a few rows of x where the variant has a row path:
 * each thread takes ranges of W's rows, one decoded row at a time.
 *
 * Rows (and panels, below) are handed out `guided`: ranges of half, a quarter, ... of what is
 * left, so a thread the OS takes off its core (the server's API process and its clients share
 * the cores with the engine) delays the call by its last small range, not by a static half.
 * Served on 2 cores with `heron bench peers` (OMP_SCHEDULE=static against guided, one build,
 * interleaved), medians of 5: c=1 68.3 -> 75.1 tok/s, c=16 280.2 -> 285.6 (an earlier run of 3:
 * 70.1 -> 70.4, 243.5 -> 302.7). Ranges are taken in increasing order, so each thread's segment
 * cursor still only moves forward.
 *
 * What is handed out are groups of rows r + i h of a segment (i < WAYS, h: its rows / WAYS
 * rounded up), which one row of x multiplies together (row_int8_ways). Groups within each
 * segment, not across the stacked weight, so a fused q/k/v groups all its rows: the default
 * model's decode step (in process, batch 1, alternating) spent 4.0-4.1 ms in its layers with
 * rows i and N / 2 + i paired (unpaired where they were in two segments), 3.8-3.9 ms so. */
static int matmul_rows(const xprep *p, int64_t M, int64_t K, const heron_gguf_segment *segs,
                       int64_t nsegs, void *out, int64_t ldo, int out_bf16, int exact) {
    int64_t groups = 0;  /* segment s's rows r + i h, h = its rows / WAYS rounded up */
    for (int64_t s = 0; s < nsegs; s++) groups += (segs[s].rows + WAYS - 1) / WAYS;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        rowbuf w;
        if (!rowbuf_alloc(&w, p->K64)) failed = 1;
        /* the segment of the last group seen, its first group and its first row */
        int64_t seg = 0, first_group = 0, first = 0;
#pragma omp for schedule(guided)
        for (int64_t j = 0; j < groups; j++) {
            if (failed) continue;
            while (j < first_group) --seg, first_group -= (segs[seg].rows + WAYS - 1) / WAYS, first -= segs[seg].rows;
            while (j >= first_group + (segs[seg].rows + WAYS - 1) / WAYS)
                first_group += (segs[seg].rows + WAYS - 1) / WAYS, first += segs[seg].rows, seg++;
            const heron_gguf_segment *s = &segs[seg];
            const int64_t h = (s->rows + WAYS - 1) / WAYS, r = j - first_group;
            const int type = (int)s->type, float_rows = gguf_float_bytes(type) != 0;
#if defined(ROW_PATH)
            /* one row of x: the group at once */
            if (!exact && M == 1 && r + (WAYS - 1) * h < s->rows && row_int8_ways(s, r, h, K, p, out, out_bf16, first + r))
                continue;
#endif
            for (int64_t at = r; at < s->rows; at += h) {
                const int64_t n = first + at;
#if !defined(ROW_PATH)
                (void)exact;
#else
                if (!exact && !float_rows) {
                    if (ROW_PREFETCH && M > 1) prefetch_row(s, at + ROW_PREFETCH);
                    row_int8_times_x(s, at, K, &w, p, M, out, ldo, out_bf16, n);
                    continue;
                }
#endif
                decode_into(s, at, K, 0, &w);
                row_times_x(&w, p, M, float_rows, gguf_offset_elems(type), out, ldo, out_bf16, n);
            }
        }
        rowbuf_free(&w);
    }
    return failed;
}

/* Rows m0 .. of x as an xprep of their own (the same buffers). */
static xprep xprep_rows(const xprep *p, int64_t m0) {
    xprep q = *p;
    const int64_t K64 = p->K64;
    if (q.xf) q.xf += m0 * K64;
    if (q.xu) q.xu += m0 * K64, q.xs += m0 * K64, q.s8 += m0 * (K64 / XGROUP), q.sum32 += m0 * (K64 / 32);
    if (q.sum16) q.sum16 += m0 * (K64 / 16);
    if (q.x16) q.x16 += m0 * K64, q.s4 += m0 * (K64 / 2);
    if (q.q4) q.q4 += m0 * (K64 / 4);
    return q;
}

/*
 * Rows of x per pass over W's panels (prefill): a pass's codes of x (K64 bytes a row) stay in
 * L2 while every panel is multiplied with them, and each pass decodes the panels again. One
 * pass over 2048 rows of a 4864-wide x (10 MB of codes) ran from L3 and DRAM. One thread, the
 * second model's ffn_down at M = 2048: 114 ms in one pass, 91-100 ms in passes of 0.5-2 MB
 * (138 ms before prepare_x stopped writing a float32 copy of x); its 16 x 128-token prefill,
 * 2 threads: 5.0 -> 4.0-4.4 s. 512 KB: half of Zen 4's and Cascade Lake's L2, L3-resident
 * where L2 is smaller. One pass where M is under 1.5 passes' rows.
 */
#define X_PASS_BYTES (512 * 1024)

static int64_t x_pass_rows(int64_t K64, int64_t M) {
    int64_t rows = X_PASS_BYTES / K64 / MTILE * MTILE;
    if (rows < 4 * MTILE) rows = 4 * MTILE;
    return M < rows + rows / 2 ? M : rows;
}

/* The int8 mode: each thread takes ranges of panels (guided, see matmul_rows); a panel's float
 * rows are multiplied in float32, one row at a time. */
static int matmul_int8(const xprep *p, int64_t M, int64_t K, const heron_gguf_segment *segs,
                       int64_t nsegs, int64_t N, void *out, int64_t ldo, int out_bf16) {
    (void)nsegs;  /* the row path's */
#if defined(ROW_PATH)
    if (M <= ROW_M) return matmul_rows(p, M, K, segs, nsegs, out, ldo, out_bf16, 0);
#endif
#if defined(ROW_FORM)
    const int rowform = M <= ROW_M;
#else
    const int rowform = 0;
#endif
    const int64_t panels = (N + LANES - 1) / LANES;
    const int64_t block = rowform ? M : x_pass_rows(p->K64, M);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        panel P;
        rowbuf w;
        if (!panel_alloc(&P, p->K64) || !rowbuf_alloc(&w, p->K64)) failed = 1;
        int64_t seg = 0, first = 0;
        for (int64_t m0 = 0; m0 < M; m0 += block) {
            const xprep q = xprep_rows(p, m0);
            const int64_t rows = M - m0 < block ? M - m0 : block;
            char *o = (char *)out + (size_t)(m0 * ldo) * (out_bf16 ? 2 : 4);
#pragma omp for schedule(guided)
            for (int64_t i = 0; i < panels; i++) {
                if (failed) continue;
                const int64_t n0 = i * LANES;
                const int count = N - n0 < LANES ? (int)(N - n0) : LANES;
#if defined(ROW_DIRECT)
                const uint8_t *rows_w[LANES];
                const int type = rowform ? direct_rows(segs, &seg, &first, n0, count, K, rows_w) : -1;
                if (type >= 0) {
                    direct_times_x(type, rows_w, direct_ahead(&segs[seg], n0 - first), &q, rows, o,
                                   ldo, out_bf16, n0, count);
                    continue;
                }
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
                if (!panel_decode_blocks(segs, &seg, &first, n0, count, K, M, &P))
#elif defined(__AVX2__)
                if (rowform || !panel_decode_blocks(segs, &seg, &first, n0, count, K, M, &P))
#endif
                panel_decode(segs, &seg, &first, n0, count, K, M, !rowform, &P);
                panel_times_x(&P, &q, rows, o, ldo, out_bf16, n0, count, rowform);
                for (int l = 0; l < count; l++) {
                    if (!(P.floats >> l & 1)) continue;
                    const int64_t n = n0 + l;
                    while (n < first) first -= segs[--seg].rows;
                    while (n >= first + segs[seg].rows) first += segs[seg++].rows;
                    decode_into(&segs[seg], n - first, K, 0, &w);
                    row_times_x(&w, &q, rows, 1, 0, o, ldo, out_bf16, n);
                }
            }
        }
        panel_free(&P);
        rowbuf_free(&w);
    }
    return failed;
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
    int floats = 0, per16 = 0;
    for (int64_t s = 0; s < nsegs; s++) {
        floats |= gguf_float_bytes((int)segs[s].type) != 0;
        per16 |= gguf_offset_elems((int)segs[s].type) == 16;
    }
    xprep p = {0};
    if (prepare_x(x, ldx, x_bf16, M, K, exact, floats, per16, &p)) {
        free_x(&p);
        return -2;
    }
    int64_t N = 0;
    for (int64_t s = 0; s < nsegs; s++) N += segs[s].rows;
    const int failed = exact ? matmul_rows(&p, M, K, segs, nsegs, out, ldo, out_bf16, 1)
                             : matmul_int8(&p, M, K, segs, nsegs, N, out, ldo, out_bf16);
    free_x(&p);
    return failed ? -2 : 0;
}

/* heron_gguf_matmul `calls` times in a row, *seconds the time they took together: the
 * microbenchmark (heron/bench/gguf_matmul.py) times here, where a call of one row of x takes
 * tens of microseconds and the Python around each call would be a quarter of it. */
int heron_gguf_matmul_loop(const void *x, int64_t ldx, int x_bf16, int64_t M, int64_t K,
                           const heron_gguf_segment *segs, int64_t nsegs, void *out, int64_t ldo,
                           int out_bf16, int exact, int64_t calls, double *seconds) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < calls; i++) {
        const int status = heron_gguf_matmul(x, ldx, x_bf16, M, K, segs, nsegs, out, ldo, out_bf16, exact);
        if (status) return status;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return 0;
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
