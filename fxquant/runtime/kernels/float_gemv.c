/* fxquant's CPU float32 GEMV for a few tokens: y = x W^T + b with W [N, K] as nn.Linear holds it.
 *
 * A decode step reads every weight once, so a float32 linear at M = 1 is bound by memory; measured
 * here, the BLAS path of F.linear streamed SmolLM2's output layer at 15 GB/s where a plain read of
 * the same tensor ran at 41. This kernel reads four rows of W at a time against each token's x,
 * with vector FMAs into per-row accumulators (AVX-512 or AVX2 + FMA; plain C elsewhere), rows split
 * over the threads. Its float32 sums run in another order than the BLAS's, so results differ from
 * F.linear by float32 rounding. A bfloat16 copy of W (plan="fast") is read at half the bytes, each
 * weight widened exactly to float32; x stays float32.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define ROWS 4

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
static float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512F__)
#define VLOAD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#elif defined(LANES)
#define VLOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#endif
#define F32_VALUE(v) (v)

/* y[m, n0 .. n0 + rows) for one token m, rows <= ROWS, weights of type T read by LOADW / VALUE. */
#define ROWS_DOT(name, T, LOADW, VALUE)                                                        \
    static void name(const float *x, const T *w, int64_t K, int64_t rows, float *out) {         \
        float acc[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};                                             \
        int64_t k = 0;                                                                          \
        if (rows == ROWS) {                                                                     \
            VECTOR_PART(LOADW)                                                                  \
        }                                                                                       \
        for (int64_t r = 0; r < rows; r++) {                                                    \
            const T *wr = w + r * K;                                                            \
            float tail = 0.0f;                                                                  \
            for (int64_t j = (rows == ROWS ? k : 0); j < K; j++) tail += x[j] * VALUE(wr[j]);  \
            out[r] = acc[r] + tail;                                                             \
        }                                                                                       \
    }

#if defined(LANES)
#define VECTOR_PART(LOADW)                                                                      \
    vec a0 = VZERO(), a1 = VZERO(), a2 = VZERO(), a3 = VZERO();                                 \
    for (; k + LANES <= K; k += LANES) {                                                        \
        vec xv = VLOAD(x + k);                                                                  \
        a0 = VFMA(LOADW(w + k), xv, a0);                                                        \
        a1 = VFMA(LOADW(w + K + k), xv, a1);                                                    \
        a2 = VFMA(LOADW(w + 2 * K + k), xv, a2);                                                \
        a3 = VFMA(LOADW(w + 3 * K + k), xv, a3);                                                \
    }                                                                                           \
    acc[0] = vsum(a0), acc[1] = vsum(a1), acc[2] = vsum(a2), acc[3] = vsum(a3);
ROWS_DOT(rows_dot_f32, float, VLOAD, F32_VALUE)
ROWS_DOT(rows_dot_bf16, uint16_t, VLOAD_BF16, bf16_value)
#else
#define VECTOR_PART(LOADW)
ROWS_DOT(rows_dot_f32, float, , F32_VALUE)
ROWS_DOT(rows_dot_bf16, uint16_t, , bf16_value)
#endif

/* y [M, N] = x [M, K] W^T (+ bias [N] unless NULL), float32 x, y and bias; W float32 (bf16 == 0)
 * or bfloat16 (bf16 == 1, widened exactly to float32 in registers); all contiguous. */
void fxq_float_gemv(const float *x, int64_t M, int64_t K, const void *w, int bf16, int64_t N, const float *bias,
                    float *y, int nthreads) {
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && N >= 64)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        for (int64_t m = 0; m < M; m++) {
            float out[ROWS];
            if (bf16)
                rows_dot_bf16(x + m * K, (const uint16_t *)w + n0 * K, K, rows, out);
            else
                rows_dot_f32(x + m * K, (const float *)w + n0 * K, K, rows, out);
            for (int64_t r = 0; r < rows; r++) y[m * N + n0 + r] = bias ? out[r] + bias[n0 + r] : out[r];
        }
    }
}
