/* Expert weights x fp32 tokens on the host CPU (AVX2 + FMA + F16C), for experts computed where their weights
 * are: bf16 here; group-quantized int8/int4 and fp8 e4m3 further down (each read from its stored bytes).
 *
 * y[b, n] = sum_k w[n, k] * x[b, k]   for rows n in [n0, n1), tokens b in [0, B)
 *
 * w is bf16 (the upper 16 bits of an fp32), row stride ldw; x, y are fp32 with row strides ldx, ldy. A bf16
 * widens to fp32 by a 16-bit left shift, which is exact, and sums accumulate in fp32.
 *
 * One token (decode) whose values are all bf16 exactly (the bf16 model's inputs always are: hidden states and
 * the rounded activation) is narrowed to bf16 once, which halves the bytes of x read per weight byte, and
 *   K <= X_L1 (x stays in L1): one row at a time, so the weights are read as ONE sequential stream, the pattern
 *       the hardware prefetcher serves best: 0.86-0.9 of a plain streaming read of the same bytes on this
 *       machine (CPU time, C microbenchmark), where 8 row streams at once reach 0.72-0.76 even with AVX-512 bf16
 *       dot products (so the streams, not the arithmetic, are the limit) and fp32 x over four rows 0.6-0.7;
 *   larger K (x would be read from L2 for every row: one stream reaches 0.5): eight rows at a time, each
 *       widened x vector feeding all eight (0.8-0.9: long rows make long streams).
 * Software prefetch only costs on both paths.
 * Otherwise (several tokens, or fp32 values): four weight rows streamed together, tokens two at a time (each
 * widened weight vector feeds both: eight accumulators); each block of rows is reused from L1 for every pair
 * of tokens, so DRAM reads every weight once whatever B is.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define AHEAD 256 /* bf16 elements (512 bytes) each row stream is prefetched ahead: +0.05-0.1 of read bandwidth */
#define X_L1 8192  /* largest K whose bf16 token (16 KiB) stays in a 32 KiB L1 beside one weight stream */

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

/* x [K] fp32 -> xb [K] bf16; 1 when every value survived exactly (then xb is x), else 0. */
static int narrow_exact(const float *x, uint16_t *xb, long K) {
    for (long k = 0; k < K; k++) {
        union { float f; uint32_t u; } c = { x[k] };
        if (c.u & 0xffff) return 0;
        xb[k] = (uint16_t)(c.u >> 16);
    }
    return 1;
}

/* 32 bytes as 16 bf16 -> their even and odd elements in fp32: a 32-bit lane shifted left by 16 is its even
 * element, the lane masked to its upper half its odd one (one load, two integer ops, no shuffle: 1.6x the
 * compute rate of zero-extending 8 at a time). Pairing even with even and odd with odd keeps dot products. */
#define EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000)))
#define LOAD16(p) _mm256_loadu_si256((const __m256i *)(p))

/* One token in bf16 (xb), one row at a time: the rows [n0, n1) are read as one sequential stream. */
static void rows1_token1_bf16(const uint16_t *w, long ldw, const uint16_t *xb, float *y, long K, long n0, long n1) {
    for (long n = n0; n < n1; n++) {
        const uint16_t *r = w + n * ldw;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        long k = 0;
        for (; k + 32 <= K; k += 32) {
            __m256i w0 = LOAD16(r + k), w1 = LOAD16(r + k + 16), x0 = LOAD16(xb + k), x1 = LOAD16(xb + k + 16);
            a0 = _mm256_fmadd_ps(EVEN(w0), EVEN(x0), a0);
            a1 = _mm256_fmadd_ps(ODD(w0), ODD(x0), a1);
            a2 = _mm256_fmadd_ps(EVEN(w1), EVEN(x1), a2);
            a3 = _mm256_fmadd_ps(ODD(w1), ODD(x1), a3);
        }
        float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; k++) s += widen1(r[k]) * widen1(xb[k]);
        y[n] = s;
    }
}

