/* Row dot products for the CPU expert kernel: one per weight format and instruction set.
 *
 * Each returns Σ_j w[j]·x[j] for one weight row of n inputs, streamed once from DRAM. Paths:
 *   FLOAT  weights converted to fp32 in registers (any CPU; `omp simd` lets gcc pick AVX-512/AVX2/SSE)
 *   DPBF16 bf16 weights × bf16-rounded activations with vdpbf16ps (AVX-512 BF16)
 *   IDOT   int8/int4 weights × int8-quantized activations with vpdpbusd (AVX-512 VNNI); a plain-C twin with the
 *          same integer arithmetic runs where VNNI is missing, so CI tests this path's logic too.
 * IDOT activations are quantized per block of QB=128 inputs (scale = absmax/127). vpdpbusd multiplies unsigned
 * by signed bytes, so weights are stored unsigned — int8 as w+128, int4 as its nibble w+8 — and the offset is
 * taken back with the block sums Σq: Σ(w+o)q = Σwq + o·Σq.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QB 128
#define MAXB 256   /* IDOT rows up to MAXB blocks of QB inputs (32768) */
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
static int pf_bytes = 4096;
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

static inline float dot_i8(const uint8_t *w, const float *x, int n) {   /* w: offset-binary, w+128 */
    float acc = 0.f;
    for (int j0 = 0; j0 < n; j0 += 64) {
        PREFETCH(w + j0);
        int j1 = j0 + 64 < n ? j0 + 64 : n;
#pragma omp simd reduction(+ : acc)
        for (int j = j0; j < j1; j++) acc += (float)((int)w[j] - 128) * x[j];
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

/* ---- Fast paths: one pass over a weight row serves up to NT vectors (tokens routed to the same expert), so
 * weights are loaded and unpacked once. Written for a constant nt (always_inline + NT_DISPATCH), which keeps the
 * per-vector accumulators in registers. ---- */
#define NT 4
#define INL static inline __attribute__((always_inline))
#define NT_DISPATCH(fn, nt, ...) switch (nt) { \
    case 1: fn(__VA_ARGS__, 1); break; case 2: fn(__VA_ARGS__, 2); break; \
    case 3: fn(__VA_ARGS__, 3); break; default: fn(__VA_ARGS__, 4); }

#if HAS_DPBF16
/* bf16 weights × bf16 activations: 32 products per vdpbf16ps, no conversion µops. */
INL void dp_bf16(const uint16_t *w, const uint16_t *const *x, int n, float *res, int nt) {
    __m512 a[NT][2];
    for (int t = 0; t < nt; t++) a[t][0] = a[t][1] = _mm512_setzero_ps();
    int j = 0;
    for (; j + 64 <= n; j += 64) {
        PREFETCH(w + j);
        PREFETCH(w + j + 32);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + j), w1 = (__m512bh)_mm512_loadu_si512(w + j + 32);
        for (int t = 0; t < nt; t++) {
            a[t][0] = _mm512_dpbf16_ps(a[t][0], w0, (__m512bh)_mm512_loadu_si512(x[t] + j));
            a[t][1] = _mm512_dpbf16_ps(a[t][1], w1, (__m512bh)_mm512_loadu_si512(x[t] + j + 32));
        }
    }
    for (int t = 0; t < nt; t++) {
        float acc = _mm512_reduce_add_ps(_mm512_add_ps(a[t][0], a[t][1]));
        for (int k = j; k < n; k++) acc += bf16f(w[k]) * bf16f(x[t][k]);
        res[t] = acc;
    }
}
static void dot_bf16_dp(const uint16_t *w, const uint16_t *const *x, int n, float *res, int nt) {
    NT_DISPATCH(dp_bf16, nt, w, x, n, res)
}
#endif

/* int4 rows: out[c] = s[c / gb]·sc[c] for the nb blocks of a row (its weight group scales times a vector's block
 * scales), and the storage offset's share of the row's dot product, Σ_c s[c / gb]·z[c] (acts.h) — on AVX-512 in
 * 16 lanes, summed with the row's own lanes (one horizontal sum per row, not two). AVX-512: masked loads,
 * whole-vector stores (out is 64-byte aligned, room for nb rounded up to 16): the block loop reads out[] right
 * away, and a store forwards to those loads only when it is not masked. */
