/* Does the weights' layout bound the AMX tiles when the weights come from DRAM? int8 tile products (the kernel's
 * 2×2 blocking: 32 rows × 32 vectors a block, tdpbusd) over E experts of R rows × C inputs, far larger than the
 * LLC, in two layouts:
 *   rows:   as ktcli stores them, row-major; a step's two A tiles read 32 lines from 32 rows (32 strided streams)
 *   packed: each 32-row block stored step by step, a step's 32 lines contiguous (one sequential stream)
 * Each layout runs with 1..T threads, every thread its own experts, the best of REPS passes over all experts; the
 * result is GB/s of weights and TOPS. Tells whether packing the weights at load would lift the tiles toward the DRAM
 * ceiling (2-core dev machine, 2026-12-06: HISTORY.md).
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/tile_layout.c -o /tmp/tile_layout && /tmp/tile_layout [E] [REPS] [PF] [BLK]
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define R 1536              /* Qwen3-30B gate_up rows */
#define C 2048              /* inputs (int8 bytes a row) */
#define NK (C / 64)         /* 64-byte steps a row */

typedef struct { uint8_t palette, start_row, zero[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileCfg;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static void config(void) {
    TileCfg cfg __attribute__((aligned(64))) = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* One expert: every 32-row block against the two 16-vector panel groups g0, g1 ([NK·16][16] dwords each). */
static int pf_steps = 0;     /* argv[3]: software prefetch this many steps ahead (0: none), both layouts */
static int blk_steps = 0;    /* argv[4]: store and zero the sums every this many steps (ktcli's int8: 2), 0: once */

static void expert(const uint8_t *w, int packed, const uint8_t *g0, const uint8_t *g1, int32_t out[4][16][16]) {
    for (int r = 0; r < R; r += 32) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        const uint8_t *blk = w + (size_t)r * C;      /* packed: the block's NK steps of 32 lines, 2 KiB each */
        for (int kb = 0; kb < NK; kb++) {
            if (pf_steps) {      /* runs on into the next block's rows near the end (both layouts' next bytes) */
                int k2 = kb + pf_steps;
                if (packed) for (int i = 0; i < 32; i++) _mm_prefetch((const char *)blk + (size_t)k2 * 2048 + i * 64, _MM_HINT_T0);
                else for (int i = 0; i < 32; i++)
                    _mm_prefetch((const char *)blk + (size_t)(k2 < NK ? i : 32 + i) * C + (k2 % NK) * 64, _MM_HINT_T0);
            }
            if (packed) {
                _tile_loadd(4, blk + (size_t)kb * 2048, 64);
                _tile_loadd(5, blk + (size_t)kb * 2048 + 1024, 64);
            } else {
                _tile_loadd(4, blk + kb * 64, C);
                _tile_loadd(5, blk + 16 * C + kb * 64, C);
            }
            _tile_loadd(6, g0 + kb * 1024, 64);
            _tile_loadd(7, g1 + kb * 1024, 64);
            _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
            if (blk_steps && (kb + 1) % blk_steps == 0) {     /* the int8 path's per-block integer sums */
                _tile_stored(0, out[0], 64); _tile_stored(1, out[1], 64); _tile_stored(2, out[2], 64); _tile_stored(3, out[3], 64);
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            }
        }
        _tile_stored(0, out[0], 64); _tile_stored(1, out[1], 64); _tile_stored(2, out[2], 64); _tile_stored(3, out[3], 64);
    }
}

int main(int argc, char **argv) {
    int E = argc > 1 ? atoi(argv[1]) : 96, reps = argc > 2 ? atoi(argv[2]) : 5;
    pf_steps = argc > 3 ? atoi(argv[3]) : 0;
    blk_steps = argc > 4 ? atoi(argv[4]) : 0;
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) { fprintf(stderr, "no AMX tile state\n"); return 1; }
    size_t per = (size_t)R * C, bytes = per * E;
    uint8_t *w = aligned_alloc(4096, bytes), *panel = aligned_alloc(64, 2 * NK * 1024);
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)(i * 2654435761u >> 13);
    for (int i = 0; i < 2 * NK * 1024; i++) panel[i] = (uint8_t)(i * 40503u >> 7);
    int maxt = omp_get_max_threads();
    printf("E=%d experts of %d×%d int8 (%.0f MiB), best of %d passes\n", E, R, C, bytes / 1048576.0, reps);
    printf("layout  threads   GB/s   TOPS\n");
    for (int packed = 0; packed < 2; packed++)
        for (int t = 1; t <= maxt; t++) {
            double best = 1e9;
            for (int rep = 0; rep < reps; rep++) {
                double t0 = now();
#pragma omp parallel num_threads(t)
                {
                    int32_t out[4][16][16] __attribute__((aligned(64)));
                    config();
#pragma omp for schedule(static)
                    for (int e = 0; e < E; e++) expert(w + per * e, packed, panel, panel + NK * 1024, out);
                    _tile_release();
                }
                double dt = now() - t0;
                if (dt < best) best = dt;
            }
            printf("%-7s %7d %6.1f %6.2f\n", packed ? "packed" : "rows", t, bytes / best / 1e9,
                   2.0 * R * C * 32 * E / best / 1e12);
        }
    return 0;
}
