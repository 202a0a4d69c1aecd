/* Expert weights x fp32 tokens on the host CPU (AVX2 + FMA + F16C), for experts computed where their weights
 * are: bf16 here; group-quantized int8/int4, fp8 e4m3 and mxfp4 further down (each read from its stored bytes).
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

/* ---- quantized weights, decoded in registers ----------------------------------------------------------------
 *
 * y[b, n] = sum_g s[n, g] * sum_{k in group g} v[n, k] * x[b, k]
 *
 * Weights exactly as `prophet.formats.dequantize` gives them (w = v * s), fp32 sums; no weight is written:
 *   INT8   int8 values, fp16 scale per `group` columns of a row
 *   INT4   two values a byte (the even column in the low nibble), stored as v + 8; fp16 scales as INT8
 *   FP8    e4m3fn codes, fp32 scale_inv per block_rows x group block (per tensor, per row or 128 x 128)
 *   MXFP4  two e2m1 codes a byte (low nibble first), e8m0 scale 2^(e - 127) per 32 columns
 * Row stride ldw bytes, scale row stride lds elements. Each group's products are summed unscaled (decoded values
 * are exact in fp32) and the sum scaled once. Decoding is a few integer ops and one conversion per 8 weights:
 *   int8/int4  widen to 32-bit lanes (nibbles: mask / shift), convert;
 *   fp8        sign-extend to 16 bits, shift left 7 and clear bit 14: the fp16 whose exponent and mantissa are
 *              e4m3's with bias 15 instead of 7, so v * 2^-8 exactly (subnormals too: m * 2^-17), converted by
 *              F16C; the 2^8 goes into the group's scale. NaN codes (0x7f, 0xff) decode as +-480, never NaN:
 *              the quantizer clamps to +-448 and never writes them;
 *   mxfp4      one permute of the 8 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} by the code's low 3 bits (the
 *              permute reads only those), then xor with the code shifted left 28: bit 3 lands on the sign and
 *              bits 0-2 undo the same xor stored in the table entries (`flips`): 3 ops per 8 weights.
 * int4 sums the stored codes (v + 8) and takes 8 x the group's sum of x off once (two fewer integer ops per 16
 * weights). mxfp4's groups are one 32-column step: its table is scaled instead (8 magnitudes x 2^(e-127), exact)
 * so its chains run on across groups. One token: a row at a time (one sequential stream; two rows at once spill
 * the 16 AVX2 registers), four FMA chains. From DEQUANT_TOKENS tokens on, rows are dequantized two at a time into
 * an L1 buffer (exactly `dequantize`'s fp32 weights) and dotted with four tokens at a time in fp32: each row is
 * read from DRAM once whatever the batch. For the nibble formats each token is split once into its even and odd
 * columns to pair with the low and high nibbles of the same bytes.
 */
enum { INT8, INT4, FP8, MXFP4 };
#define DEQUANT_TOKENS 3 /* from this many tokens on, rows are dequantized once into L1, then fp32 dot products
                          * (at 2, decoding twice in registers was faster: 0.27 vs 0.21 of the read for int8) */
#define NIBBLES(kind) ((kind) == INT4 || (kind) == MXFP4)

/* 16 weights from q -> *a, *b: one-byte formats columns k..k+7 and k+8..k+15 (16 bytes), nibble formats the
 * even and odd columns of 16 (8 bytes). int4 comes out as its stored code (v + 8), fp8 times 2^-8, mxfp4 as
 * `mags` (its 8 magnitudes, scaled or not, xor `flips`) gives it. */
static inline __attribute__((always_inline)) void decode16(int kind, const uint8_t *q, __m256 mags, __m256 *a,
                                                           __m256 *b) {
    if (kind == INT8) {
        *a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
        *b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8))));
    } else if (kind == FP8) {
        __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q)), 7);
        h = _mm256_and_si256(h, _mm256_set1_epi16((short)0xbfff));
        *a = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        *b = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    } else {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
        if (kind == INT4) {
            *a = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
            *b = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        } else {
            __m256i h = _mm256_srli_epi32(v, 4); /* the permute reads the low 3 bits, the xor flips bit 31 */
            *a = _mm256_xor_ps(_mm256_permutevar8x32_ps(mags, v), _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
            *b = _mm256_xor_ps(_mm256_permutevar8x32_ps(mags, h), _mm256_castsi256_ps(_mm256_slli_epi32(h, 28)));
        }
    }
}

