/* AMX tiles for long chunks (prefill): an expert's weight rows against all the vectors routed to it at once.
 *
 * Why: a row dot product (dots.h) reuses a weight load for at most NT = 4 vectors, so a long chunk is compute-bound
 * at ~1 TFLOP/s on 16 cores; a tile product is 16×16×32 multiply-adds per instruction. Experts with ≥ AMX_MIN
 * pairs take this path; the rest (and decode) keep the row dots.
 *
 * Shapes: the weights are the A tiles as stored, 16 rows × 64 bytes (bf16: 32 inputs, int8: 64; stride one row);
 * the vectors are the B tiles, copied once per call into a panel per expert — 16 vectors a group, laid out
 * [C·bytes/4][16] dwords (dword (d, m) = the d-th 4 bytes of the group's vector m: the bf16 pairs tdpbf16ps reads,
 * the int8 quads of tdpbusd) — so C tile (i, m) = row i · vector m. int8 rows (stored w+128) meet the int8
 * activations of the IDOT path (acts.h): integer sums per block of QB inputs, scaled per vector and block; int4
 * rows are unpacked to bytes first (amx_i4.h).
 * Where the CPU or the OS lacks AMX a plain-C twin computes the same tiles (tests run the layout logic on CI).
 */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#define AMX_BUILD 1
#else
#define AMX_BUILD 0
#endif
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MIN 8            /* pairs of an expert from which its rows go through tiles */
static int amx_hw;           /* the build has AMX and the OS granted the tile state (arch_prctl) */
static int amx_mode = 1;     /* 0 off, 1 where amx_hw, 2 everywhere (the twin where no AMX: tests) */
static int amx_pf = 0;       /* how the tiles prefetch weight rows (prefetch_rows below) */
static __thread int amx_cfg; /* this thread loaded the tile configuration (released at the end of its work) */

__attribute__((constructor)) static void amx_init(void) {
    const char *e = getenv("KTCLI_CPU_AMX");   /* 0 / 1 / 2: the amx knob (A/B runs) */
    if (e) amx_mode = atoi(e);
    if ((e = getenv("KTCLI_CPU_AMX_PF"))) amx_pf = atoi(e);   /* 0 / 1 / 2: the tiles' row prefetch (A/B runs) */
#if AMX_BUILD
    amx_hw = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#endif
}

static int amx_active(void) { return amx_mode == 2 || (amx_mode == 1 && amx_hw); }

/* A whole panel group from its vectors' rows src[0..nv) (nv ≤ 16; the rest of the group left as it is), written
 * line by line: each dword row d of the group is one 64-byte line. */
static inline void panel_group(uint32_t *group, const uint32_t *const *src, int nv, int nd) {
    for (int d = 0; d < nd; d++)
        for (int m = 0; m < nv; m++) group[(size_t)d * 16 + m] = src[m][d];
}

/* Vector column m of a panel group: dwords [d0, d1) of a row (bf16 pairs or int8 quads). */
static inline void panel_put(uint32_t *group, const void *row, int d0, int d1, int m) {
    const uint32_t *src = (const uint32_t *)row;
    for (int d = d0; d < d1; d++) group[(size_t)d * 16 + m] = src[d];
}

/* Vector v of a as a panel reads it: its bf16 row (DPBF16) or int8 row (IDOT), and its length in dwords (*nd). */
static inline const void *panel_src(const Acts *a, int v, int *nd) {
    *nd = a->path == DPBF16 ? a->n / 2 : a->n / 4;
    return a->path == DPBF16 ? (const void *)(a->b + (size_t)v * a->n) : (const void *)(a->q + (size_t)v * a->n);
}

