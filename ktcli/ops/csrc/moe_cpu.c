/* One MoE layer's routed experts on the CPU for a few tokens (decode / small batches), in one parallel region.
 *
 * Memory-bound: each selected expert's weight rows are streamed once and dotted with every token routed to
 * it. Written as plain loops with `omp simd` reductions; built on the running machine with -march=native, so
 * the compiler emits AVX-512 / AVX2 / SSE code for whatever the CPU has.
 *
 * Shapes: T tokens, K top-k, H hidden, I intermediate, P = T*K (token, expert) pairs, U unique experts.
 * Weights: gate_up [E, 2I, H] (gate rows then up rows), down [E, H, I]; formats:
 *   0 bf16, 1 int8 + fp32 scale per row, 2 int4 (two per byte, low nibble first, offset 8) + fp32 scale
 *   per group of G inputs.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16f(uint16_t v) { uint32_t b = (uint32_t)v << 16; float f; memcpy(&f, &b, 4); return f; }
static inline uint16_t f2bf16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (uint16_t)(u >> 16); }

#if defined(__AVX512BF16__)
/* AVX-512 BF16: 32 products per vdpbf16ps, no conversion µops, so the loads keep up with DRAM. The input
 * vector is rounded to bf16 first (the model's activations are bf16 already). */
#include <immintrin.h>
#define HAS_DPBF16 1
static inline float dot_bf16_bf16(const uint16_t *w, const uint16_t *xb, int n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int j = 0;
    for (; j + 64 <= n; j += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(xb + j));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + j + 32), (__m512bh)_mm512_loadu_si512(xb + j + 32));
    }
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; j < n; j++) acc += bf16f(w[j]) * bf16f(xb[j]);
    return acc;
}
#else
#define HAS_DPBF16 0
#endif

int moe_has_dpbf16(void) { return HAS_DPBF16; }

static inline float dot_bf16(const uint16_t *w, const float *x, int n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < n; j++) acc += bf16f(w[j]) * x[j];
    return acc;
}

static inline float dot_i8(const int8_t *w, const float *x, int n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < n; j++) acc += (float)w[j] * x[j];
    return acc;
}

/* xe/xo: the even / odd inputs, so the packed low / high nibbles line up with them. With G a multiple of 16
 * the group's partial sums stay in a vector register and the row needs one horizontal sum (GCC vector
 * extensions, 8 lanes: ymm on AVX2 and AVX-512); other group sizes take the scalar loop. */
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

typedef struct {
    int fmt, G;
    const void *w;       /* [E, R, C] in the format */
    const float *scale;  /* int8: [E, R]; int4: [E, R, C/G] */
} Mat;

/* One output row `r` of expert `e` for token vector x (xe/xo: deinterleaved copies, int4 only). */
static inline float row_dot(const Mat *m, int e, int r, int R, int C, const float *x, const float *xe, const float *xo,
                            const uint16_t *xb) {
    size_t row = (size_t)e * R + r;
#if HAS_DPBF16
    if (m->fmt == 0) return dot_bf16_bf16((const uint16_t *)m->w + row * C, xb, C);
#endif
    if (m->fmt == 0) return dot_bf16((const uint16_t *)m->w + row * C, x, C);
    if (m->fmt == 1) return m->scale[row] * dot_i8((const int8_t *)m->w + row * C, x, C);
    return dot_i4((const uint8_t *)m->w + row * (C / 2), m->scale + row * (C / m->G), xe, xo, C, m->G);
}

static void split(const float *x, float *xe, float *xo, int n) {
    for (int j = 0; j < n / 2; j++) { xe[j] = x[2 * j]; xo[j] = x[2 * j + 1]; }
}