static inline float fp8_1(uint8_t c) { /* one e4m3fn code, times 2^-8 like decode16 */
    int em = c & 0x7f;
    union { uint32_t u; float f; } n = { ((uint32_t)em << 20) + (112u << 23) };
    float m = em < 8 ? (float)em / (1 << 17) : n.f;
    return c & 0x80 ? -m : m;
}

static const float E2M1[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6};

static inline float value1(int kind, const uint8_t *q, long k) { /* column k of a row, as decode16 */
    if (kind == INT8) return (float)(int8_t)q[k];
    if (kind == FP8) return fp8_1(q[k]);
    int code = k % 2 ? q[k / 2] >> 4 : q[k / 2] & 15;
    return kind == INT4 ? (float)code : E2M1[code];
}

static inline float scale1(int kind, const void *s, long g) { /* group g's scale, times 2^8 for fp8 */
    if (kind == FP8) return ((const float *)s)[g] * 256.0f;
    if (kind == MXFP4) {
        uint32_t e = ((const uint8_t *)s)[g];
        union { uint32_t u; float f; } c = { e ? e << 23 : 1u << 22 }; /* 2^(e-127); e = 0 is subnormal */
        return c.f;
    }
    return _cvtsh_ss(((const uint16_t *)s)[g]);
}

/* 32 weights of one row from column k (a multiple of 16; nibble formats: even) times the token, into four
 * chains a[0..3]. x0, x1: the token twice (one-byte formats) or its even and odd columns (nibble formats). */
static inline __attribute__((always_inline)) void chunk32(int kind, const uint8_t *q, long k, __m256 mags,
                                                          const float *x0, const float *x1, __m256 *a) {
    const int nib = NIBBLES(kind);
    __m256 w0, w1, w2, w3;
    decode16(kind, q + (nib ? k / 2 : k), mags, &w0, &w1);
    decode16(kind, q + (nib ? k / 2 + 8 : k + 16), mags, &w2, &w3);
    a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(nib ? x0 + k / 2 : x0 + k), a[0]);
    a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(nib ? x1 + k / 2 : x0 + k + 8), a[1]);
    a[2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(nib ? x0 + k / 2 + 8 : x0 + k + 16), a[2]);
    a[3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(nib ? x1 + k / 2 + 8 : x0 + k + 24), a[3]);
}

/* Columns [k, g1) of one row one at a time, unscaled. */
static inline float columns1(int kind, const uint8_t *q, long k, long g1, const float *x0, const float *x1) {
    float s = 0;
    for (; k < g1; k++) s += value1(kind, q, k) * (NIBBLES(kind) ? (k % 2 ? x1[k / 2] : x0[k / 2]) : x0[k]);
    return s;
}

/* One row q with scales s . one token. int8/int4/fp8: each group's sum (four chains) scaled once. mxfp4 (groups
 * of 32, one chunk): its 8 magnitudes times the group's scale are the permute's table, so the decoded weights
 * are dequantize's (a power of two: exact) and the chains run across groups. */
static inline __attribute__((always_inline)) float row_token(int kind, const uint8_t *q, const void *s, long group,
                                                             const float *x0, const float *x1, const float *xsum,
                                                             long K) {
    const __m256 zero = _mm256_setzero_ps(), mags = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const __m256 flips = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 28));
    __m256 total = zero, a[4] = {zero, zero, zero, zero};
    float tail = 0;
    for (long g0 = 0; g0 < K; g0 += group) {
        long g1 = g0 + group < K ? g0 + group : K, k = g0;
        float sf = scale1(kind, s, g0 / group);
        if (kind == MXFP4) {
            if (g1 - g0 == 32)
                chunk32(kind, q, k, _mm256_xor_ps(_mm256_mul_ps(mags, _mm256_set1_ps(sf)), flips), x0, x1, a);
            else
                tail += columns1(kind, q, k, g1, x0, x1) * sf;
            continue;
        }
        if (!NIBBLES(kind) || g0 % 2 == 0) /* nibble formats: whole bytes from here */
            for (; k + 32 <= g1; k += 32) chunk32(kind, q, k, mags, x0, x1, a);
        float rest = columns1(kind, q, k, g1, x0, x1) - (kind == INT4 ? 8 * xsum[g0 / group] : 0);
        __m256 sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        total = _mm256_fmadd_ps(sum, _mm256_set1_ps(sf), total);
        tail += rest * sf;
        a[0] = a[1] = a[2] = a[3] = zero;
    }
    if (kind == MXFP4) total = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    return hsum(total) + tail;
}

