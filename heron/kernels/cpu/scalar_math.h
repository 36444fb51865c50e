/*
 * The helpers of vector_math.h one float at a time, for the kernels' portable code (built for
 * the avx2 and portable variants): plain C that the compiler vectorizes for its target. The
 * same formulas and constants, so every variant rounds where the AVX-512 code rounds.
 */
#ifndef HERON_SCALAR_MATH_H
#define HERON_SCALAR_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_bits_to_fp32(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest even; NaN becomes the quiet NaN 0x7FC0 (as vector_math.h without BF16). */
static inline uint16_t fp32_to_bf16_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;  /* a select, not a branch: loops vectorize */
}

static inline float round_bf16(float f) {  /* what storing to bf16 and reading back gives */
    return bf16_bits_to_fp32(fp32_to_bf16_bits(f));
}

/* e^x, x clamped to [-87, 88] (NaN: -87, as fmaxf): 2^n * p(r), r in [-ln2/2, ln2/2] (Cephes'
 * polynomial), ~2 ulp. Plain arithmetic only (no nearbyintf or ldexpf calls), so that loops
 * calling it vectorize: n is rounded to nearest by the 1.5 * 2^23 trick and 2^n built from its
 * exponent bits (n in [-126, 127]: a normal float, so p * 2^n rounds as ldexpf does). */
static inline float exp_scalar(float x) {
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + (r + 1.0f);
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#endif
