/* AMX bf16 tiles for long chunks (prefill): an expert's weight rows against all the vectors routed to it at once.
 *
 * Why: a row dot product (dots.h) reuses a weight load for at most NT = 4 vectors, so a long chunk is compute-bound
 * at ~1 TFLOP/s on 16 cores; a tile product is 16×16×32 multiply-adds per instruction. Experts with ≥ AMX_MIN
 * pairs take this path; the rest (and decode) keep the row dots.
 *
 * Shapes: the weights are the A tiles as stored, 16 rows × 32 inputs (stride C); the vectors are the B tiles,
 * copied once per call into a panel per expert — 16 vectors a group, laid out [C/2][16] dwords (dword (d, m) =
 * inputs 2d, 2d+1 of the group's vector m, the pair layout tdpbf16ps reads) — so C tile (i, m) = row i · vector m.
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
static __thread int amx_cfg; /* this thread loaded the tile configuration (released at the end of its work) */

__attribute__((constructor)) static void amx_init(void) {
    const char *e = getenv("KTCLI_CPU_AMX");   /* 0 / 1 / 2: the amx knob (A/B runs) */
    if (e) amx_mode = atoi(e);
#if AMX_BUILD
    amx_hw = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#endif
}

static int amx_active(void) { return amx_mode == 2 || (amx_mode == 1 && amx_hw); }

/* Vector column m of a panel group: inputs [d0, d1) as dwords (bf16 pairs) from a bf16 row. */
static inline void panel_put(uint32_t *group, const uint16_t *row, int d0, int d1, int m) {
    const uint32_t *src = (const uint32_t *)row;
    for (int d = d0; d < d1; d++) group[(size_t)d * 16 + m] = src[d];
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

/* c[a·2 + b] = rows [16a, 16a+16) of w · the 16 vectors of group b, over nk steps of 32 inputs; tiles 0-3 hold
 * c, 4-5 the weights, 6-7 the vectors. pf: the next row block, prefetched along (NULL: none). */
static void tiles_hw(const uint16_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int nk,
                     const uint16_t *pf, float c[4][16][16]) {
    amx_config();
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int kb = 0; kb < nk; kb++) {
        if (pf) for (int i = 0; i < 32; i++) _mm_prefetch((const char *)(pf + i * C + kb * 32), _MM_HINT_T0);
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

/* Rows [r0, r1) of expert e's matrix (R rows of C inputs, bf16) against the n vectors of its panel (groups of
 * 16, [C/2][16] dwords each): out[pairs[m] * R + r] for vector m. */
static void amx_rows(const uint16_t *we, int R, int C, const uint32_t *panel, int n, const int *pairs, int r0, int r1,
                     float *out) {
    float c[4][16][16] __attribute__((aligned(64)));
    size_t gsz = (size_t)C / 2 * 16;
    for (int r = r0; r + 16 <= r1; r += 32) {
        int two_r = r + 32 <= r1;
        for (int g = 0; g * 16 < n; g += 2) {
            const uint32_t *g0 = panel + g * gsz, *g1 = (g + 1) * 16 < n ? g0 + gsz : NULL;
            const uint16_t *w = we + (size_t)r * C;
#if AMX_BUILD
            if (amx_hw) tiles_hw(w, C, g0, g1, two_r, C / 32, g == 0 && pf_bytes ? w + 32 * (size_t)C : NULL, c);
            else
#endif
            tiles_c(w, C, g0, g1, two_r, C / 32, c);
            for (int a = 0; a <= two_r; a++)
                for (int b = 0; b < 2 && (g + b) * 16 < n; b++)
                    for (int m = 0; m < 16 && (g + b) * 16 + m < n; m++) {
                        float *o = out + (size_t)pairs[(g + b) * 16 + m] * R + r + 16 * a;
                        for (int i = 0; i < 16; i++) o[i] = c[a * 2 + b][i][m];
                    }
        }
    }
}
