/*
 * The small per-layer ops of a decoder as single calls, and the sampler's argmax (AVX-512; the
 * other variants compile elementwise_portable.h), built on first use by
 * heron/kernels/cpu/__init__.py and called through ctypes. In PyTorch each of them is
 * 5 to 10 operator calls, and at decode batch sizes the calls, not the arithmetic, are the cost.
 *
 * Every function rounds to bf16 where the PyTorch code it replaces does (heron/layers/norm.py,
 * rotary.py, activation.py), so the two paths agree to the last bit but for the order of the
 * fp32 sums. Rows are split across PyTorch's OpenMP threads when there are enough of them.
 */
#include <math.h>

#include "kernels.h"

#define PARALLEL_MIN_ROWS 8

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#include "elementwise_portable.h"
#else
#include "vector_math.h"

/* 1 / rms of an fp32 row held in buf (dim values). */
static inline float inv_rms(const float *buf, int64_t dim, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(tail_mask(dim - i), buf + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps);
}

/* A row times r, then times scale, from and to fp32 buffers:
 *   unit_offset (Gemma, scale = 1 + w):  bf16(row * r * scale)
 *   else        (Llama, scale = w):      bf16(bf16(row * r) * scale) */
static inline void scale_row(float *buf, int64_t dim, float r, const float *scale,
                             int unit_offset) {
    __m512 vr = _mm512_set1_ps(r);
    for (int64_t i = 0; i < dim; i += 16) {
        __mmask16 m = tail_mask(dim - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, buf + i), vr);
        if (!unit_offset) v = round_to_bf16(v);
        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + i));
        _mm512_mask_storeu_ps(buf + i, m, round_to_bf16(v));
    }
}

static inline void load_row(float *buf, const uint16_t *src, int64_t dim) {
    for (int64_t i = 0; i < dim; i += 16) {
        __mmask16 m = tail_mask(dim - i);
        _mm512_mask_storeu_ps(buf + i, m, load_bf16_masked(src + i, m));
    }
}

static inline void store_row(uint16_t *dst, const float *buf, int64_t dim) {
    for (int64_t i = 0; i < dim; i += 16) {
        __mmask16 m = tail_mask(dim - i);
        store_bf16_masked(dst + i, _mm512_maskz_loadu_ps(m, buf + i), m);
    }
}

/*
 * The step between two sublayers, per row: add the sublayer's output h to the residual stream
 * x (normalised first where there is a post norm: Gemma's sandwich), then normalise the sum:
 *   x_out = bf16(x + norm(h) * post_scale)     (post_scale NULL: bf16(x + h); h NULL: x)
 *   y_out = norm(x_out) * pre_scale
 * with norm(v) * scale rounded as scale_row says for unit_offset. Scales are fp32 [dim];
 * rows have strides in elements; x_out is written only where h is given.
 */
int heron_add_rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *h, int64_t h_stride,
                       int64_t rows, int64_t dim, const float *post_scale,
                       const float *pre_scale, float eps, int unit_offset, uint16_t *x_out,
                       uint16_t *y_out) {
    if (dim > 16384) return -1;
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int64_t t = 0; t < rows; t++) {
        float xs[16384], hs[16384];
        load_row(xs, x + t * x_stride, dim);
        if (h) {
            load_row(hs, h + t * h_stride, dim);
            if (post_scale) scale_row(hs, dim, inv_rms(hs, dim, eps), post_scale, unit_offset);
            for (int64_t i = 0; i < dim; i += 16) {
                __mmask16 m = tail_mask(dim - i);
                __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, xs + i), _mm512_maskz_loadu_ps(m, hs + i));
                _mm512_mask_storeu_ps(xs + i, m, round_to_bf16(sum));
            }
            store_row(x_out + t * dim, xs, dim);
        }
        scale_row(xs, dim, inv_rms(xs, dim, eps), pre_scale, unit_offset);
        store_row(y_out + t * dim, xs, dim);
    }
    return 0;
}

/*
 * Per-head RMS norm then rotary embedding ("rotate half", all of the head rotated):
 *   n = norm(v) * scale[head]     (rounded as scale_row says; scale NULL: n = v, no norm)
 *   out = [bf16(bf16(n1 cos) - bf16(n2 sin)) | bf16(bf16(n2 cos) + bf16(n1 sin))]
 * qk [tokens, heads, dim] with token stride qk_stride; scale fp32 [heads, dim];
 * cos, sin bf16 [tokens, dim / 2]; out contiguous [tokens, heads, dim].
 */