#if defined(__AVX512F__)
INL __m512 block_scales(const float *s, int gb, const float *sc, const float *z, int nb, float *out) {
    __m512 off = _mm512_setzero_ps();
    if (gb == 1) {
        for (int c = 0; c < nb; c += 16) {
            __mmask16 k = nb - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - c)) - 1);
            __m512 sv = _mm512_maskz_loadu_ps(k, s + c);
            _mm512_store_ps(out + c, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, sc + c)));
            off = _mm512_fmadd_ps(sv, _mm512_maskz_loadu_ps(k, z + c), off);
        }
        return off;
    }
    float o = 0.f;
    for (int c = 0; c < nb; c++) out[c] = s[c / gb] * sc[c], o += s[c / gb] * z[c];
    return _mm512_zextps128_ps512(_mm_set_ss(o));
}
#else
static inline float block_scales(const float *s, int gb, const float *sc, const float *z, int nb, float *out) {
    float o = 0.f;
    for (int c = 0; c < nb; c++) out[c] = s[c / gb] * sc[c], o += s[c / gb] * z[c];
    return o;
}
#endif

/* ---- IDOT. q[t]: vector t's int8 values (int4: its even inputs, then its odd ones); cs[t][c]: the scale of
 * block c's products — the activation block scale, times the weight group's scale for int4 (the caller folds
 * them once per row). res[t] = Σ_c cs[t][c]·Σ_{j∈c} (w_j + offset)·q_j: the caller takes the storage offset's
 * share back once per row (acts.h), which keeps a per-block load of it out of the loop. ---- */
#if HAS_VNNI
#if defined(__GFNI__)
/* High nibbles moved down in one GF(2) affine instruction (output bit i = input bit i+4), not a shift and a mask:
 * 15% less compute per int4 block (benchmarks/dot_micro.c). */
#define HI_NIBBLES(b) _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64(0x1020408000000000LL), 0)
#else
#define HI_NIBBLES(b) _mm512_and_si512(_mm512_srli_epi16(b, 4), m)
#endif

/* Block c's two 64-byte weight operands: int8 rows (stored w+128) as they are; int4 rows (64 packed bytes per
 * block of 128 inputs, low nibbles the even inputs, high the odd, stored w+8) split into nibbles. */
INL void wblock(int int4, const uint8_t *w, int c, __m512i *w0, __m512i *w1) {
    if (int4) {
        __m512i b = _mm512_loadu_si512(w + c * 64), m = _mm512_set1_epi8(15);
        PREFETCH(w + c * 64);
        *w0 = _mm512_and_si512(b, m), *w1 = HI_NIBBLES(b);
    } else {
        PREFETCH(w + c * 128); PREFETCH(w + c * 128 + 64);
        *w0 = _mm512_loadu_si512(w + c * 128), *w1 = _mm512_loadu_si512(w + c * 128 + 64);
    }
}
/* A zeroed accumulator per block. gcc copies one zero register into each (a vector-port µop per block and
 * vector); a zeroing xor written out is recognised at register rename and takes no port. */
INL __m512i fresh_zero(const void *tag) {   /* tag: a per-block address, so that gcc cannot merge two of them */
    __m512i z;
    __asm__("vpxord %0, %0, %0" : "=v"(z) : "m"(*(const char *)tag));
    return z;
}
/* Block c's int32 partial sums (16 lanes) for one vector. */
INL __m512i dblock(int int4, __m512i w0, __m512i w1, const int8_t *q, int n, int c) {
    const int8_t *q0 = int4 ? q + c * 64 : q + c * 128, *q1 = int4 ? q + n / 2 + c * 64 : q0 + 64;
    __m512i d = _mm512_dpbusd_epi32(fresh_zero(q0), w0, _mm512_loadu_si512(q0));
    return _mm512_dpbusd_epi32(d, w1, _mm512_loadu_si512(q1));
}
/* int8 (int4 = 0) or int4 (int4 = 1) rows: res[t] = Σ_c cs[t][c]·(block c's integer dot product) − Σ off[t]
 * (off: NULL, or per vector 16 lanes to take away). */
