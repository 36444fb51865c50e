/*
 * The functions of elementwise.c in plain C, for the variants without AVX-512 (avx2, portable):
 * the same roundings to bf16 at the same steps, loops the compiler vectorizes for its target.
 * Included by elementwise.c; see there for what each function computes.
 */
#include "scalar_math.h"

#define LANES 16  /* partial sums kept per lane, as the AVX-512 code keeps them */

static inline float inv_rms(const float *buf, int64_t dim, float eps) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= dim; i += LANES)  /* the same lanes as one loop over i, vectorized */
        for (int j = 0; j < LANES; j++) acc[j] += buf[i + j] * buf[i + j];
    for (; i < dim; i++) acc[i % LANES] += buf[i] * buf[i];
    float total = 0.0f;
    for (int j = 0; j < LANES; j++) total += acc[j];
    return 1.0f / sqrtf(total / (float)dim + eps);
}

static inline void scale_row(float *buf, int64_t dim, float r, const float *scale,
                             int unit_offset) {
    if (unit_offset)
        for (int64_t i = 0; i < dim; i++) buf[i] = round_bf16((buf[i] * r) * scale[i]);
    else
        for (int64_t i = 0; i < dim; i++) buf[i] = round_bf16(round_bf16(buf[i] * r) * scale[i]);
}

static inline void load_row(float *buf, const uint16_t *src, int64_t dim) {
    for (int64_t i = 0; i < dim; i++) buf[i] = bf16_bits_to_fp32(src[i]);
}

static inline void store_row(uint16_t *dst, const float *buf, int64_t dim) {
    for (int64_t i = 0; i < dim; i++) dst[i] = fp32_to_bf16_bits(buf[i]);
}

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
            for (int64_t i = 0; i < dim; i++) xs[i] = round_bf16(xs[i] + hs[i]);
            store_row(x_out + t * dim, xs, dim);
        }
        scale_row(xs, dim, inv_rms(xs, dim, eps), pre_scale, unit_offset);
        store_row(y_out + t * dim, xs, dim);
    }
    return 0;
}

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
        for (int64_t i = 0; i < half; i++) {
            const float c = bf16_bits_to_fp32(cos[t * half + i]), s = bf16_bits_to_fp32(sin[t * half + i]);
            const float x1 = n[i], x2 = n[half + i];
            o[i] = fp32_to_bf16_bits(round_bf16(x1 * c) - round_bf16(x2 * s));
            o[half + i] = fp32_to_bf16_bits(round_bf16(x2 * c) + round_bf16(x1 * s));
        }
    }
    return 0;
}

static inline float activation(float g, int act) {
    if (act == 0) {  /* GELU, tanh approximation, as elementwise.c computes it */
        const float g3 = (g * g) * g;
        const float u2 = (g3 * 0.044715f + g) * -1.5957691216057308f;  /* -2 u */
        const float t = 2.0f / (1.0f + exp_scalar(u2)) - 1.0f;
        return (0.5f * g) * (1.0f + t);
    }
    return g / (1.0f + exp_scalar(0.0f - g));  /* SiLU */
}

int heron_act_and_mul(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t d, int act,
                      uint16_t *out) {
    if (act != 0 && act != 1) return -1;
#pragma omp parallel for schedule(static) if (rows * d >= 16384)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *gate = x + t * x_stride, *up = gate + d;
        if (act == 0) {  /* one loop per activation: no branch inside, so each vectorizes */
            for (int64_t i = 0; i < d; i++) {
                const float a = round_bf16(activation(bf16_bits_to_fp32(gate[i]), 0));
                out[t * d + i] = fp32_to_bf16_bits(a * bf16_bits_to_fp32(up[i]));
            }
        } else {
            for (int64_t i = 0; i < d; i++) {
                const float a = round_bf16(activation(bf16_bits_to_fp32(gate[i]), 1));
                out[t * d + i] = fp32_to_bf16_bits(a * bf16_bits_to_fp32(up[i]));
            }
        }
    }
    return 0;
}

#if defined(__AVX2__)
#include <immintrin.h>