/* One token in bf16 (xb), eight rows at a time (each widened x vector feeds eight rows; one accumulator a row). */
static void rows8_token1_bf16(const uint16_t *w, long ldw, const uint16_t *xb, float *y, long K, long n0, long n1) {
    long n = n0;
    for (; n + 8 <= n1; n += 8) {
        const uint16_t *r[8];
        __m256 a[8];
        for (int i = 0; i < 8; i++) {
            r[i] = w + (n + i) * ldw;
            a[i] = _mm256_setzero_ps();
        }
        long k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256i xv = LOAD16(xb + k);
            __m256 xe = EVEN(xv), xo = ODD(xv);
            for (int i = 0; i < 8; i++) {
                __m256i wv = LOAD16(r[i] + k);
                a[i] = _mm256_fmadd_ps(EVEN(wv), xe, a[i]);
                a[i] = _mm256_fmadd_ps(ODD(wv), xo, a[i]);
            }
        }
        for (int i = 0; i < 8; i++) {
            float s = hsum(a[i]);
            for (long t = k; t < K; t++) s += widen1(r[i][t]) * widen1(xb[t]);
            y[n + i] = s;
        }
    }
    rows1_token1_bf16(w, ldw, xb, y, K, n, n1);
}

/* One token whose values are all bf16: 1 when computed, 0 when x is not bf16-exact (or no memory). */
static int token1_bf16(const uint16_t *w, long ldw, const float *x, float *y, long K, long n0, long n1) {
    uint16_t *xb = malloc((size_t)K * sizeof(uint16_t));
    if (xb == NULL) return 0;
    int exact = narrow_exact(x, xb, K);
    if (exact && K <= X_L1)
        rows1_token1_bf16(w, ldw, xb, y, K, n0, n1);
    else if (exact)
        rows8_token1_bf16(w, ldw, xb, y, K, n0, n1);
    free(xb);
    return exact;
}

void prophet_gemv_bf16(const uint16_t *w, long ldw, const float *x, long ldx, float *y, long ldy, long B, long K,
                       long n0, long n1) {
    if (B == 1 && token1_bf16(w, ldw, x, y, K, n0, n1)) return;
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

/* ---- group-quantized integer weights ------------------------------------------------------------------------
 *
 * y[b, n] = sum_g s[n, g] * sum_{k in group g} q[n, k] * x[b, k]
 *
 * q: int8 (bits 8) or int4 (bits 4: two a byte, the even column in the low nibble, stored as q + 8), row stride
 * ldw bytes; s: fp16 scales, one per `group` columns of a row, row stride lds; x, y fp32 as above. This is
 * `prophet.formats.dequantize` (w = q * s, exact in fp32) then the product, up to the order of fp32 sums: the
 * integers are widened to fp32 in registers, each group's sum is scaled once, and no weight is written. Four
 * FMA chains per row (one would wait on its own latency). A row of bytes is read from DRAM once and from L1 for
 * each further token. An int4 row's even and odd columns come from the low and high nibbles of the same bytes,
 * so each token is split once into its even and odd halves to pair with them.
 */
static inline float half1(uint16_t h) { return _cvtsh_ss(h); }

static inline __m256 int8x8(const int8_t *q) { /* 8 int8 -> fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* ---- fp8 e4m3 weights ---------------------------------------------------------------------------------------
 *
 * y[b, n] = sum_k v[n, k] * s[n / block_rows, k / group] * x[b, k], v e4m3fn codes (row stride ldw bytes), s fp32
 * scale_inv (row stride lds): per tensor (block_rows >= N, group >= K), per row (1, K) or per 128 x 128 block.
 * Codes are decoded exactly from their bits (sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 is
 * subnormal, m x 2^-9); NaN codes (0x7f, 0xff) are not decoded as NaN: the quantizer clamps to +-448 and never
 * writes them. Each block's sum is scaled once, as for the integers.
 */
static inline __m256 fp8x8(const uint8_t *q) { /* 8 e4m3fn codes -> fp32 */
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    __m256i em = _mm256_and_si256(v, _mm256_set1_epi32(0x7f));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
    /* normal: exponent e + 120 (= e - 7 + 127) and the mantissa's 3 bits on top of fp32's 23 */
    __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
    __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 512));
    __m256 small = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
    return _mm256_or_ps(_mm256_blendv_ps(normal, subnormal, small), _mm256_castsi256_ps(sign));
}

static inline float fp8_1(uint8_t c) {
    int em = c & 0x7f;
    union { uint32_t u; float f; } n = { ((uint32_t)em << 20) + (120u << 23) };
    float m = em < 8 ? (float)em / 512 : n.f;
    return c & 0x80 ? -m : m;
}

enum { INT8, FP8 }; /* one byte a weight */

