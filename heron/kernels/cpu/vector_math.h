/*
 * Shared AVX-512 helpers of heron's CPU kernels: bf16 <-> fp32, bf16 dot products and e^x, 16
 * lanes at a time. The kernels need AVX-512 F and BW; where the CPU also has AVX-512 BF16
 * (Cooper Lake, Sapphire Rapids, Zen 4) the two bf16 operations below are single instructions,
 * elsewhere (Skylake-SP, Cascade Lake) they are done with integer shifts and fp32 FMAs, with
 * the same rounding (to nearest even) for the conversion.
 */
#ifndef HERON_VECTOR_MATH_H
#define HERON_VECTOR_MATH_H

#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)

static inline __m512 bf16x16_to_fp32(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

static inline __m512 load_bf16(const uint16_t *p) {  /* 16 bf16 -> 16 fp32 */
    return bf16x16_to_fp32(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512 load_bf16_masked(const uint16_t *p, __mmask16 m) {
    return bf16x16_to_fp32(_mm256_maskz_loadu_epi16(m, p));
}

/* 16 fp32 -> 16 bf16, rounded to nearest even (NaN stays a quiet NaN). */
static inline __m256i fp32_to_bf16x16(__m512 v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
#endif
}

/* acc + the pairwise products of 32 bf16 a and b: acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1]. */
static inline __m512 dot_bf16x32(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                          _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)),
                           _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
#endif
}

static inline void store_bf16_masked(uint16_t *p, __m512 v, __mmask16 m) {  /* round to nearest even */
    _mm256_mask_storeu_epi16(p, m, fp32_to_bf16x16(v));
}

static inline __m512 round_to_bf16(__m512 v) {  /* what storing to bf16 and reading back gives */
    return bf16x16_to_fp32(fp32_to_bf16x16(v));
}

static inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

/* e^x, x clamped to [-87, 88]: 2^n * p(r), r in [-ln2/2, ln2/2] (Cephes' polynomial), ~2 ulp. */
static inline __m512 exp_fp32(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#endif  /* __AVX512F__ && __AVX512BW__ */

#endif
