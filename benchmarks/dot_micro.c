/* Compute cost of the CPU kernel's row dot products, one core, weights L2-resident (no DRAM): ns per 64 bytes
 * of weights for each path and vectors-per-pass nt, plus int4 variants under study. Tells whether a path can
 * consume weights faster than DRAM delivers them per core (DRAM GB/s ÷ cores).
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/dot_micro.c -o /tmp/dot_micro -lm && /tmp/dot_micro
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../ktcli/ops/csrc/dots.h"

#define N 3584            /* inputs per row (Qwen2-57B hidden size) */
#define ROWS 96           /* 96 rows: 336 KiB of int8 weights, 172 KiB of int4 (L2-resident) */

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static int8_t q[NT][N];
static float cs[NT][N / QB];
static float sink;

#if HAS_VNNI
/* int4 variant: the high nibbles moved down with one GF(2) affine instruction (bit matrix) instead of shift + and */
INL void i4_gf2(const uint8_t *w, const int8_t *const *qq, const float *const *sc_, int n, float *res, int nt) {
    const __m512i m = _mm512_set1_epi8(15);
    const __m512i shr4 = _mm512_set1_epi64(0x1020408000000000LL);   /* out bit i = in bit i+4 (i < 4), 0 above */
    __m512 acc[NT][2];
    for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
#define G_STEP(cc, a) do { \
        __m512i b = _mm512_loadu_si512(w + (cc) * (QB / 2)); \
        __m512i lo = _mm512_and_si512(b, m), hi = _mm512_gf2p8affine_epi64_epi8(b, shr4, 0); \
        for (int t = 0; t < nt; t++) { \
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(qq[t] + (cc) * (QB / 2))); \
            d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(qq[t] + n / 2 + (cc) * (QB / 2))); \
            acc[t][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sc_[t][cc]), acc[t][a]); } } while (0)
    BLOCK_PAIRS(n, G_STEP);
    for (int t = 0; t < nt; t++) res[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}
/* int4 without the float step per block (int32 sums only; a wrong answer, for the cost split) */
INL void i4_int(const uint8_t *w, const int8_t *const *qq, const float *const *sc_, int n, float *res, int nt) {
    const __m512i m = _mm512_set1_epi8(15);
    __m512i acc[NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_si512();
    for (int cc = 0; cc < n / QB; cc++) {
        __m512i b = _mm512_loadu_si512(w + cc * (QB / 2));
        __m512i lo = _mm512_and_si512(b, m), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
        for (int t = 0; t < nt; t++) {
            acc[t] = _mm512_dpbusd_epi32(acc[t], lo, _mm512_loadu_si512(qq[t] + cc * (QB / 2)));
            acc[t] = _mm512_dpbusd_epi32(acc[t], hi, _mm512_loadu_si512(qq[t] + n / 2 + cc * (QB / 2)));
        }
    }
    for (int t = 0; t < nt; t++) res[t] = (float)_mm512_reduce_add_epi32(acc[t]) * sc_[t][0];
}
static void idot_i4_int(const uint8_t *w, const int8_t *const *qq, const float *const *sc_, int n, float *res, int nt) {
    NT_DISPATCH(i4_int, nt, w, qq, sc_, n, res)
}
static void idot_i4_gf2(const uint8_t *w, const int8_t *const *qq, const float *const *sc_, int n, float *res, int nt) {
    NT_DISPATCH(i4_gf2, nt, w, qq, sc_, n, res)
}
#endif

int main(void) {
    pf_bytes = 0;   /* L2-resident: prefetching would only add instructions */
    uint8_t *w = aligned_alloc(64, (size_t)ROWS * N * 2);
    for (size_t i = 0; i < (size_t)ROWS * N * 2; i++) w[i] = (uint8_t)rand();
    const int8_t *qp[NT];
    const float *cp[NT];
    const uint16_t *xb[NT];
    for (int t = 0; t < NT; t++) {
        for (int j = 0; j < N; j++) q[t][j] = (int8_t)(rand() % 255 - 127);
        for (int c = 0; c < N / QB; c++) cs[t][c] = 1e-3f;
        qp[t] = q[t], cp[t] = cs[t], xb[t] = (const uint16_t *)q[t];   /* bf16 activations: any bits will do */
    }
#if HAS_VNNI
    float a[NT], b[NT];
    idot_i4(w, qp, cp, N, a, 2);
    idot_i4_gf2(w, qp, cp, N, b, 2);
    printf("int4 variants agree: %s (%g %g)\n", a[0] == b[0] && a[1] == b[1] ? "yes" : "NO", a[0], b[0]);
#endif
    const char *names[] = {"bf16", "int8", "int4", "int4-gf2p8", "int4-intonly"};
    printf("%-11s %3s %11s %13s\n", "path", "nt", "ns/64B", "GB/s/core");
    int have[5] = {HAS_DPBF16, HAS_VNNI, HAS_VNNI, HAS_VNNI, HAS_VNNI};
    for (int path = 0; path < 5; path++) {
        if (!have[path]) { printf("%-11s n/a on this CPU\n", names[path]); continue; }
        for (int nt = 1; nt <= NT; nt *= 2) {
            double best = 1e9;
            size_t row_bytes = path == 0 ? N * 2 : path == 1 ? N : N / 2;
            for (int rep = 0; rep < 7; rep++) {
                double t0 = now();
                for (int it = 0; it < 200; it++)
                    for (int r = 0; r < ROWS; r++) {
                        float res[NT];
                        const uint8_t *row = w + r * row_bytes;
#if HAS_DPBF16
                        if (path == 0) dot_bf16_dp((const uint16_t *)row, xb, N, res, nt);
#endif
#if HAS_VNNI
                        if (path == 1) idot_i8(row, qp, cp, N, res, nt);
                        if (path == 2) idot_i4(row, qp, cp, N, res, nt);
                        if (path == 3) idot_i4_gf2(row, qp, cp, N, res, nt);
                        if (path == 4) idot_i4_int(row, qp, cp, N, res, nt);
#endif
                        sink += res[0];
                    }
                double dt = now() - t0;
                best = dt < best ? dt : best;
            }
            double per = best / (200.0 * ROWS * row_bytes / 64);
            printf("%-11s %3d %11.2f %13.1f\n", names[path], nt, per * 1e9, 64 / per / 1e9);
        }
    }
    (void)quantize_act, (void)xb, (void)qp, (void)cp;
    return sink == 12345.f;
}