int heron_qk_norm_rope(const uint16_t *qk, int64_t qk_stride, int64_t tokens, int64_t heads,
                       int64_t dim, const float *scale, float eps, int unit_offset,
                       const uint16_t *cos, const uint16_t *sin, uint16_t *out) {
    if (dim > 1024 || dim % 2) return -1;
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * heads >= PARALLEL_MIN_ROWS * 4)
    for (int64_t task = 0; task < tokens * heads; task++) {
        const int64_t t = task / heads, hd = task % heads;
        float n[1024];
        load_row(n, qk + t * qk_stride + hd * dim, dim);
        if (scale) scale_row(n, dim, inv_rms(n, dim, eps), scale + hd * dim, unit_offset);
        uint16_t *o = out + task * dim;
        for (int64_t i = 0; i < half; i += 16) {
            __mmask16 m = tail_mask(half - i);
            __m512 c = load_bf16_masked(cos + t * half + i, m), s = load_bf16_masked(sin + t * half + i, m);
            __m512 x1 = _mm512_maskz_loadu_ps(m, n + i), x2 = _mm512_maskz_loadu_ps(m, n + half + i);
            __m512 lo = _mm512_sub_ps(round_to_bf16(_mm512_mul_ps(x1, c)), round_to_bf16(_mm512_mul_ps(x2, s)));
            __m512 hi = _mm512_add_ps(round_to_bf16(_mm512_mul_ps(x2, c)), round_to_bf16(_mm512_mul_ps(x1, s)));
            store_bf16_masked(o + i, lo, m);
            store_bf16_masked(o + half + i, hi, m);
        }
    }
    return 0;
}

/*
 * Gated MLP core: out = bf16(bf16(act(gate)) * up) for x = [gate | up] ([rows, 2 d], row
 * stride x_stride); act 0 = GELU, tanh approximation; 1 = SiLU. out contiguous [rows, d].
 */
int heron_act_and_mul(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t d, int act,
                      uint16_t *out) {
    if (act != 0 && act != 1) return -1;
#pragma omp parallel for schedule(static) if (rows * d >= 16384)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *gate = x + t * x_stride, *up = gate + d;
        for (int64_t i = 0; i < d; i += 16) {
            __mmask16 m = tail_mask(d - i);
            __m512 g = load_bf16_masked(gate + i, m);
            __m512 a, one = _mm512_set1_ps(1.0f);
            if (act == 0) {  /* 0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3) */
                __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
                __m512 u2 = _mm512_mul_ps(_mm512_fmadd_ps(g3, _mm512_set1_ps(0.044715f), g),
                                          _mm512_set1_ps(-1.5957691216057308f));  /* -2 u */
                /* tanh(u) = 2 / (1 + e^-2u) - 1: exactly -1 far left, so the result is -0 there
                 * as PyTorch's is */
                __m512 t = _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.0f),
                                                       _mm512_add_ps(one, exp_fp32(u2))), one);
                a = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, t));
            } else {  /* g / (1 + e^-g) */
                a = _mm512_div_ps(g, _mm512_add_ps(one, exp_fp32(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            }
            __m512 y = _mm512_mul_ps(round_to_bf16(a), load_bf16_masked(up + i, m));
            store_bf16_masked(out + t * d + i, y, m);
        }
    }
    return 0;
}

/*
 * out[r] = the index of the largest value of row r, as torch.argmax gives it: the first one on
 * ties, the first NaN where the row has one. x fp32 [rows, cols] with row stride `stride`; one
 * pass for the maximum, one to find where it first is (PyTorch's CPU argmax is scalar code:
 * 9 ms for 16 rows of Gemma's 262,144 logits, where this takes a fraction of a millisecond).
 */
int heron_argmax_rows(const float *x, int64_t stride, int64_t rows, int64_t cols, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        const __m512 lowest = _mm512_set1_ps(-INFINITY);
        __m512 vmax = lowest;
        __mmask16 nan = 0;
        for (int64_t i = 0; i < cols; i += 16) {
            const __m512 v = _mm512_mask_loadu_ps(lowest, tail_mask(cols - i), row + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            vmax = _mm512_max_ps(vmax, v);
        }
        int64_t best = 0;
        if (nan) {
            while (row[best] == row[best]) best++;
        } else {
            const __m512 target = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
            for (int64_t i = 0; i < cols; i += 16) {
                const __mmask16 m = tail_mask(cols - i);
                const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, row + i), target, _CMP_EQ_OQ);
                if (hit) {
                    best = i + __builtin_ctz(hit);
                    break;
                }
            }
        }
        out[r] = best;
    }
    return 0;
}