INL void vnni_rows(int int4, const uint8_t *w, const int8_t *const *q, const float *const *cs, int n, float *res,
                   int nt, const __m512 *off) {
    __m512 acc[NT][2];
    for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    int nb = n / QB, c = 0;
    /* two sums (even / odd blocks) keep the multiply-add latency off the critical path */
#define ONE_BLOCK(c, a) do { __m512i w0, w1; \
        wblock(int4, w, c, &w0, &w1); \
        for (int t = 0; t < nt; t++) \
            acc[t][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dblock(int4, w0, w1, q[t], n, c)), \
                                        _mm512_set1_ps(cs[t][c]), acc[t][a]); } while (0)
    for (; c + 2 <= nb; c += 2) { ONE_BLOCK(c, 0); ONE_BLOCK(c + 1, 1); }
    if (c < nb) ONE_BLOCK(c, 0);
    for (int t = 0; t < nt; t++) {
        __m512 sum = _mm512_add_ps(acc[t][0], acc[t][1]);
        res[t] = _mm512_reduce_add_ps(off ? _mm512_sub_ps(sum, off[t]) : sum);
    }
}
INL void vnni_i8(const uint8_t *w, const int8_t *const *q, const float *const *cs, int n, float *res, int nt) {
    vnni_rows(0, w, q, cs, n, res, nt, NULL);
}
/* int4 rows fold their group scales into cs[t] first (block_scales), then take the offset's share away. */
INL void vnni_i4(const uint8_t *w, const float *s, int gb, const int8_t *const *q, const float *const *sc,
                 const float *const *z, float *const *cs, int n, float *res, int nt) {
    __m512 off[NT];
    for (int t = 0; t < nt; t++) off[t] = block_scales(s, gb, sc[t], z[t], n / QB, cs[t]);
    vnni_rows(1, w, q, (const float *const *)cs, n, res, nt, off);
}
/* Inlined into the row loop (rows.h): a call and a re-made constant per row cost ~10% of an int4 row. */
INL void idot_i8(const uint8_t *w, const int8_t *const *q, const float *const *cs, int n, float *res, int nt) {
    NT_DISPATCH(vnni_i8, nt, w, q, cs, n, res)
}
INL void idot_i4(const uint8_t *w, const float *s, int gb, const int8_t *const *q, const float *const *sc,
                 const float *const *z, float *const *cs, int n, float *res, int nt) {
    NT_DISPATCH(vnni_i4, nt, w, s, gb, q, sc, z, cs, n, res)
}
#else
/* Plain-C twins: the same integer arithmetic, one vector at a time. */
static void idot_i8(const uint8_t *w, const int8_t *const *q, const float *const *cs,
                    int n, float *res, int nt) {
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int c = 0; c < n / QB; c++) {
            int32_t d = 0;
            PREFETCH(w + c * QB);
#pragma omp simd reduction(+ : d)
            for (int j = c * QB; j < (c + 1) * QB; j++) d += (int32_t)w[j] * q[t][j];
            acc += cs[t][c] * (float)d;
        }
        res[t] = acc;
    }
}

static void idot_i4(const uint8_t *w, const float *s, int gb, const int8_t *const *q, const float *const *sc,
                    const float *const *z, float *const *cs, int n, float *res, int nt) {
    for (int t = 0; t < nt; t++) {
        const int8_t *qe = q[t], *qo = q[t] + n / 2;
        float acc = -block_scales(s, gb, sc[t], z[t], n / QB, cs[t]);
        for (int c = 0; c < n / QB; c++) {
            int32_t d = 0;
            PREFETCH(w + c * (QB / 2));
#pragma omp simd reduction(+ : d)
            for (int j = c * (QB / 2); j < (c + 1) * (QB / 2); j++) d += (w[j] & 15) * qe[j] + (w[j] >> 4) * qo[j];
            acc += cs[t][c] * (float)d;
        }
        res[t] = acc;
    }
}
#endif
