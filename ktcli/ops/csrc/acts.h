/* Activation preparation for the CPU expert kernel's integer dot products (dots.h): quantization to int8 per
 * block of QB inputs, and the vectorizable exp behind SiLU. */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Quantize one activation vector x[n] for IDOT: q (int4: even inputs then odd ones), block scales sc, and per
 * block the accumulator's starting value init[c] (16 int32 lanes): −offset·Σq over the block in lane 0, so that
 * the dot products of weights stored with an offset (w + offset, unsigned) come out as Σ w·q directly. */
static void quantize_act(const float *x, int n, int split, int offset, int8_t *q, float *sc, int32_t *init) {
    int8_t tmp[QB];
    for (int c = 0; c < n / QB; c++) {
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
        memset(init + c * 16, 0, 64);
        init[c * 16] = -offset * sum;
    }
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