/* One row of one-byte weights . one token: each group of `group` columns summed in fp32 (four chains), then
 * scaled once by its scale (fp16 for INT8, fp32 for FP8; `kind` is a constant at every call, so the compiler
 * makes one loop per kind). */
static inline float row_bytes(int kind, const uint8_t *q, const void *s, long group, const float *x, long K) {
#define DECODE8(p) (kind == INT8 ? int8x8((const int8_t *)(p)) : fp8x8(p))
    __m256 total = _mm256_setzero_ps();
    float tail = 0;
    for (long g0 = 0; g0 < K; g0 += group) {
        long g1 = g0 + group < K ? g0 + group : K, k = g0;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 32 <= g1; k += 32) {
            a0 = _mm256_fmadd_ps(DECODE8(q + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(DECODE8(q + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(DECODE8(q + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(DECODE8(q + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k + 8 <= g1; k += 8) a0 = _mm256_fmadd_ps(DECODE8(q + k), _mm256_loadu_ps(x + k), a0);
        float sf = kind == INT8 ? half1(((const uint16_t *)s)[g0 / group]) : ((const float *)s)[g0 / group], rest = 0;
        for (; k < g1; k++) rest += (kind == INT8 ? (float)(int8_t)q[k] : fp8_1(q[k])) * x[k];
        total = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), _mm256_set1_ps(sf), total);
        tail += rest * sf;
    }
#undef DECODE8
    return hsum(total) + tail;
}

/* one int4 row . one token given as its even (xe) and odd (xo) columns, K/2 rounded up each */
static float row_int4(const uint8_t *q, const uint16_t *s, long group, const float *xe, const float *xo, long K) {
    const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    __m256 total = _mm256_setzero_ps();
    float tail = 0;
    for (long g0 = 0; g0 < K; g0 += group) {
        long g1 = g0 + group < K ? g0 + group : K, k = g0;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        if (g0 % 2 == 0) /* whole bytes from here: eight bytes hold 16 columns */
            for (; k + 32 <= g1; k += 32) {
                __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k / 2)));
                __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k / 2 + 8)));
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b0, low), eight)),
                                     _mm256_loadu_ps(xe + k / 2), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b0, 4), eight)),
                                     _mm256_loadu_ps(xo + k / 2), a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b1, low), eight)),
                                     _mm256_loadu_ps(xe + k / 2 + 8), a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b1, 4), eight)),
                                     _mm256_loadu_ps(xo + k / 2 + 8), a3);
            }
        float sf = half1(s[g0 / group]), rest = 0;
        for (; k < g1; k++) {
            int code = k % 2 ? q[k / 2] >> 4 : q[k / 2] & 15;
            rest += (float)(code - 8) * (k % 2 ? xo[k / 2] : xe[k / 2]);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), _mm256_set1_ps(sf), total);
        tail += rest * sf;
    }
    return hsum(total) + tail;
}

/* Returns 0 when out of memory (nothing computed), else 1. */
int prophet_gemv_int(const uint8_t *w, long ldw, const uint16_t *s, long lds, long group, int bits, const float *x,
                     long ldx, float *y, long ldy, long B, long K, long n0, long n1) {
    float *split = NULL; /* int4: per token, its K/2 even then K/2 odd columns (rounded up) */
    long half = (K + 1) / 2;
    if (bits == 4) {
        split = malloc((size_t)(B * 2 * half) * sizeof(float) + 1);
        if (split == NULL) return 0;
        for (long b = 0; b < B; b++)
            for (long k = 0; k < K; k++) split[b * 2 * half + (k % 2) * half + k / 2] = x[b * ldx + k];
    }
    for (long n = n0; n < n1; n++)
        for (long b = 0; b < B; b++)
            y[b * ldy + n] = bits == 8 ? row_bytes(INT8, w + n * ldw, s + n * lds, group, x + b * ldx, K)
                                       : row_int4(w + n * ldw, s + n * lds, group, split + b * 2 * half,
                                                  split + b * 2 * half + half, K);
    free(split);
    return 1;
}

void prophet_gemv_fp8(const uint8_t *w, long ldw, const float *s, long lds, long block_rows, long group,
                      const float *x, long ldx, float *y, long ldy, long B, long K, long n0, long n1) {
    for (long n = n0; n < n1; n++)
        for (long b = 0; b < B; b++)
            y[b * ldy + n] = row_bytes(FP8, w + n * ldw, s + (n / block_rows) * lds, group, x + b * ldx, K);
}