/* argmax_row's answer in two vector passes (the scalar loop's early exit on NaN keeps the
 * compiler from vectorizing it): the maximum and whether a NaN is there, then where the first
 * NaN or the first maximum is. */
static int64_t argmax_row_avx2(const float *row, int64_t cols) {
    __m256 vmax = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, v);
    }
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, vmax);
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    int any_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t k = i; k < cols; k++) {
        any_nan |= row[k] != row[k];
        best = row[k] > best ? row[k] : best;
    }
    const __m256 target = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= cols; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        const int hit = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                                   : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
    for (; i < cols; i++)
        if (any_nan ? row[i] != row[i] : row[i] == best) return i;
    return 0;
}
#endif

/* The first index of the row's maximum (the first NaN where there is one). */
static int64_t argmax_row(const float *row, int64_t cols) {
#if defined(__AVX2__)
    return argmax_row_avx2(row, cols);
#else
    float best = -INFINITY;
    for (int64_t i = 0; i < cols; i++) {
        if (row[i] != row[i]) return i;
        best = row[i] > best ? row[i] : best;
    }
    for (int64_t i = 0; i < cols; i++)
        if (row[i] == best) return i;
    return 0;
#endif
}

int heron_argmax_rows(const float *x, int64_t stride, int64_t rows, int64_t cols, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, cols);
    return 0;
}

#define SAMPLE_BLOCK 512
#define SAMPLE_MAX_BLOCKS 4096

static inline float sample_weight(float x, float t, float max) {
    return x == -INFINITY ? 0.0f : exp_scalar(x / t - max);
}

static int64_t first_above(const double *w, int64_t n, double target) {
    double total = 0.0, running = 0.0;
    for (int64_t i = 0; i < n; i++) total += w[i];
    for (int64_t i = 0; i < n; i++) {
        running += w[i];
        if (running > target || running >= total) return i;
    }
    return n - 1;
}

/* Block masses of SAMPLE_BLOCK tokens, summed in float over LANES partial sums. */
static float block_mass(const float *row, int64_t start, int64_t end, float t, float max) {
    float acc[LANES] = {0};
    int64_t i = start;
    for (; i + LANES <= end; i += LANES)  /* the same lanes as one loop over i, vectorized */
        for (int j = 0; j < LANES; j++) acc[j] += sample_weight(row[i + j], t, max);
    for (; i < end; i++) acc[(i - start) % LANES] += sample_weight(row[i], t, max);
    float total = 0.0f;
    for (int j = 0; j < LANES; j++) total += acc[j];
    return total;
}

int heron_sample_rows(const float *x, int64_t stride, int64_t rows, int64_t cols,
                      const float *temperature, const double *uniforms, int64_t *out) {
    const int64_t blocks = (cols + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    if (blocks > SAMPLE_MAX_BLOCKS) return -1;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        const float t = temperature[r];
        float max = -INFINITY;
        int nan = 0;
        for (int64_t i = 0; i < cols; i++) {
            const float v = row[i] / t;
            nan |= v != v;
            max = v > max ? v : max;
        }
        if (nan || max == -INFINITY) {
            out[r] = argmax_row(row, cols);
            continue;
        }
        double mass[SAMPLE_MAX_BLOCKS], inner[SAMPLE_BLOCK];
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t end = (b + 1) * SAMPLE_BLOCK < cols ? (b + 1) * SAMPLE_BLOCK : cols;
            mass[b] = block_mass(row, b * SAMPLE_BLOCK, end, t, max);
        }
        double total = 0.0;
        for (int64_t b = 0; b < blocks; b++) total += mass[b];
        const double target = uniforms[r] * total;
        const int64_t b = first_above(mass, blocks, target);
        double before = 0.0;
        for (int64_t i = 0; i < b; i++) before += mass[i];
        const double fraction = (target - before) / mass[b];
        const int64_t start = b * SAMPLE_BLOCK, n = cols - start < SAMPLE_BLOCK ? cols - start : SAMPLE_BLOCK;
        double inner_total = 0.0;
        for (int64_t i = 0; i < n; i++) {
            inner[i] = sample_weight(row[start + i], t, max);
            inner_total += inner[i];
        }
        out[r] = start + first_above(inner, n, fraction * inner_total);
    }
    return 0;
}