#if AMX_BUILD
typedef struct { uint8_t palette, start_row, zero[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileCfg;

static void amx_config(void) {
    if (amx_cfg) return;
    TileCfg cfg __attribute__((aligned(64))) = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    amx_cfg = 1;
}

/* Weight rows come straight from DRAM into tile loads, 32 rows (streams) at a time. amx_pf 0: each step prefetches
 * the rows' bytes pd = pf_bytes / 512 steps ahead (4096: 8 steps, 512 bytes a row), running on into the next
 * block's rows (pf; NULL: none) near the end. amx_pf 1: the next block, 32 consecutive rows and so one contiguous
 * region, is swept into L2 in address order, 32 lines a step (one DRAM stream, not 32 strided ones); a block that
 * no earlier one swept (`cold`: a task's first) also gets the lookahead of mode 0 for itself. amx_pf 2: mode 0's
 * lookahead into L2 only (T1), where the core's 16 line-fill buffers do not bound the lines in flight. */
static inline void prefetch_rows(const char *w, const char *pf, long rb, int kb, int nk, int step, int cold) {
    if (amx_pf == 1 && pf) {
        const char *next = pf + (size_t)kb * 32 * step;   /* 32·rb bytes over nk steps: 32 lines a step */
        for (int i = 0; i < 32; i++) _mm_prefetch(next + i * 64, _MM_HINT_T1);
        if (!cold) return;
    }
    int pd = pf_bytes / 512 > 0 ? pf_bytes / 512 : 1;
    const char *base = kb + pd < nk ? w + (size_t)(kb + pd) * step
                     : pf && amx_pf != 1 ? pf + (size_t)(kb + pd - nk) * step : NULL;
    if (base && amx_pf == 2) for (int i = 0; i < 32; i++) _mm_prefetch(base + i * rb, _MM_HINT_T1);
    else if (base) for (int i = 0; i < 32; i++) _mm_prefetch(base + i * rb, _MM_HINT_T0);
}

/* c[a·2 + b] = rows [16a, 16a+16) of w · the 16 vectors of group b, over nk steps of 32 inputs; tiles 0-3 hold
 * c, 4-5 the weights, 6-7 the vectors. pf: the next row block (NULL: none). */
static void tiles_hw(const uint16_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int nk,
                     const uint16_t *pf, int cold, float c[4][16][16]) {
    amx_config();
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int kb = 0; kb < nk; kb++) {
        if (pf_bytes) prefetch_rows((const char *)w, (const char *)pf, C * 2, kb, nk, 64, cold);
        _tile_loadd(4, w + kb * 32, C * 2);
        _tile_loadd(6, g0 + kb * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (g1) { _tile_loadd(7, g1 + kb * 256, 64); _tile_dpbf16ps(1, 4, 7); }
        if (two_r) {
            _tile_loadd(5, w + 16 * C + kb * 32, C * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (g1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
}

/* Block blk's integer sums d (tiles as stored) into c, each scaled per vector (sc[b] + blk·16: 16 vectors' scales). */
static inline void rescale_i8(float c[4][16][16], int32_t d[4][16][16], const float *const *sc, int blk, int g1,
                              int two_r) {
    for (int t = 0; t < 4; t++) {
        if ((t & 1 && !g1) || (t >= 2 && !two_r)) continue;
        __m512 s = _mm512_loadu_ps(sc[t & 1] + blk * 16);
        for (int i = 0; i < 16; i++)
            _mm512_store_ps(c[t][i], _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(d[t][i])), s,
                                                     _mm512_load_ps(c[t][i])));
    }
}

/* One 64-byte step kb of int8 rows (unsigned, stride C) against one or two panel groups: tiles 0-3 += products. */
static inline void step_i8(const uint8_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int kb) {
    _tile_loadd(4, w + kb * 64, C);
    _tile_loadd(6, g0 + kb * 256, 64);
    _tile_dpbusd(0, 4, 6);
    if (g1) { _tile_loadd(7, g1 + kb * 256, 64); _tile_dpbusd(1, 4, 7); }
    if (two_r) {
        _tile_loadd(5, w + 16 * C + kb * 64, C);
        _tile_dpbusd(2, 5, 6);
        if (g1) _tile_dpbusd(3, 5, 7);
    }
}

/* int8: per block of QB = 128 inputs (two tdpbusd steps of 64) the integer sums are stored and added into c with
 * the block's scale per vector. The previous block's rescale is issued after this block's tile products, so the
 * vector units may scale while the tile unit multiplies (measured no faster at T=512: the rescale is not int8's
 * bound there; benchmarks/HISTORY.md, 2026-12-06). */
static void tiles_i8_hw(const uint8_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int nblk,
                        const float *const *sc, const uint8_t *pf, int cold, float c[4][16][16]) {
    int32_t d[4][16][16] __attribute__((aligned(64)));
    amx_config();
    memset(c, 0, sizeof(float) * 4 * 16 * 16);
    for (int blk = 0; blk < nblk; blk++) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int kb = 2 * blk; kb < 2 * blk + 2; kb++) {
            if (pf_bytes) prefetch_rows((const char *)w, (const char *)pf, C, kb, 2 * nblk, 64, cold);
            step_i8(w, C, g0, g1, two_r, kb);
        }
        if (blk) rescale_i8(c, d, sc, blk - 1, g1 != NULL, two_r);
        _tile_stored(0, d[0], 64); _tile_stored(1, d[1], 64); _tile_stored(2, d[2], 64); _tile_stored(3, d[3], 64);
    }
    rescale_i8(c, d, sc, nblk - 1, g1 != NULL, two_r);
}
#endif

static void amx_release(void) {
#if AMX_BUILD
    if (amx_cfg) _tile_release();
#endif
    amx_cfg = 0;
}

/* The twin: the same tiles in plain C (fp32 sums of bf16 products). */
static void tiles_c(const uint16_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int nk,
                    float c[4][16][16]) {
    memset(c, 0, sizeof(float) * 4 * 16 * 16);
    for (int a = 0; a <= two_r; a++)
        for (int b = 0; b < (g1 ? 2 : 1); b++) {
            const uint32_t *g = b ? g1 : g0;
            for (int i = 0; i < 16; i++) {
                const uint16_t *row = w + (size_t)(16 * a + i) * C;
                for (int m = 0; m < 16; m++) {
                    float acc = 0.f;
                    for (int d = 0; d < nk * 16; d++) {
                        uint32_t v = g[(size_t)d * 16 + m];
                        acc += bf16f(row[2 * d]) * bf16f((uint16_t)v) + bf16f(row[2 * d + 1]) * bf16f((uint16_t)(v >> 16));
                    }
                    c[a * 2 + b][i][m] = acc;
                }
            }
        }
}

/* The integer twin (int8, and int4 through amx_i4.h): per block blk of QB inputs, the integer sums of its dwords
 * (int8: the block's 32; int4, sw given: 16 of even inputs at blk, 16 of odd ones at nblk + blk), scaled as the
 * tiles scale them: int8 sc·d, int4 sw(row, group)·(sc·d − z). */
static void tiles_int_c(const uint8_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int nblk,
                        const float *const *sc, const float *const *z, const float *sw, int ng, int gpb,
                        float c[4][16][16]) {
    int i4 = sw != NULL;
    memset(c, 0, sizeof(float) * 4 * 16 * 16);
    for (int a = 0; a <= two_r; a++)
        for (int b = 0; b < (g1 ? 2 : 1); b++) {
            const uint32_t *g = b ? g1 : g0;
            for (int i = 0; i < 16; i++)
                for (int m = 0; m < 16; m++) {
                    float acc = 0.f;
                    for (int blk = 0; blk < nblk; blk++) {
                        int32_t dsum = 0;
                        for (int h = 0; h <= i4; h++)
                            for (int d = i4 ? (h ? nblk + blk : blk) * 16 : blk * 32, d1 = d + (i4 ? 16 : 32);
                                 d < d1; d++) {
                                uint32_t v = g[(size_t)d * 16 + m];
                                for (int j = 0; j < 4; j++)
                                    dsum += (int32_t)w[(size_t)(16 * a + i) * C + 4 * d + j] * (int8_t)(v >> (8 * j));
                            }
                        float s = (float)dsum * sc[b][blk * 16 + m];
                        acc += i4 ? sw[(size_t)(16 * a + i) * ng + blk / gpb] * (s - z[b][blk * 16 + m]) : s;
                    }
                    c[a * 2 + b][i][m] = acc;
                }
        }
}

#include "put_tile.h"

/* Rows [r0, r1) of expert e's matrix (R rows of C inputs; bf16, or int8 with the activations' block scales)
 * against the n vectors of its panel (groups of 16): out[pairs[m] * R + r] for vector m. v[m]: vector m's row in
 * a (int8: its block scales and offset share); sw: int8 row scales of expert e. */
static void amx_rows(int fmt, const void *we, const float *sw, int R, const Acts *a, const uint32_t *panel, int n,
                     const int *pairs, int by_token, int K, int r0, int r1, float *out) {
    float c[4][16][16] __attribute__((aligned(64)));
    int C = a->n, nblk = C / QB;
    size_t rb = fmt == 0 ? (size_t)C * 2 : (size_t)C, gsz = rb / 4 * 16;   /* row bytes, panel group dwords */
    float scl[2][MAXB * 16] __attribute__((aligned(64)));   /* int8: [block][16 vectors] scales of two groups */
    float off[2][16];                                        /* int8: Σ_c z, the storage offset's share */
    for (int g = 0; g * 16 < n; g += 2) {
        const uint32_t *g0 = panel + g * gsz, *g1 = (g + 1) * 16 < n ? g0 + gsz : NULL;
        for (int b = 0; fmt == 1 && b < 2; b++)
            for (int m = 0; m < 16; m++) {
                int col = (g + b) * 16 + m, v = col < n ? (by_token ? pairs[col] / K : pairs[col]) : -1;
                off[b][m] = 0.f;
                for (int blk = 0; blk < nblk; blk++) {
                    scl[b][blk * 16 + m] = v < 0 ? 0.f : a->sc[(size_t)v * nblk + blk];
                    off[b][m] += v < 0 ? 0.f : a->z[(size_t)v * nblk + blk];
                }
            }
        const float *sc[2] = {scl[0], scl[1]};
        for (int r = r0; r + 16 <= r1; r += 32) {
            int two_r = r + 32 <= r1;
            const uint8_t *w = (const uint8_t *)we + r * rb, *pf = r + 32 < r1 ? w + 32 * rb : NULL;
            int cold = g == 0 && r == r0;   /* no earlier block of this call swept its rows in */
            (void)pf, (void)cold;           /* the hardware tiles' prefetch only */
#if AMX_BUILD
            if (amx_hw && fmt == 0) tiles_hw((const uint16_t *)w, C, g0, g1, two_r, C / 32, (const uint16_t *)pf, cold, c);
            else if (amx_hw) tiles_i8_hw(w, C, g0, g1, two_r, nblk, sc, pf, cold, c);
            else
#endif
            if (fmt == 0) tiles_c((const uint16_t *)w, C, g0, g1, two_r, C / 32, c);
            else tiles_int_c(w, C, g0, g1, two_r, nblk, sc, NULL, NULL, 0, 1, c);
            for (int a2 = 0; a2 <= two_r; a2++)
                for (int b = 0; b < 2 && (g + b) * 16 < n; b++)
                    put_tile(c[a2 * 2 + b], n - (g + b) * 16 < 16 ? n - (g + b) * 16 : 16, pairs + (g + b) * 16, R,
                             r + 16 * a2, fmt == 0 ? NULL : sw, off[b], out);
        }
    }
}
