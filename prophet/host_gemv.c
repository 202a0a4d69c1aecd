/* bf16 weights x fp32 tokens on the host CPU (AVX2 + FMA), for experts computed where their weights are.
 *
 * y[b, n] = sum_k w[n, k] * x[b, k]   for rows n in [n0, n1), tokens b in [0, B)
 *
 * w is bf16 (the upper 16 bits of an fp32), row stride ldw; x, y are fp32 with row strides ldx, ldy. Four
 * weight rows are streamed together (four independent FMA chains, four prefetch streams), tokens two at a time
 * (each widened weight vector feeds both: eight accumulators, 14 of the 16 AVX2 registers); each block of rows
 * is reused from L1 for every pair of tokens, so DRAM reads every weight once whatever B is. A bf16 widens to
 * fp32 by a 16-bit left shift, which is exact, and sums accumulate in fp32.
 */
#include <immintrin.h>
#include <stdint.h>

#define AHEAD 256 /* bf16 elements (512 bytes) each row stream is prefetched ahead: +0.05-0.1 of read bandwidth */

static inline __m256 widen8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float widen1(uint16_t v) {
    union { uint32_t u; float f; } c = { (uint32_t)v << 16 };
    return c.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static float row_dot(const uint16_t *w, const float *x, long K) {
    __m256 a = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(widen8(w + k), _mm256_loadu_ps(x + k), a);
    float s = hsum(a);
    for (; k < K; k++) s += widen1(w[k]) * x[k];
    return s;
}

/* Four rows (r[0..3]) against two tokens (xa, xb): each widened weight vector feeds both tokens. */
static void rows4_tokens2(const uint16_t *const r[4], const float *xa, const float *xb, long K, float ya[4],
                          float yb[4]) {
    __m256 a[4], c[4];
    for (int i = 0; i < 4; i++) a[i] = c[i] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 u = _mm256_loadu_ps(xa + k), v = _mm256_loadu_ps(xb + k);
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char *)(r[i] + k + AHEAD), _MM_HINT_T0);
            __m256 w = widen8(r[i] + k);
            a[i] = _mm256_fmadd_ps(w, u, a[i]);
            c[i] = _mm256_fmadd_ps(w, v, c[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        ya[i] = hsum(a[i]);
        yb[i] = hsum(c[i]);
        for (long t = k; t < K; t++) {
            ya[i] += widen1(r[i][t]) * xa[t];
            yb[i] += widen1(r[i][t]) * xb[t];
        }
    }
}

/* Four rows against one token. */
static void rows4_token1(const uint16_t *const r[4], const float *x, long K, float y[4]) {
    __m256 a[4];
    for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 u = _mm256_loadu_ps(x + k);
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char *)(r[i] + k + AHEAD), _MM_HINT_T0);
            a[i] = _mm256_fmadd_ps(widen8(r[i] + k), u, a[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        y[i] = hsum(a[i]);
        for (long t = k; t < K; t++) y[i] += widen1(r[i][t]) * x[t];
    }
}

void prophet_gemv_bf16(const uint16_t *w, long ldw, const float *x, long ldx, float *y, long ldy, long B, long K,
                       long n0, long n1) {
    long n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *const r[4] = {w + n * ldw, w + (n + 1) * ldw, w + (n + 2) * ldw, w + (n + 3) * ldw};
        float ya[4], yb[4];
        long b = 0;
        for (; b + 2 <= B; b += 2) {
            rows4_tokens2(r, x + b * ldx, x + (b + 1) * ldx, K, ya, yb);
            for (int i = 0; i < 4; i++) {
                y[b * ldy + n + i] = ya[i];
                y[(b + 1) * ldy + n + i] = yb[i];
            }
        }
        if (b < B) {
            rows4_token1(r, x + b * ldx, K, ya);
            for (int i = 0; i < 4; i++) y[b * ldy + n + i] = ya[i];
        }
    }
    for (; n < n1; n++)
        for (long b = 0; b < B; b++) y[b * ldy + n] = row_dot(w + n * ldw, x + b * ldx, K);
}

/* Sum of n fp32 values with four independent chains: the host's read bandwidth, nothing else. */
double prophet_read_f32(const float *p, long n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    double s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += p[i];
    return s;
}

/* dst[i] = widen(src[i]) for i < n: bf16 tiles to fp32 for the fp32 matrix product of larger batches. */
void prophet_widen_bf16(const uint16_t *src, float *dst, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8(src + i));
    for (; i < n; i++) dst[i] = widen1(src[i]);
}
