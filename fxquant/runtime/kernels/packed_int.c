/* fxquant's CPU integer linear: per-token quantizer, integer product and epilogue in one call.
 *
 * y[m, n] = (float)(sum_k c[m, k] w[n, k] - z[m] colsum[n]) * s_x[m] * s_w[n] (+ b[n]), where c are
 * the activation codes of row m (fxquant's per-token quantizer, the arithmetic of
 * fxquant.runtime.kernels.quantize.row_codes in its order) and w the weight codes. Every integer is
 * exact in int32; the float steps round as torch's (no FMA contraction: built with
 * -ffp-contract=off), so the result is bit-identical to torch._int_mm and its epilogue
 * (fxquant.runtime.kernels.integer). Weights live in memory at their bit width:
 *   4-bit: per row, blocks of 64 weights in 32 bytes, byte j = (w[j] + 8) | (w[32 + j] + 8) << 4;
 *   8-bit: per row, the codes + 128 as bytes.
 * Rows are padded to Kp (a multiple of 64) with weight code 0 (activation code 0 there).
 * The product takes the stored unsigned weight u = w + off: sum c w = sum c u - off sum c.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 64

/* The scale a stored in dtype `scale_dtype` (0 float32, 1 bfloat16, 2 float16) reads back as. */
static float stored(float s, int scale_dtype) {
    if (scale_dtype == 1) {
        uint32_t u;
        memcpy(&u, &s, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return s; /* NaN stays NaN */
        u += 0x7fffu + ((u >> 16) & 1u);               /* round to nearest even */
        u &= 0xffff0000u;
        memcpy(&s, &u, 4);
        return s;
    }
#if defined(__FLT16_MAX__)
    if (scale_dtype == 2) return (float)(_Float16)s;
#endif
    return s;
}

/* Per-token codes of row x [K] into c [Kp] (int8; asymmetric codes shifted down by 2^(bits-1)),
 * with the row's scale and shifted zero point (0 when symmetric), and the sum of its codes. */
static void quantize_row(const float *x, int64_t K, int64_t Kp, int bits, int symmetric, float clip,
                         int scale_dtype, int8_t *c, float *scale, int32_t *zero, int32_t *csum) {
    const float eps = 1e-8f;
    float s, lo_code, hi_code, z = 0.0f;
    if (symmetric) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
        const float qmax = (float)((1 << (bits - 1)) - 1);
        s = (amax * clip) / qmax;
        s = stored(s < eps ? eps : s, scale_dtype);
        lo_code = -qmax - 1.0f;
        hi_code = qmax;
    } else {
        float mn = 0.0f, mx = 0.0f; /* clamp_max(0) / clamp_min(0) of the row's min and max */
        for (int64_t k = 0; k < K; k++) {
            mn = fminf(mn, x[k]);
            mx = fmaxf(mx, x[k]);
        }
        const float levels = (float)((1 << bits) - 1);
        const float lo = mn * clip, hi = mx * clip;
        s = (hi - lo) / levels;
        s = stored(s < eps ? eps : s, scale_dtype);
        z = 0.0f - rintf(lo / s);
        z = z < 0.0f ? 0.0f : (z > levels ? levels : z);
        lo_code = 0.0f;
        hi_code = levels;
    }
    const float shift = symmetric ? 0.0f : (float)(1 << (bits - 1));
    int32_t sum = 0;
    for (int64_t k = 0; k < K; k++) {
        float q = rintf(x[k] / s) + z;
        q = q < lo_code ? lo_code : (q > hi_code ? hi_code : q);
        c[k] = (int8_t)(q - shift);
        sum += c[k];
    }
    for (int64_t k = K; k < Kp; k++) c[k] = 0;
    *scale = s;
    *zero = (int32_t)(z - shift);
    *csum = sum;
}

#if defined(__AVX2__)
/* The sum of the eight int32 lanes. */
static inline int32_t hsum(__m256i acc) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

/* sum_k c[k] u[k] over Kp weights of one 4-bit row (u in [0, 15]). */
static int32_t dot4(const uint8_t *w, const int8_t *c, int64_t Kp) {
    int64_t blocks = Kp / BLOCK;
#if defined(__AVX2__)
    const __m256i mask = _mm256_set1_epi8(15);
    __m256i acc = _mm256_setzero_si256();
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVXVNNI__)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int64_t b = 0; b < blocks; b++) {
        __m256i wb = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
        __m256i lo = _mm256_and_si256(wb, mask);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), mask);
        __m256i c0 = _mm256_loadu_si256((const __m256i *)(c + BLOCK * b));
        __m256i c1 = _mm256_loadu_si256((const __m256i *)(c + BLOCK * b + 32));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        acc = _mm256_dpbusd_epi32(acc, lo, c0);
        acc = _mm256_dpbusd_epi32(acc, hi, c1);