#define SAMPLE_BLOCK 512      /* tokens per block of the two-level inverse CDF (sampler.py) */
#define SAMPLE_MAX_BLOCKS 4096

/* e^(x / t - max) for 16 lanes, exactly 0 where x is -inf (a token a filter removed). */
static inline __m512 weight16(const float *x, __mmask16 m, __m512 t, __m512 max) {
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, x);
    const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ) & m;
    return _mm512_maskz_mov_ps(live, exp_fp32(_mm512_sub_ps(_mm512_div_ps(v, t), max)));
}

/* The first index whose running sum of w[0..n) (in double) exceeds target, capped at the first
 * index where the sum reaches its total (so a weight-0 entry is never picked). */
static int64_t first_above(const double *w, int64_t n, double target) {
    double total = 0.0, running = 0.0;
    for (int64_t i = 0; i < n; i++) total += w[i];
    for (int64_t i = 0; i < n; i++) {
        running += w[i];
        if (running > target || running >= total) return i;
    }
    return n - 1;
}

/*
 * One token per row drawn from softmax(x / temperature) with one uniform u in [0, 1) per row,
 * by the two-level inverse CDF of heron/layers/sampler.py (_inverse_cdf): block masses of 512
 * tokens pick a block, then a float64 running sum inside it picks the token; the same picks
 * but for the rounding of the exponentials and sums. x fp32 [rows, cols], row stride `stride`,
 * entries -inf where a filter removed them. A row with a NaN or nothing finite gets its
 * argmax (an index, never a crash). One pass for the maximum, one for the block masses, then
 * one block again: ~0.2 ms for 262,144 logits, against ~1.5 ms of PyTorch operators.
 */
int heron_sample_rows(const float *x, int64_t stride, int64_t rows, int64_t cols,
                      const float *temperature, const double *uniforms, int64_t *out) {
    const int64_t blocks = (cols + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    if (blocks > SAMPLE_MAX_BLOCKS) return -1;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        const __m512 t = _mm512_set1_ps(temperature[r]);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t i = 0; i < cols; i += 16) {
            const __m512 v = _mm512_div_ps(
                _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(cols - i), row + i), t);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            vmax = _mm512_max_ps(vmax, v);
        }
        const float max = _mm512_reduce_max_ps(vmax);
        if (nan || max == -INFINITY) {
            heron_argmax_rows(row, stride, 1, cols, out + r);
            continue;
        }
        double mass[SAMPLE_MAX_BLOCKS], inner[SAMPLE_BLOCK];
        const __m512 vm = _mm512_set1_ps(max);
        for (int64_t b = 0; b < blocks; b++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = b * SAMPLE_BLOCK; i < cols && i < (b + 1) * SAMPLE_BLOCK; i += 16)
                acc = _mm512_add_ps(acc, weight16(row + i, tail_mask(cols - i), t, vm));
            mass[b] = _mm512_reduce_add_ps(acc);
        }
        double total = 0.0;
        for (int64_t b = 0; b < blocks; b++) total += mass[b];
        const double target = uniforms[r] * total;
        const int64_t b = first_above(mass, blocks, target);
        double before = 0.0;
        for (int64_t i = 0; i < b; i++) before += mass[i];
        const double fraction = (target - before) / mass[b];
        const int64_t start = b * SAMPLE_BLOCK, n = cols - start < SAMPLE_BLOCK ? cols - start : SAMPLE_BLOCK;
        float w[16];
        for (int64_t i = 0; i < n; i += 16) {
            _mm512_storeu_ps(w, weight16(row + start + i, tail_mask(n - i), t, vm));
            for (int64_t j = 0; j < 16 && i + j < n; j++) inner[i + j] = w[j];
        }
        double inner_total = 0.0;
        for (int64_t i = 0; i < n; i++) inner_total += inner[i];
        out[r] = start + first_above(inner, n, fraction * inner_total);
    }
    return 0;
}

#endif  /* AVX-512 */