/* One row q with scales s -> its weights as `prophet.formats.dequantize` gives them (each v * s rounded once to
 * fp32: decode16's value times its scale, exact but for fp8's single rounding), in x0/x1's order: the row
 * (one-byte formats) or its even then its `half` odd columns (nibble formats). */
static inline __attribute__((always_inline)) void dequantize_row(int kind, const uint8_t *q, const void *s,
                                                                 long group, long K, long half, float *out) {
    const int nib = NIBBLES(kind);
    const __m256 mags = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const __m256 flips = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 28));
    float *o0 = out, *o1 = nib ? out + half : out + 8;
    for (long g0 = 0; g0 < K; g0 += group) {
        long g1 = g0 + group < K ? g0 + group : K, k = g0;
        float sf = scale1(kind, s, g0 / group);
        __m256 sv = _mm256_set1_ps(sf), offset = _mm256_set1_ps(kind == INT4 ? -8 * sf : 0);
        if (!nib || g0 % 2 == 0)
            for (; k + 16 <= g1; k += 16) {
                __m256 w0, w1;
                decode16(kind, q + (nib ? k / 2 : k), _mm256_xor_ps(mags, flips), &w0, &w1);
                _mm256_storeu_ps(nib ? o0 + k / 2 : o0 + k, _mm256_fmadd_ps(w0, sv, offset));
                _mm256_storeu_ps(nib ? o1 + k / 2 : o1 + k, _mm256_fmadd_ps(w1, sv, offset));
            }
        for (; k < g1; k++)
            out[nib ? (k % 2) * half + k / 2 : k] = (value1(kind, q, k) - (kind == INT4 ? 8 : 0)) * sf;
    }
}

/* Rows r0, r1 (n fp32 values each) . tokens x[0..3] -> out[row][token]: each row vector loaded feeds four
 * tokens and each token vector two rows (eight chains, named: an array of them lands on the stack). A missing row
 * or token is passed as a repeat and its outputs dropped by the caller. */
static void dots_2x4(const float *r0, const float *r1, const float *const x[4], long n, float out[2][4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 u = _mm256_loadu_ps(r0 + i), v = _mm256_loadu_ps(r1 + i), t;
#define TOKEN(j, a, c) t = _mm256_loadu_ps(x[j] + i), a = _mm256_fmadd_ps(u, t, a), c = _mm256_fmadd_ps(v, t, c)
        TOKEN(0, a0, c0);
        TOKEN(1, a1, c1);
        TOKEN(2, a2, c2);
        TOKEN(3, a3, c3);
#undef TOKEN
    }
    out[0][0] = hsum(a0), out[0][1] = hsum(a1), out[0][2] = hsum(a2), out[0][3] = hsum(a3);
    out[1][0] = hsum(c0), out[1][1] = hsum(c1), out[1][2] = hsum(c2), out[1][3] = hsum(c3);
    for (; i < n; i++)
        for (int j = 0; j < 4; j++) {
            out[0][j] += r0[i] * x[j][i];
            out[1][j] += r1[i] * x[j][i];
        }
}

/* Rows [n0, n1) of any quantized kind (a constant at each call: one specialized loop each); scale row of row n:
 * s + (n / block_rows) * lds elements of `ssize` bytes. Returns 0 when out of memory (nothing computed). */
