/* The tiles' results into the output rows (amx.h, amx_i4.h). */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* A finished tile t[i][m] (row at + i, vector m) into out: row pairs[m] of out gets R floats a pair, 16 of them
 * here, for the first nv vectors; sw (int8: row scales) and off (the vectors' storage-offset shares) rescale it.
 * Why transposed in registers: the 256 scattered scalar stores cost bf16's T=512 call 15% (2-core dev machine,
 * 2026-12-06; benchmarks/HISTORY.md); 16 rows × 16 registers, three shuffle rounds, 16 vector stores instead. */
#if defined(__AVX512F__)
static inline void transpose16(__m512 r[16]) {   /* r[i] = row i → r[m] = column m */
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

static inline void put_tile(float t[16][16], int nv, const int *pairs, int R, int at, const float *sw,
                            const float *off, float *out) {
    __m512 v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_load_ps(t[i]);
    transpose16(v);
    __m512 s = sw ? _mm512_loadu_ps(sw + at) : _mm512_setzero_ps();
    for (int m = 0; m < nv; m++)
        _mm512_storeu_ps(out + (size_t)pairs[m] * R + at,
                         sw ? _mm512_mul_ps(s, _mm512_sub_ps(v[m], _mm512_set1_ps(off[m]))) : v[m]);
}
#else
static inline void put_tile(float t[16][16], int nv, const int *pairs, int R, int at, const float *sw,
                            const float *off, float *out) {
    for (int m = 0; m < nv; m++) {
        float *o = out + (size_t)pairs[m] * R + at;
        for (int i = 0; i < 16; i++) o[i] = sw ? sw[at + i] * (t[i][m] - off[m]) : t[i][m];
    }
}
#endif
