/* Activations for the CPU expert kernel: quantization to int8 per block of QB inputs for the integer dot
 * products (dots.h), the vectorizable exp behind SiLU, each matrix's input vectors prepared for its dot path,
 * and the layout of the scratch buffer that holds them. */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { FLOAT, DPBF16, IDOT };   /* dot paths (dots.h) */

/* Quantize block c (QB inputs) of an activation vector x[n] for IDOT: its int8 values in q (int4: even inputs
 * in q[0, n/2), odd ones in q[n/2, n)), its scale sc[c], and z[c] = offset·sc[c]·Σq: weights are stored with
 * an offset (w + offset, unsigned), and Σ_c sc[c]·Σ(w + offset)·q − Σ_c z[c] = Σ_c sc[c]·Σ w·q (dots.h). */
static void quantize_block(const float *x, int n, int c, int split, int offset, int8_t *q, float *sc, float *z) {
    int8_t tmp[QB];
    const float *xc = x + c * QB;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int j = 0; j < QB; j++) amax = fabsf(xc[j]) > amax ? fabsf(xc[j]) : amax;
    float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < QB; j++) {
        float r = xc[j] * inv;   /* |r| ≤ 127: round half away from zero */
        int v = (int)(r + (r < 0.f ? -0.5f : 0.5f));
        tmp[j] = (int8_t)v;
        sum += v;
    }
    if (split)
        for (int j = 0; j < QB / 2; j++) q[c * QB / 2 + j] = tmp[2 * j], q[n / 2 + c * QB / 2 + j] = tmp[2 * j + 1];
    else
        memcpy(q + c * QB, tmp, QB);
    sc[c] = s;
    z[c] = (float)offset * s * (float)sum;
}

/* exp(x) to about 1 ulp (Cephes expf: x = k·ln2 + r, polynomial in r, 2^k from the exponent bits), in plain
 * arithmetic that gcc vectorizes (libm's expf is a scalar call per element). Out of range, k is clamped: the
 * result is then tiny or huge, and SiLU's 1 + exp(-g) reads it correctly as 1 or ∞. */
static inline float exp_approx(float x) {
    float t = x * 1.44269504088896341f;
    int32_t k = (int32_t)(t + (t < 0.f ? -0.5f : 0.5f));
    k = k < -126 ? -126 : k;
    k = k > 127 ? 127 : k;
    float n = (float)k;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } e = {.i = (k + 127) << 23};
    return p * e.f;
}

/* N input vectors of n floats, prepared for the dot path of the matrix that reads them. */
typedef struct {
    int n, path, split;  /* split: int4 (even / odd inputs apart) */
    float *f;            /* [N, n] fp32 */
    float *e, *o;        /* [N, n/2] even / odd inputs (int4 FLOAT) */
    uint16_t *b;         /* [N, n] bf16 (DPBF16) */
    int8_t *q;           /* [N, n] int8 (IDOT) */
    float *sc;           /* [N, n/QB] block scales (IDOT) */
    float *z;            /* [N, n/QB] the storage offset's share of each block (IDOT) */
} Acts;

/* Inputs [j0, j1) of vector v (j0 a multiple of QB; j1 too, or n) prepared for the dot path: pieces of a
 * vector go to different threads. */
static void prep(Acts *a, int v, int j0, int j1) {
    const float *x = a->f + (size_t)v * a->n;
    int n = a->n;
    if (a->path == DPBF16) for (int j = j0; j < j1; j++) a->b[(size_t)v * n + j] = f2bf16(x[j]);
    if (a->path == FLOAT && a->split)
        for (int j = j0 / 2; j < j1 / 2; j++) { a->e[(size_t)v * n / 2 + j] = x[2 * j]; a->o[(size_t)v * n / 2 + j] = x[2 * j + 1]; }
    if (a->path == IDOT)
        for (int c = j0 / QB; c < j1 / QB; c++)
            quantize_block(x, n, c, a->split, a->split ? 8 : 128, a->q + (size_t)v * n, a->sc + (size_t)v * (n / QB),
                           a->z + (size_t)v * (n / QB));
}

/* Carves 64-byte aligned pieces out of the scratch buffer (base NULL: just counts the bytes). */
static void *take(char **cur, size_t bytes) {
    char *p = (char *)(((uintptr_t)*cur + 63) & ~(uintptr_t)63);
    *cur = p + bytes;
    return p;
}

static void acts_layout(Acts *a, char **cur, int N, int n, int path, int split) {
    a->n = n, a->path = path, a->split = split;
    a->e = take(cur, (size_t)N * n / 2 * 4), a->o = take(cur, (size_t)N * n / 2 * 4);
    a->b = take(cur, (size_t)N * n * 2 + 64), a->q = take(cur, (size_t)N * n + 64);
    a->sc = take(cur, (size_t)N * (n / QB + 1) * 4), a->z = take(cur, (size_t)N * (n / QB + 1) * 4);
}

/* The pipelined schedule's shared state (moe_cpu.c): task counter, gate/up tasks left per expert, h ready. */
typedef struct { long next; int left[4096], ready[4096]; } Pipe;

/* gpanel / dpanel: the AMX panels of the gate/up and down inputs (amx.h), pcol[p]: pair p's panel column or -1 */
typedef struct { float *x32, *gu_out, *h, *y; Acts xa, ha; Pipe *pipe; uint32_t *gpanel, *dpanel; int *pcol, damx; } Scratch;

static size_t layout(Scratch *s, char *base, int T, int K, int H, int I, int gpath, int dpath, int fmt) {
    char *cur = base;
    size_t P = (size_t)T * K;
    s->x32 = take(&cur, (size_t)T * H * 4);  /* [T, H] the input in fp32 */
    s->gu_out = take(&cur, P * 2 * I * 4);   /* [P, 2I] */
    s->h = take(&cur, P * I * 4);            /* [P, I] */
    s->y = take(&cur, P * H * 4);            /* [P, H] */
    acts_layout(&s->xa, &cur, T, H, gpath, fmt == 2);
    acts_layout(&s->ha, &cur, (int)P, I, dpath, fmt == 2);
    s->xa.f = s->x32, s->ha.f = s->h;
    s->pipe = take(&cur, sizeof(Pipe));
    s->gpanel = take(&cur, 2 * P * H * 2);   /* ≤ 2P columns: only experts with ≥ AMX_MIN pairs, padded to 16 */
    s->dpanel = take(&cur, 2 * P * I * 2);
    s->pcol = take(&cur, P * sizeof(int));
    return (size_t)(cur - base) + 64;
}