static inline __attribute__((always_inline)) int gemv_quant(int kind, const uint8_t *w, long ldw, const void *s,
                                                             long lds, long ssize, long block_rows, long group,
                                                             const float *x, long ldx, float *y, long ldy, long B,
                                                             long K, long n0, long n1) {
    const int nib = NIBBLES(kind);
    long half = (K + 1) / 2;
    long groups = (K + group - 1) / group, each = 2 * half + groups;
    float *split = NULL; /* nibble formats: per token, its `half` even then `half` odd columns, then group sums */
    if (nib) {
        split = malloc((size_t)(B * each) * sizeof(float) + 1);
        if (split == NULL) return 0;
        for (long b = 0; b < B; b++) {
            float *t = split + b * each;
            for (long k = 0; k < K; k++) t[(k % 2) * half + k / 2] = x[b * ldx + k];
            if (K % 2) t[2 * half - 1] = 0; /* an odd K's last odd slot: 0, as in the dequantized rows */
            for (long g = 0; g < groups; g++) {
                float sum = 0;
                for (long k = g * group; k < K && k < (g + 1) * group; k++) sum += x[b * ldx + k];
                t[2 * half + g] = sum;
            }
        }
    }
    if (B < DEQUANT_TOKENS) {
        for (long n = n0; n < n1; n++)
            for (long b = 0; b < B; b++) {
                const float *x0 = nib ? split + b * each : x + b * ldx;
                y[b * ldy + n] = row_token(kind, w + n * ldw, (const char *)s + (n / block_rows) * lds * ssize, group,
                                           x0, nib ? x0 + half : x0, x0 + 2 * half, K);
            }
        free(split);
        return 1;
    }
    long cols = nib ? 2 * half : K; /* a dequantized row, in its tokens' order */
    float *rows = malloc((size_t)(2 * cols) * sizeof(float));
    if (rows == NULL) {
        free(split);
        return 0;
    }
    for (long n = n0; n < n1; n += 2) {
        int two = n + 1 < n1;
        for (int r = 0; r <= two; r++) {
            dequantize_row(kind, w + (n + r) * ldw, (const char *)s + ((n + r) / block_rows) * lds * ssize, group,
                           K, half, rows + r * cols);
            if (nib && K % 2) rows[r * cols + cols - 1] = 0;
        }
        for (long b = 0; b < B; b += 4) {
            const float *xt[4];
            float out[2][4];
            for (int j = 0; j < 4; j++) {
                long t = b + j < B ? b + j : B - 1;
                xt[j] = nib ? split + t * each : x + t * ldx;
            }
            dots_2x4(rows, two ? rows + cols : rows, xt, cols, out);
            for (int j = 0; j < 4 && b + j < B; j++)
                for (int r = 0; r <= two; r++) y[(b + j) * ldy + n + r] = out[r][j];
        }
    }
    free(rows);
    free(split);
    return 1;
}

/* int8 (bits 8) or int4 (bits 4) rows, fp16 scales per `group` columns. 0 when out of memory, else 1. */
int prophet_gemv_int(const uint8_t *w, long ldw, const uint16_t *s, long lds, long group, int bits, const float *x,
                     long ldx, float *y, long ldy, long B, long K, long n0, long n1) {
    if (bits == 8) return gemv_quant(INT8, w, ldw, s, lds, 2, 1, group, x, ldx, y, ldy, B, K, n0, n1);
    return gemv_quant(INT4, w, ldw, s, lds, 2, 1, group, x, ldx, y, ldy, B, K, n0, n1);
}

/* fp8 e4m3 rows, fp32 scale_inv per block_rows x group block. */
void prophet_gemv_fp8(const uint8_t *w, long ldw, const float *s, long lds, long block_rows, long group,
                      const float *x, long ldx, float *y, long ldy, long B, long K, long n0, long n1) {
    gemv_quant(FP8, w, ldw, s, lds, 4, block_rows, group, x, ldx, y, ldy, B, K, n0, n1);
}

/* mxfp4 rows, e8m0 scales per 32 columns. 0 when out of memory, else 1. */
int prophet_gemv_mxfp4(const uint8_t *w, long ldw, const uint8_t *s, long lds, const float *x, long ldx, float *y,
                       long ldy, long B, long K, long n0, long n1) {
    return gemv_quant(MXFP4, w, ldw, s, lds, 1, 1, 32, x, ldx, y, ldy, B, K, n0, n1);
}