#elif defined(__AVXVNNI__)
        acc = _mm256_dpbusd_avx_epi32(acc, lo, c0);
        acc = _mm256_dpbusd_avx_epi32(acc, hi, c1);
#else   /* u8 x s8 pairs: |15 * 128 * 2| * 2 fits int16, no saturation */
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, c0), _mm256_maddubs_epi16(hi, c1));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
#endif
    }
    return hsum(acc);
#else
    int32_t acc = 0;
    for (int64_t b = 0; b < blocks; b++)
        for (int j = 0; j < 32; j++)
            acc += (w[32 * b + j] & 15) * c[BLOCK * b + j] + (w[32 * b + j] >> 4) * c[BLOCK * b + 32 + j];
    return acc;
#endif
}

/* sum_k c[k] u[k] over Kp weights of one 8-bit row (u in [0, 255]). */
static int32_t dot8(const uint8_t *w, const int8_t *c, int64_t Kp) {
#if defined(__AVX2__)
    __m256i acc = _mm256_setzero_si256();
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    for (int64_t k = 0; k < Kp; k += 32)
        acc = _mm256_dpbusd_epi32(acc, _mm256_loadu_si256((const __m256i *)(w + k)),
                                  _mm256_loadu_si256((const __m256i *)(c + k)));
#elif defined(__AVXVNNI__)
    for (int64_t k = 0; k < Kp; k += 32)
        acc = _mm256_dpbusd_avx_epi32(acc, _mm256_loadu_si256((const __m256i *)(w + k)),
                                      _mm256_loadu_si256((const __m256i *)(c + k)));
#else   /* widen to int16: 255 x 128 pairs would saturate u8 x s8's int16 sums */
    for (int64_t k = 0; k < Kp; k += 16) {
        __m256i wk = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
        __m256i ck = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wk, ck));
    }
#endif
    return hsum(acc);
#else
    int32_t acc = 0;
    for (int64_t k = 0; k < Kp; k++) acc += w[k] * c[k];
    return acc;
#endif
}

/* The linear: x [M, K] float32 -> y [M, N] float32. w: N rows of Kp / 2 (4-bit) or Kp (8-bit)
 * bytes; w_scale [N]; colsum [N] (sum of the weight codes, read when asymmetric) ; bias [N] or NULL.
 * Returns 0; -1 when out of memory, -2 for float16 scales without a compiler _Float16 (y untouched). */
int fxq_packed_int_linear(const float *x, int64_t M, int64_t K, int64_t Kp, const uint8_t *w, int wbits,
                          int64_t N, const float *w_scale, const int32_t *colsum, const float *bias,
                          int xbits, int symmetric, float clip, int scale_dtype, float *y, int nthreads) {
#if !defined(__FLT16_MAX__)
    if (scale_dtype == 2) return -2;
#endif
    int8_t *c = aligned_alloc(64, (size_t)(M * Kp + 64));
    float *sx = malloc(sizeof(float) * (size_t)M);
    int32_t *zx = malloc(sizeof(int32_t) * (size_t)M), *cs = malloc(sizeof(int32_t) * (size_t)M);
    if (!c || !sx || !zx || !cs) {
        free(c), free(sx), free(zx), free(cs);
        return -1;
    }
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, Kp, xbits, symmetric, clip, scale_dtype, c + m * Kp, sx + m, zx + m, cs + m);
    const int64_t row_bytes = wbits == 4 ? Kp / 2 : Kp;
    const int32_t off = wbits == 4 ? 8 : 128;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && N >= 64)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * row_bytes;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *cm = c + m * Kp;
            int32_t acc = (wbits == 4 ? dot4(wn, cm, Kp) : dot8(wn, cm, Kp)) - off * cs[m];
            if (!symmetric) acc -= zx[m] * colsum[n];
            float v = (float)acc;
            v = v * sx[m];
            v = v * w_scale[n];
            if (bias) v = v + bias[n];
            y[m * N + n] = v;
        }
    }
    free(c), free(sx), free(zx), free(cs);
    return 0;
}
