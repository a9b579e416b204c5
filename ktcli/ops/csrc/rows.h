/* One expert's weight rows against the input vectors routed to it, in the matrix's format and dot path
 * (dots.h), for the CPU expert kernel (moe_cpu.c). */

typedef struct {
    int fmt, G, path;
    const void *w;       /* [E, R, C] in the format */
    const float *scale;  /* int8: [E, R]; int4: [E, R, C/G] */
    int amx;             /* experts with a panel column base (ubase ≥ 0) go through AMX tiles (amx.h) */
    const uint32_t *panel;
    const int *ubase;    /* [U] the expert's first panel column (a multiple of 16), or -1 */
} Mat;

/* Rows r0..r1 of expert e (R rows of C inputs) dotted with input vectors v[0..nt), nt ≤ NT: out[p[t] * R + r].
 * Pointers are set up once per block, not per row: a row of int4 weights is only ~30 vector steps. */
static void rows_block(const Mat *m, int e, int r0, int r1, int R, const Acts *a, const int *v, const int *p, int nt,
                       float *out) {
    int C = a->n;
    float res[NT];
    if (m->path == IDOT) {
        const int8_t *q[NT];
        const float *sc[NT], *z[NT], *cs[NT];
        float comb[NT][MAXB] __attribute__((aligned(64)));   /* int4: the row's group scales × block scales */
        float *cw[NT], off[NT];   /* int8: the storage offset's share, the same for every row */
        for (int t = 0; t < nt; t++) {
            size_t vb = (size_t)v[t] * (C / QB);   /* vector t's first block */
            q[t] = a->q + (size_t)v[t] * C, sc[t] = a->sc + vb, z[t] = a->z + vb;
            cs[t] = m->fmt == 1 ? sc[t] : comb[t], cw[t] = comb[t];
            off[t] = 0.f;
            for (int c = 0; m->fmt == 1 && c < C / QB; c++) off[t] += z[t][c];   /* int4: per row, in idot_i4 */
        }
        for (int r = r0; r < r1; r++) {
            size_t row = (size_t)e * R + r;
            if (m->fmt == 1) {
                idot_i8((const uint8_t *)m->w + row * C, q, cs, C, res, nt);
                for (int t = 0; t < nt; t++) out[(size_t)p[t] * R + r] = m->scale[row] * (res[t] - off[t]);
                continue;
            }
            const float *s = m->scale + row * (C / m->G);
            PREFETCH(s);   /* the scales are a second, slower stream: two lines ahead per row */
            PREFETCH(s + 16);
            idot_i4((const uint8_t *)m->w + row * (C / 2), s, m->G / QB, q, sc, z, cw, C, res, nt);
            for (int t = 0; t < nt; t++) out[(size_t)p[t] * R + r] = res[t];
        }
        return;
    }
#if HAS_DPBF16
    if (m->path == DPBF16) {
        const uint16_t *x[NT];
        for (int t = 0; t < nt; t++) x[t] = a->b + (size_t)v[t] * C;
        for (int r = r0; r < r1; r++) {
            dot_bf16_dp((const uint16_t *)m->w + ((size_t)e * R + r) * C, x, C, res, nt);
            for (int t = 0; t < nt; t++) out[(size_t)p[t] * R + r] = res[t];
        }
        return;
    }
#endif
    for (int r = r0; r < r1; r++) {
        size_t row = (size_t)e * R + r;
        for (int t = 0; t < nt; t++) {
            size_t off = (size_t)v[t] * C;
            float y;
            if (m->fmt == 0) y = dot_bf16((const uint16_t *)m->w + row * C, a->f + off, C);
            else if (m->fmt == 1) y = m->scale[row] * dot_i8((const uint8_t *)m->w + row * C, a->f + off, C);
            else y = dot_i4((const uint8_t *)m->w + row * (C / 2), m->scale + row * (C / m->G), a->e + off / 2,
                            a->o + off / 2, C, m->G);
            out[(size_t)p[t] * R + r] = y;
        }
    }
}

/* Rows r0..r1 of unique expert u against every vector routed to it, NT at a time: a block of weights is
 * re-read from L2, not DRAM, for the next NT vectors. */
static void expert_rows(const Mat *m, int R, const Acts *a, int u, int r0, int r1, const int *uniq, const int *start,
                        const int *order, int K, int by_token, float *out) {
    if (m->amx && m->ubase[u] >= 0) {   /* whole blocks of 16 rows in tiles, a tail of fewer below */
        size_t C = a->n, rb = m->fmt == 0 ? C * 2 : m->fmt == 1 ? C : C / 2;   /* weight bytes a row */
        const uint32_t *panel = m->panel + m->ubase[u] / 16 * ((m->fmt == 0 ? C * 2 : C) / 4 * 16);
        const char *we = (const char *)m->w + uniq[u] * R * rb;
        int r16 = r0 + (r1 - r0) / 16 * 16, n = start[u + 1] - start[u];
        if (m->fmt == 2)
            amx_rows_i4((const uint8_t *)we, m->scale + (size_t)uniq[u] * R * (C / m->G), m->G, R, a, panel, n,
                        order + start[u], by_token, K, r0, r16, out);
        else
            amx_rows(m->fmt, we, m->fmt == 1 ? m->scale + (size_t)uniq[u] * R : NULL, R, a, panel, n, order + start[u],
                     by_token, K, r0, r16, out);
        if (r16 == r1) return;
        r0 = r16;
    }
    for (int q0 = start[u]; q0 < start[u + 1]; q0 += NT) {
        int nt = start[u + 1] - q0 < NT ? start[u + 1] - q0 : NT, v[NT];
        for (int t = 0; t < nt; t++) v[t] = by_token ? order[q0 + t] / K : order[q0 + t];
        rows_block(m, uniq[u], r0, r1, R, a, v, order + q0, nt, out);
    }
}

