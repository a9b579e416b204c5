/* Row dot products for the CPU expert kernel: one per weight format and instruction set.
 *
 * Each returns Σ_j w[j]·x[j] for one weight row of n inputs, streamed once from DRAM. Paths:
 *   FLOAT  weights converted to fp32 in registers (any CPU; `omp simd` lets gcc pick AVX-512/AVX2/SSE)
 *   DPBF16 bf16 weights × bf16-rounded activations with vdpbf16ps (AVX-512 BF16)
 *   IDOT   int8/int4 weights × int8-quantized activations with vpdpbusd (AVX-512 VNNI); a plain-C twin with the
 *          same integer arithmetic runs where VNNI is missing, so CI tests this path's logic too.
 * IDOT activations are quantized per block of QB=128 inputs (scale = absmax/127). vpdpbusd multiplies unsigned
 * by signed bytes, so weights enter unsigned — int8 as w+128 (xor 0x80), int4 as its stored nibble w+8 — and the
 * offset is taken back with the block sums Σq: Σ(w+o)q = Σwq + o·Σq.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QB 128
#if defined(__AVX512BF16__)
#define HAS_DPBF16 1
#else
#define HAS_DPBF16 0
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAS_VNNI 1
#else
#define HAS_VNNI 0
#endif

/* Software prefetch `pf_bytes` ahead of the weight stream (0 = off): the hardware prefetchers stop at 4 KiB
 * page boundaries, and a weight row is a few KiB. */
static int pf_bytes = 0;
#define PREFETCH(p) do { if (pf_bytes) __builtin_prefetch((const char *)(p) + pf_bytes, 0, 3); } while (0)

static inline float bf16f(uint16_t v) { uint32_t b = (uint32_t)v << 16; float f; memcpy(&f, &b, 4); return f; }
static inline uint16_t f2bf16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (uint16_t)(u >> 16); }

/* ---- FLOAT ---- */
static inline float dot_bf16(const uint16_t *w, const float *x, int n) {
    float acc = 0.f;
    for (int j0 = 0; j0 < n; j0 += 32) {
        PREFETCH(w + j0);
        int j1 = j0 + 32 < n ? j0 + 32 : n;
#pragma omp simd reduction(+ : acc)
        for (int j = j0; j < j1; j++) acc += bf16f(w[j]) * x[j];
    }
    return acc;
}

static inline float dot_i8(const int8_t *w, const float *x, int n) {
    float acc = 0.f;
    for (int j0 = 0; j0 < n; j0 += 64) {
        PREFETCH(w + j0);
        int j1 = j0 + 64 < n ? j0 + 64 : n;
#pragma omp simd reduction(+ : acc)
        for (int j = j0; j < j1; j++) acc += (float)w[j] * x[j];
    }
    return acc;
}

/* xe/xo: the even / odd inputs, lined up with the low / high nibbles. G % 16 == 0 keeps a group's partial sums
 * in one 8-lane vector (GCC vector extensions); other group sizes take the scalar loop. */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint8_t vb8 __attribute__((vector_size(8)));

static inline float dot_i4(const uint8_t *w, const float *s, const float *xe, const float *xo, int n, int G) {
    if (G % 16 == 0) {
        vf8 tot = {0};
        for (int g = 0; g < n / G; g++) {
            vf8 acc = {0};
            for (int j = g * (G / 2); j < (g + 1) * (G / 2); j += 8) {
                vb8 b;
                vf8 e, o;
                if (j % 32 == 0) PREFETCH(w + j);
                memcpy(&b, w + j, 8);
                memcpy(&e, xe + j, 32);
                memcpy(&o, xo + j, 32);
                vf8 lo = __builtin_convertvector(__builtin_convertvector(b & 15, vi8) - 8, vf8);
                vf8 hi = __builtin_convertvector(__builtin_convertvector(b >> 4, vi8) - 8, vf8);
                acc += lo * e + hi * o;
            }
            tot += acc * s[g];
        }
        float r = 0.f;
        for (int l = 0; l < 8; l++) r += tot[l];
        return r;
    }
    float total = 0.f;
    for (int g = 0; g < n / G; g++) {
        const uint8_t *b = w + g * (G / 2);
        const float *e = xe + g * (G / 2), *o = xo + g * (G / 2);
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < G / 2; j++) acc += (float)((int)(b[j] & 15) - 8) * e[j] + (float)((int)(b[j] >> 4) - 8) * o[j];
        total += s[g] * acc;
    }
    return total;
}