/* scratch: moe_scratch_floats() floats. Returns 0, or -1 for bad arguments. */
int moe_forward(int T, int K, int H, int I, const float *x, const int64_t *idx, const float *wts,
                int fmt, int G, const void *gu, const float *gu_s, const void *dn, const float *dn_s,
                float *out, float *scratch, int threads) {
    int P = T * K;
    if (P > 4096 || (fmt == 2 && (G % 2 || H % G || I % G))) return -1;
    Mat mg = {fmt, G, gu, gu_s}, md = {fmt, G, dn, dn_s};
    /* group pairs by expert: order[] lists pair ids, expert by expert */
    int order[4096], uniq[4096], start[4097], U = 0;
    for (int p = 0; p < P; p++) {
        int seen = 0;
        for (int u = 0; u < U; u++) if (uniq[u] == idx[p]) { seen = 1; break; }
        if (!seen) uniq[U++] = (int)idx[p];
    }
    int n = 0;
    for (int u = 0; u < U; u++) {
        start[u] = n;
        for (int p = 0; p < P; p++) if (idx[p] == uniq[u]) order[n++] = p;
    }
    start[U] = n;
    float *gu_out = scratch;               /* [P, 2I] */
    float *h = gu_out + (size_t)P * 2 * I; /* [P, I] */
    float *y = h + (size_t)P * I;          /* [P, H] */
    float *xe = y + (size_t)P * H;         /* [T, H/2] and xo after it */
    float *xo = xe + (size_t)T * H / 2;
    float *he = xo + (size_t)T * H / 2;    /* [P, I/2] and ho after it */
    float *ho = he + (size_t)P * I / 2;
    uint16_t *xb = (uint16_t *)(ho + (size_t)P * I / 2);  /* [T, H] bf16 copy of x */
    uint16_t *hb = xb + (size_t)T * H + 32;               /* [P, I] bf16 copy of h */
    if (fmt == 0 && HAS_DPBF16) for (size_t k = 0; k < (size_t)T * H; k++) xb[k] = f2bf16(x[k]);
    if (fmt == 2) for (int t = 0; t < T; t++) split(x + (size_t)t * H, xe + (size_t)t * H / 2, xo + (size_t)t * H / 2, H);
#pragma omp parallel num_threads(threads)
    {
        /* phase 1: gate and up rows of every selected expert, contiguous rows per thread */
#pragma omp for schedule(static)
        for (long r = 0; r < (long)U * 2 * I; r++) {
            int u = (int)(r / (2 * I)), row = (int)(r % (2 * I));
            for (int q = start[u]; q < start[u + 1]; q++) {
                int p = order[q], t = p / K;
                gu_out[(size_t)p * 2 * I + row] = row_dot(&mg, uniq[u], row, 2 * I, H, x + (size_t)t * H,
                                                          xe + (size_t)t * H / 2, xo + (size_t)t * H / 2,
                                                          xb + (size_t)t * H);
            }
        }
        /* SiLU(gate) * up */
#pragma omp for schedule(static)
        for (long k = 0; k < (long)P * I; k++) {
            int p = (int)(k / I), i = (int)(k % I);
            float g = gu_out[(size_t)p * 2 * I + i], up = gu_out[(size_t)p * 2 * I + I + i];
            h[k] = g / (1.f + expf(-g)) * up;
            if (fmt == 0 && HAS_DPBF16) hb[k] = f2bf16(h[k]);
        }
        if (fmt == 2) {
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) split(h + (size_t)p * I, he + (size_t)p * I / 2, ho + (size_t)p * I / 2, I);
        }
        /* phase 2: down rows */
#pragma omp for schedule(static)
        for (long r = 0; r < (long)U * H; r++) {
            int u = (int)(r / H), row = (int)(r % H);
            for (int q = start[u]; q < start[u + 1]; q++) {
                int p = order[q];
                y[(size_t)p * H + row] = row_dot(&md, uniq[u], row, H, I, h + (size_t)p * I,
                                                 he + (size_t)p * I / 2, ho + (size_t)p * I / 2, hb + (size_t)p * I);
            }
        }
        /* weighted sum over the K experts of each token */
#pragma omp for schedule(static)
        for (long k = 0; k < (long)T * H; k++) {
            int t = (int)(k / H), j = (int)(k % H);
            float acc = 0.f;
            for (int kk = 0; kk < K; kk++) acc += wts[t * K + kk] * y[(size_t)(t * K + kk) * H + j];
            out[k] = acc;
        }
    }
    return 0;
}

size_t moe_scratch_floats(int T, int K, int H, int I) {
    size_t P = (size_t)T * K;
    return P * (2 * I + I + H) + (size_t)T * H + P * I + ((size_t)T * H + P * I) / 2 + 128;
}

/* Bandwidth probe with the kernel's own thread team and access pattern (each thread streams one contiguous
 * chunk): the roofline's CPU denominator. Returns a checksum so the reads cannot be optimised away. */
uint64_t stream_read(const uint64_t *p, size_t n, int threads) {
    uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (size_t i = 0; i < n; i++) total += p[i];
    return total;
}
