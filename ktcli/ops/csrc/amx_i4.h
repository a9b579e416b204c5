/* AMX tiles for int4 experts (amx.h's tiles, for fmt 2): each 32-row block of packed nibbles is unpacked once into
 * bytes, the even inputs of a row then the odd ones, as the split int4 activations lie (acts.h), and multiplied with
 * tdpbusd against the int8 activations' panel; each block of QB inputs is rescaled by the row's group scale and the
 * vectors' block scales. Why: int4 took the row dots at T=512 (~1 TFLOP/s on 16 cores); through the tiles a Qwen3
 * layer runs in int8's time (6.85 against 6.58 ms, H100 host, 2026-12-06). Where the CPU or the OS lacks AMX the
 * plain-C twin computes the same tiles (tests). Included after amx.h.
 */
#if AMX_BUILD
/* int4 rows reach the tiles unpacked (unpack_i4, below): row i of C unsigned nibbles, the even inputs then the
 * odd ones, as the split int4 activations lie (acts.h). Block blk of QB inputs is then the two 64-byte steps blk
 * (even) and nblk + blk (odd). Its integer sums are scaled per row by the row's group scale sw and per vector by
 * the block's scale, less the offset's share z: c += sw_i · (d · sc − z). */
static inline void rescale_i4(float c[4][16][16], int32_t d[4][16][16], const float *const *sc, const float *const *z,
                              const float *sw, int ng, int gpb, int blk, int g1, int two_r) {
    for (int t = 0; t < 4; t++) {
        if ((t & 1 && !g1) || (t >= 2 && !two_r)) continue;
        __m512 s = _mm512_loadu_ps(sc[t & 1] + blk * 16), zz = _mm512_loadu_ps(z[t & 1] + blk * 16);
        for (int i = 0; i < 16; i++) {
            __m512 v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_load_si512(d[t][i])), s, zz);
            __m512 w = _mm512_set1_ps(sw[(size_t)(16 * (t >> 1) + i) * ng + blk / gpb]);
            _mm512_store_ps(c[t][i], _mm512_fmadd_ps(v, w, _mm512_load_ps(c[t][i])));
        }
    }
}

static void tiles_i4_hw(const uint8_t *w, long C, const uint32_t *g0, const uint32_t *g1, int two_r, int nblk,
                        const float *const *sc, const float *const *z, const float *sw, int ng, int gpb,
                        float c[4][16][16]) {
    int32_t d[4][16][16] __attribute__((aligned(64)));
    amx_config();
    memset(c, 0, sizeof(float) * 4 * 16 * 16);
    for (int blk = 0; blk < nblk; blk++) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        step_i8(w, C, g0, g1, two_r, blk);              /* the block's even inputs */
        step_i8(w, C, g0, g1, two_r, nblk + blk);       /* and its odd ones */
        _tile_stored(0, d[0], 64); _tile_stored(1, d[1], 64); _tile_stored(2, d[2], 64); _tile_stored(3, d[3], 64);
        rescale_i4(c, d, sc, z, sw, ng, gpb, blk, g1 != NULL, two_r);
    }
}
#endif

/* Rows [r, r + n) of packed int4 (C / 2 bytes a row, low nibble the even input) as nibble bytes, the even inputs
 * of a row then the odd ones: the layout tiles_i4_* read. One row block is unpacked once for all its vectors. */
static void unpack_i4(const uint8_t *src, int C, int n, uint8_t *dst) {
    size_t half = (size_t)C / 2;
    for (int i = 0; i < n; i++) {
        const uint8_t *s = src + i * half;
        uint8_t *lo = dst + (size_t)i * C, *hi = lo + half;
#pragma omp simd
        for (size_t j = 0; j < half; j++) lo[j] = s[j] & 15, hi[j] = s[j] >> 4;
    }
}

/* amx_rows for int4 (fmt 2): rows in blocks of 32, each unpacked once into a thread's buffer, then against every
 * group pair of the panel. swe: expert e's group scales [R, C/G]; the rest as amx_rows. */
static void amx_rows_i4(const uint8_t *we, const float *swe, int G, int R, const Acts *a, const uint32_t *panel,
                        int n, const int *pairs, int by_token, int K, int r0, int r1, float *out) {
    static __thread uint8_t *buf;   /* 32 unpacked rows; a team member keeps it for the next calls */
    static __thread size_t cap;
    float c[4][16][16] __attribute__((aligned(64)));
    int C = a->n, nblk = C / QB, ng = C / G, gpb = G / QB;
    size_t gsz = (size_t)C / 4 * 16;   /* panel group dwords: int8 activations, C bytes a vector */
    if (cap < (size_t)32 * C) {
        free(buf);
        buf = aligned_alloc(64, (size_t)32 * C);
        cap = buf ? (size_t)32 * C : 0;
        if (!buf) return;   /* cannot happen at these sizes (≤ 1 MiB); the rows stay zero rather than crash */
    }
    float scl[2][MAXB * 16] __attribute__((aligned(64))), zs[2][MAXB * 16] __attribute__((aligned(64)));
    for (int r = r0; r + 16 <= r1; r += 32) {
        int two_r = r + 32 <= r1;
        unpack_i4(we + (size_t)r * (C / 2), C, two_r ? 32 : 16, buf);
        const float *sw = swe + (size_t)r * ng;
        for (int g = 0; g * 16 < n; g += 2) {
            const uint32_t *g0 = panel + g * gsz, *g1 = (g + 1) * 16 < n ? g0 + gsz : NULL;
            for (int b = 0; b < 2; b++)
                for (int m = 0; m < 16; m++) {
                    int col = (g + b) * 16 + m, v = col < n ? (by_token ? pairs[col] / K : pairs[col]) : -1;
                    for (int blk = 0; blk < nblk; blk++) {
                        scl[b][blk * 16 + m] = v < 0 ? 0.f : a->sc[(size_t)v * nblk + blk];
                        zs[b][blk * 16 + m] = v < 0 ? 0.f : a->z[(size_t)v * nblk + blk];
                    }
                }
            const float *sc[2] = {scl[0], scl[1]}, *z[2] = {zs[0], zs[1]};
#if AMX_BUILD
            if (amx_hw) tiles_i4_hw(buf, C, g0, g1, two_r, nblk, sc, z, sw, ng, gpb, c);
            else
#endif
            tiles_int_c(buf, C, g0, g1, two_r, nblk, sc, z, sw, ng, gpb, c);
            for (int a2 = 0; a2 <= two_r; a2++)
                for (int b = 0; b < 2 && (g + b) * 16 < n; b++)
                    put_tile(c[a2 * 2 + b], n - (g + b) * 16 < 16 ? n - (g + b) * 16 : 16, pairs + (g + b) * 16, R,
                             r + 16 * a2, NULL, NULL, out);
        }
    }
}