/* ---- DPBF16: 32 products per instruction, no conversion µops ---- */
#if HAS_DPBF16
static inline float dot_bf16_dp(const uint16_t *w, const uint16_t *xb, int n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int j = 0;
    for (; j + 64 <= n; j += 64) {
        PREFETCH(w + j);
        PREFETCH(w + j + 32);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(xb + j));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + j + 32), (__m512bh)_mm512_loadu_si512(xb + j + 32));
    }
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; j < n; j++) acc += bf16f(w[j]) * bf16f(xb[j]);
    return acc;
}
#endif

/* ---- IDOT. q: the activation's int8 values (int4: its even inputs, then its odd ones), sc[c]: block c's
 * scale, ts[c] = sc[c]·Σq over block c. n % QB == 0. ---- */
#if HAS_VNNI
/* int8 row (per-row scale applied by the caller): returns Σ_c sc[c]·Σ_{j∈c} (w_j+128)·q_j */
static inline float idot_i8(const int8_t *w, const int8_t *q, const float *sc, int n) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < n / QB; c++) {
        const int8_t *wc = w + c * QB, *qc = q + c * QB;
        PREFETCH(wc);
        PREFETCH(wc + 64);
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(_mm512_loadu_si512(wc), flip),
                                        _mm512_loadu_si512(qc));
        s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(_mm512_loadu_si512(wc + 64), flip), _mm512_loadu_si512(qc + 64));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sc[c]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* int4 row: 64 packed bytes = one block of 128 inputs (low nibbles: even inputs, high: odd); returns
 * Σ_c s_g(c)·sc[c]·Σ (w+8)·q  minus  8·Σ_c s_g(c)·ts[c], i.e. the exact Σ w·q with both scales. */
static inline float idot_i4(const uint8_t *w, const float *s, int G, const int8_t *qe, const int8_t *qo,
                            const float *sc, const float *ts, int n) {
    const __m512i m = _mm512_set1_epi8(15);
    __m512 acc = _mm512_setzero_ps();
    float corr = 0.f;
    for (int g = 0, c = 0; g < n / G; g++) {
        for (int c1 = c + G / QB; c < c1; c++) {
            __m512i b = _mm512_loadu_si512(w + c * (QB / 2));
            PREFETCH(w + c * (QB / 2));
            __m512i lo = _mm512_and_si512(b, m), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(qe + c * (QB / 2)));
            d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(qo + c * (QB / 2)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s[g] * sc[c]), acc);
            corr += s[g] * ts[c];
        }
    }
    return _mm512_reduce_add_ps(acc) - 8.f * corr;
}
#else
static inline float idot_i8(const int8_t *w, const int8_t *q, const float *sc, int n) {
    float acc = 0.f;
    for (int c = 0; c < n / QB; c++) {
        int32_t s = 0;
        PREFETCH(w + c * QB);
#pragma omp simd reduction(+ : s)
        for (int j = c * QB; j < (c + 1) * QB; j++) s += (int32_t)(uint8_t)(w[j] ^ 0x80) * q[j];
        acc += sc[c] * (float)s;
    }
    return acc;
}

static inline float idot_i4(const uint8_t *w, const float *s, int G, const int8_t *qe, const int8_t *qo,
                            const float *sc, const float *ts, int n) {
    float acc = 0.f, corr = 0.f;
    for (int g = 0, c = 0; g < n / G; g++) {
        for (int c1 = c + G / QB; c < c1; c++) {
            int32_t d = 0;
            PREFETCH(w + c * (QB / 2));
#pragma omp simd reduction(+ : d)
            for (int j = c * (QB / 2); j < (c + 1) * (QB / 2); j++) d += (w[j] & 15) * qe[j] + (w[j] >> 4) * qo[j];
            acc += s[g] * sc[c] * (float)d;
            corr += s[g] * ts[c];
        }
    }
    return acc - 8.f * corr;
}
#endif

/* Quantize one activation vector x[n] for IDOT: q (int4: even inputs then odd ones), block scales, ts;
 * returns Σ_c ts[c] (the int8 path's offset term). */
static float quantize_act(const float *x, int n, int split, int8_t *q, float *sc, float *ts) {
    float total = 0.f;
    for (int c = 0; c < n / QB; c++) {
        float amax = 0.f;
        for (int j = c * QB; j < (c + 1) * QB; j++) amax = fmaxf(amax, fabsf(x[j]));
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int j = c * QB; j < (c + 1) * QB; j++) {
            int v = (int)lrintf(x[j] * inv);
            v = v > 127 ? 127 : v < -127 ? -127 : v;
            q[split ? (j & 1) * (n / 2) + j / 2 : j] = (int8_t)v;
            sum += v;
        }
        sc[c] = s;
        ts[c] = s * (float)sum;
        total += ts[c];
    }
    return total;
}
