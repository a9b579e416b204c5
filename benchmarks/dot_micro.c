/* Compute cost of the CPU kernel's row dot products, one core, weights L2-resident (no DRAM): ns per 64 bytes
 * of weights for each path and vectors per pass nt. Tells whether a path can
 * consume weights faster than DRAM delivers them per core (DRAM GB/s ÷ cores). Measured on the H100 host
 * (benchmarks/README.md): int4's nibble unpack with a GF(2) affine instruction instead of shift + mask cut its
 * cost per block at nt=1 from 2.48 to 2.10 ns.
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/dot_micro.c -o /tmp/dot_micro -lm && /tmp/dot_micro
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../ktcli/ops/csrc/dots.h"

#ifndef N
#define N 3584            /* inputs per row (Qwen2-57B hidden size); -DN=14336 -DROWS=24: the cost per row */
#define ROWS 96           /* 96 rows: 336 KiB of int8 weights, 172 KiB of int4 (L2-resident) */
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static int8_t q[NT][N];
static uint16_t xbf[NT][N];
static float cs[NT][N / QB], comb[NT][(N / QB + 15) / 16 * 16] __attribute__((aligned(64))), wscale[N / QB];
static float z[NT][N / QB];
static float sink;

int main(void) {
    pf_bytes = 0;   /* L2-resident: prefetching would only add instructions */
    uint8_t *w = aligned_alloc(64, (size_t)ROWS * N * 2);
    for (size_t i = 0; i < (size_t)ROWS * N * 2; i++) w[i] = (uint8_t)rand();
    const int8_t *qp[NT];
    const float *cp[NT], *zp[NT];
    float *cw[NT];
    const uint16_t *xb[NT];
    for (int t = 0; t < NT; t++) {
        for (int j = 0; j < N; j++) q[t][j] = (int8_t)(rand() % 255 - 127);
        for (int c = 0; c < N / QB; c++) cs[t][c] = 1e-3f;
        for (int j = 0; j < N; j++) xbf[t][j] = f2bf16((float)q[t][j] / 64.f);
        qp[t] = q[t], cp[t] = cs[t], xb[t] = xbf[t], cw[t] = comb[t], zp[t] = z[t];
    }
    const char *names[] = {"bf16", "int8", "int4"};
    printf("%-11s %3s %11s %13s\n", "path", "nt", "ns/64B", "GB/s/core");
    int have[3] = {HAS_DPBF16, HAS_VNNI, HAS_VNNI};
    for (int path = 0; path < 3; path++) {
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
                        if (path == 2) {   /* as the kernel does per row: fold the scales, then the dots */
                            idot_i4(row, wscale, 1, qp, cp, zp, cw, N, res, nt);
                        }
#endif
                        for (int t = 0; t < nt; t++) sink += res[t];   /* every vector's result is used */
                    }
                double dt = now() - t0;
                best = dt < best ? dt : best;
            }
            double per = best / (200.0 * ROWS * row_bytes / 64);
            printf("%-11s %3d %11.2f %13.1f\n", names[path], nt, per * 1e9, 64 / per / 1e9);
        }
    }
    (void)xb, (void)qp, (void)cp, (void)cw, (void)zp;
    free(w);
    return sink == 12345.f;
}
