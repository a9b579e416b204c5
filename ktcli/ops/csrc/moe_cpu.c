/* One MoE layer's routed experts on the CPU for a few tokens (decode / small batches), in one parallel region.
 *
 * Memory-bound: each selected expert's weight rows are streamed once and dotted with every token routed to
 * it (dot products per format and instruction set: dots.h). Built on the running machine with -march=native.
 *
 * Shapes: T tokens, K top-k, H hidden, I intermediate, P = T*K (token, expert) pairs, U unique experts.
 * Weights: gate_up [E, 2I, H] (gate rows then up rows), down [E, H, I]; formats:
 *   0 bf16, 1 int8 (stored w+128, unsigned) + fp32 scale per row, 2 int4 (two per byte, low nibble first,
 *   offset 8) + fp32 scale per group of G inputs.
 * Activations x [T, H], routing weights [T, K] and out [T, H] are fp32 (io = 0) or bf16 (io = 1).
 */
#define _GNU_SOURCE   /* CPU affinity (team.h) */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "team.h"
#include "dots.h"
#include "acts.h"
#include "amx.h"
#include "amx_i4.h"
#include "rows.h"

static int int_dot = HAS_VNNI;   /* int8/int4 use IDOT (int8 activations) where its sizes fit */
static int chunk_kb = 256;       /* rows handed to threads in chunks of this many KiB of weights (0: static split) */
static int pipelined = 1;        /* one task list for both matrices (1) or two phases with a barrier between (0) */
static double *prof;             /* moe_profile(): per-thread timestamps of the last call, or NULL */

static double secs(void) { return now_ns() * 1e-9; }

/* Timestamps (seconds) of each call from now on: buf[0] the call's entry, buf[1] the team's start, buf[2] the
 * return, then 8 slots per member (T_* below); NULL stops. buf holds 4 + 8 × threads doubles. */
enum { T_START, T_PREP, T_GATE_UP, T_DOWN, T_END };
void moe_profile(double *buf) { prof = buf; }
#define STAMP(id, k) do { if (prof) prof[4 + 8 * (id) + (k)] = secs(); } while (0)

static int path_for(int fmt, int C, int G) {
    if (fmt == 0) return HAS_DPBF16 ? DPBF16 : FLOAT;
    if (int_dot && C % QB == 0 && C / QB <= MAXB && (fmt == 1 || G % QB == 0)) return IDOT;
    return FLOAT;
}

/* Rows per task: about chunk_kb KiB of one matrix's weights, within one expert; AMX_TASK× that in tiles, whose
 * long calls have tasks to spare (Qwen3 layer at T=512, H100 host: 1 MiB tasks 8% faster than 256 KiB for bf16,
 * 6% for int8; benchmarks/results/2026-12-05-h100-cpu-experts-amx-chunks-qwen3-30b-shape.json). */
#define AMX_TASK 4
static long rows_per_task(const Mat *m, int R, int C) {
    size_t row_bytes = m->fmt == 0 ? (size_t)C * 2 : m->fmt == 1 ? (size_t)C : (size_t)C / 2;
    long rpb = (long)(chunk_kb * (m->amx ? AMX_TASK : 1) * 1024L / row_bytes);
    if (m->amx && rpb >= 16) rpb -= rpb % 16;   /* whole tiles of 16 rows */
    return rpb < 1 ? 1 : rpb > R ? R : rpb;
}

/* Task b of a matrix cut into tasks of rpb rows, tpe tasks per expert. */
static void task_rows(const Mat *m, int R, const Acts *a, long b, long rpb, long tpe, const int *uniq,
                      const int *start, const int *order, int K, int by_token, float *out) {
    int u = (int)(b / tpe), r0 = (int)((b % tpe) * rpb), r1 = r0 + rpb < R ? r0 + (int)rpb : R;
    expert_rows(m, R, a, u, r0, r1, uniq, start, order, K, by_token, out);
}

/* Tasks of one matrix: chunk_kb KiB of rows each, or (chunk_kb = 0) one contiguous range of the U·R rows per
 * member, the same rows every call (benchmarks use it to keep weights in each core's L2). */
static long matrix_tasks(const Mat *m, int R, const Acts *a, int U, int n) {
    if (chunk_kb == 0) return n;
    long rpb = rows_per_task(m, R, a->n);
    return U * ((R + rpb - 1) / rpb);
}

/* Every selected expert's rows of one matrix against the vectors routed to it: out[p * R + row] for pair p.
 * Tasks go to members as they free up (*next); each finished task counts in *fin. With chunk_kb = 0 member id
 * takes range id first, then any range left (claimed[]: ranges taken). */
static void matrix_rows(const Mat *m, int R, const Acts *a, int U, const int *uniq, const int *start,
                        const int *order, int K, int by_token, float *out, long *next, long *fin, int *claimed,
                        int id, int n) {
    if (chunk_kb == 0) {
        for (int k = 0; k < n; k++) {
            int r = (id + k) % n;
            if (__atomic_exchange_n(&claimed[r], 1, __ATOMIC_RELAXED)) continue;
            long g, g1;
            split((long)U * R, r, n, &g, &g1);
            while (g < g1) {
                int u = (int)(g / R), r0 = (int)(g % R), r1 = g1 - g < R - r0 ? r0 + (int)(g1 - g) : R;
                expert_rows(m, R, a, u, r0, r1, uniq, start, order, K, by_token, out);
                g += r1 - r0;
            }
            done(fin, 1);
        }
        return;
    }
    long rpb = rows_per_task(m, R, a->n), tpe = (R + rpb - 1) / rpb;
    for (long b; (b = claim(next, U * tpe)) >= 0; done(fin, 1))
        task_rows(m, R, a, b, rpb, tpe, uniq, start, order, K, by_token, out);
}

/* h = SiLU(gate) * up for pair p, prepared for the down rows' dot path; column: also its column of the AMX
 * down panel (the two-phase schedule; the pipelined one writes an expert's panel whole, down_panel). */
static void act_pair(Scratch *s, int p, int I, int column) {
    const float *g = s->gu_out + (size_t)p * 2 * I, *up = g + I;
    float *h = s->h + (size_t)p * I;
#pragma omp simd
    for (int i = 0; i < I; i++) h[i] = g[i] / (1.f + exp_approx(-g[i])) * up[i];
    prep(&s->ha, p, 0, I);
    int c = column && s->damx ? s->pcol[p] : -1, nd;   /* the pair's column in its expert's AMX panel */
    if (c >= 0) {
        const void *row = panel_src(&s->ha, p, &nd);
        panel_put(s->dpanel + (size_t)c / 16 * (nd * 16), row, 0, nd, c % 16);
    }
}

/* Expert u's AMX down panel, group by group, from its n pairs' prepared h (pairs: order + start[u]). */
static void down_panel(Scratch *s, const int *pairs, int n) {
    int c0 = s->pcol[pairs[0]], nd = 0;
    if (c0 < 0) return;
    for (int g = 0; g * 16 < n; g++) {
        const uint32_t *src[16];
        int m = 0;
        for (; m < 16 && g * 16 + m < n; m++) src[m] = panel_src(&s->ha, pairs[g * 16 + m], &nd);
        panel_group(s->dpanel + (size_t)(c0 / 16 + g) * (nd * 16), src, m, nd);
    }
}

/* The pipelined schedule: one task counter over the gate/up tasks of every expert, then its down tasks. An
 * expert's down tasks wait only for that expert's own gate/up tasks (the member finishing the last one computes
 * its h), so members done with gate/up rows go on to down rows without a barrier between the matrices. */
static void pipe_init(Pipe *pp, const Mat *mg, int U, int H, int I) {
    long rg = rows_per_task(mg, 2 * I, H);
    pp->next = 0;
    for (int u = 0; u < U; u++) pp->left[u] = (int)((2 * I + rg - 1) / rg), pp->ready[u] = 0;
}

static void pipelined_rows(Pipe *pp, const Mat *mg, const Mat *md, Scratch *s, int U, int H, int I,
                           const int *uniq, const int *start, const int *order, int K, int id, long *fin) {
    long rg = rows_per_task(mg, 2 * I, H), tg = (2 * I + rg - 1) / rg, ng = U * tg;
    long rd = rows_per_task(md, H, I), td = (H + rd - 1) / rd;
    for (long b; (b = __atomic_fetch_add(&pp->next, 1, __ATOMIC_RELAXED)) < ng + U * td;) {
        if (b < ng) {
            task_rows(mg, 2 * I, &s->xa, b, rg, tg, uniq, start, order, K, 1, s->gu_out);
            STAMP(id, T_GATE_UP);
            int u = (int)(b / tg);
            if (__atomic_sub_fetch(&pp->left[u], 1, __ATOMIC_ACQ_REL) == 0) {   /* sees every task's rows */
                for (int q = start[u]; q < start[u + 1]; q++) act_pair(s, order[q], I, 0);
                if (s->damx) down_panel(s, order + start[u], start[u + 1] - start[u]);
                __atomic_store_n(&pp->ready[u], 1, __ATOMIC_RELEASE);
            }
            continue;
        }
        b -= ng;
        for (int i = 1; !__atomic_load_n(&pp->ready[b / td], __ATOMIC_ACQUIRE); i++) {
            cpu_relax();
            if ((i & 1023) == 0) sched_yield();   /* the member computing h may wait for this core */
        }
        task_rows(md, H, &s->ha, b, rd, td, uniq, start, order, K, 0, s->y);
        done(fin, 1);
    }
}

size_t moe_scratch_bytes(int T, int K, int H, int I) {
    Scratch s;
    return layout(&s, 0, T, K, H, I, FLOAT, FLOAT, 0);
}

/* One layer call's state, shared by the members that join it. Every phase hands out tasks (next) and counts
 * the finished ones (fin); a phase waits for the previous one's count, never for a given member. */
typedef struct {
    int T, K, H, I, U, io, pipe;
    const Mat *mg, *md;
    Scratch *s;
    const int *uniq, *start, *order;
    const void *x, *wts;
    void *out;
    int ngroups, grp[512];   /* AMX gate/up panel groups: expert u << 16 | group within the expert */
    Phase pan, prep, gu, act, dn, sum;
    int gu_claimed[MAXT], dn_claimed[MAXT];   /* chunk_kb = 0: ranges taken */
} Layer;

#define SUM_CHUNK 256    /* outputs per task of the weighted sum (decode: H / 256 members share it) */

/* Chunk c of the weighted sum over the K experts of each token: SUM_CHUNK outputs of one token (a loop over j
 * that the compiler vectorizes; per element the same order of additions as one scalar sum over kk). */
static void sum_chunk(const Layer *L, long c) {
    int K = L->K, H = L->H;
    const uint16_t *wb = L->wts;
    const float *wf = L->wts;
    long per = (H + SUM_CHUNK - 1) / SUM_CHUNK;
    int t = (int)(c / per), j0 = (int)(c % per) * SUM_CHUNK, nj = H - j0 < SUM_CHUNK ? H - j0 : SUM_CHUNK;
    float acc[SUM_CHUNK];
    for (int j = 0; j < nj; j++) acc[j] = 0.f;
    for (int kk = 0; kk < K; kk++) {
        float wk = L->io ? bf16f(wb[t * K + kk]) : wf[t * K + kk];
        const float *y = L->s->y + (size_t)(t * K + kk) * H + j0;
        for (int j = 0; j < nj; j++) acc[j] += wk * y[j];
    }
    size_t o = (size_t)t * H + j0;
    if (L->io) for (int j = 0; j < nj; j++) ((uint16_t *)L->out)[o + j] = f2bf16(acc[j]);
    else for (int j = 0; j < nj; j++) ((float *)L->out)[o + j] = acc[j];
}

static void layer_member(void *arg, int id, int n) {
    Layer *L = arg;
    Scratch *s = L->s;
    int T = L->T, K = L->K, H = L->H, I = L->I, P = T * K;
    const uint16_t *xb = L->x;
    const float *xf = L->x;
    STAMP(id, T_START);
    /* the input in fp32, prepared for the gate/up rows' dot path, in pieces of QB inputs */
    long pieces = (H + QB - 1) / QB, np = T * pieces;
    for (long lo, hi; claim_grain(&L->prep.next, np, grain(np, n), &lo, &hi); done(&L->prep.fin, hi - lo))
        for (long k = lo; k < hi; k++) {
            int t = (int)(k / pieces), j0 = (int)(k % pieces) * QB, j1 = j0 + QB < H ? j0 + QB : H;
            for (size_t j = (size_t)t * H + j0; j < (size_t)t * H + j1; j++) s->x32[j] = L->io ? bf16f(xb[j]) : xf[j];
            prep(&s->xa, t, j0, j1);
        }
    await_count(&L->prep.fin, np);
    /* AMX: the gate/up panels, a group of 16 vectors per task (one writer per cache line) */
    for (long g; L->mg->amx && (g = claim(&L->pan.next, L->ngroups)) >= 0; done(&L->pan.fin, 1)) {
        int u = L->grp[g] >> 16, g0 = (L->grp[g] & 0xFFFF) * 16, n = L->start[u + 1] - L->start[u], nd = 0, m = 0;
        const uint32_t *src[16];
        for (; m < 16 && g0 + m < n; m++) src[m] = panel_src(&s->xa, L->order[L->start[u] + g0 + m] / K, &nd);
        panel_group(s->gpanel + ((size_t)L->mg->ubase[u] + g0) / 16 * (nd * 16), src, m, nd);
    }
    if (L->mg->amx) await_count(&L->pan.fin, L->ngroups);
    STAMP(id, T_PREP);
    long nd;   /* down-row tasks: the weighted sum waits for them */
    if (L->pipe) {
        long rd = rows_per_task(L->md, H, I);
        nd = L->U * ((H + rd - 1) / rd);
        pipelined_rows(s->pipe, L->mg, L->md, s, L->U, H, I, L->uniq, L->start, L->order, K, id, &L->dn.fin);
    } else {
        long ng = matrix_tasks(L->mg, 2 * I, &s->xa, L->U, n);
        nd = matrix_tasks(L->md, H, &s->ha, L->U, n);
        matrix_rows(L->mg, 2 * I, &s->xa, L->U, L->uniq, L->start, L->order, K, 1, s->gu_out, &L->gu.next,
                    &L->gu.fin, L->gu_claimed, id, n);
        STAMP(id, T_GATE_UP);
        await_count(&L->gu.fin, ng);
        for (long lo, hi; claim_grain(&L->act.next, P, grain(P, n), &lo, &hi); done(&L->act.fin, hi - lo))
            for (long p = lo; p < hi; p++) act_pair(s, (int)p, I, 1);
        await_count(&L->act.fin, P);
        matrix_rows(L->md, H, &s->ha, L->U, L->uniq, L->start, L->order, K, 0, s->y, &L->dn.next, &L->dn.fin,
                    L->dn_claimed, id, n);
    }
    STAMP(id, T_DOWN);
    await_count(&L->dn.fin, nd);
    long ns = (long)T * ((H + SUM_CHUNK - 1) / SUM_CHUNK);   /* chunks of the weighted sum */
    for (long lo, hi; claim_grain(&L->sum.next, ns, grain(ns, n), &lo, &hi); done(&L->sum.fin, hi - lo))
        for (long c = lo; c < hi; c++) sum_chunk(L, c);
    amx_release();
    STAMP(id, T_END);
    if (id == 0) await_count(&L->sum.fin, ns);   /* the caller returns when the output is complete */
}

#include "stats.h"

/* scratch: moe_scratch_bytes() bytes. io: 0 = x, wts, out in fp32; 1 = in bf16 (the model's dtype, no
 * conversion on the caller's side). E: the layer's expert count. Returns 0, or -1 for bad arguments (over 4096
 * pairs or experts, an expert id outside [0, E): it would read past the weights, an int4 group that does not
 * divide H and I). */
int moe_forward(int T, int K, int H, int I, int E, const void *x, const int64_t *idx, const void *wts,
                int fmt, int G, const void *gu, const float *gu_s, const void *dn, const float *dn_s,
                void *out, void *scratch, int threads, int io) {
    uint64_t t0 = now_ns();
    if (prof) prof[0] = t0 * 1e-9;
    int P = T * K;
    if (T < 1 || K < 1 || P > 4096 || E < 1 || E > 4096 || (fmt == 2 && (G % 2 || H % G || I % G))) return -1;
    Mat mg = {fmt, G, path_for(fmt, H, G), gu, gu_s}, md = {fmt, G, path_for(fmt, I, G), dn, dn_s};
    /* AMX: bf16 on the bf16 dot path (inputs a multiple of 32), int8 and int4 (unpacked to nibble bytes) on the
     * int8-activation path (of QB) */
    int tiles = amx_active() && P >= AMX_MIN;
    mg.amx = tiles && (fmt == 0 ? mg.path == DPBF16 && H % 32 == 0 : mg.path == IDOT);
    md.amx = tiles && (fmt == 0 ? md.path == DPBF16 && I % 32 == 0 : md.path == IDOT);
    /* group pairs by expert, in O(P): order[] lists pair ids, expert by expert (experts in order of first use) */
    int order[4096], uniq[4096], start[4097], slot[4096], U = 0;   /* slot: expert id → u */
    for (int p = 0; p < P; p++) {
        if (idx[p] < 0 || idx[p] >= E) return -1;
        slot[idx[p]] = -1;
    }
    for (int p = 0; p < P; p++)
        if (slot[idx[p]] < 0) slot[idx[p]] = U, uniq[U] = (int)idx[p], start[++U] = 0;
    for (int p = 0; p < P; p++) start[slot[idx[p]] + 1]++;
    start[0] = 0;
    for (int u = 0; u < U; u++) start[u + 1] += start[u];
    int next[4096];
    memcpy(next, start, U * sizeof(int));
    for (int p = 0; p < P; p++) order[next[slot[idx[p]]]++] = p;
    Scratch s;
    layout(&s, (char *)scratch, T, K, H, I, mg.path, md.path, fmt);
    int ubase[4096];   /* AMX: experts with ≥ AMX_MIN pairs get panel columns, 16 a group */
    if (mg.amx || md.amx) {
        int cols = 0;
        for (int u = 0; u < U; u++) {
            int nu = start[u + 1] - start[u];
            ubase[u] = nu >= AMX_MIN ? cols : -1;
            cols += nu >= AMX_MIN ? (nu + 15) / 16 * 16 : 0;
            for (int q = start[u]; q < start[u + 1]; q++) s.pcol[order[q]] = ubase[u] < 0 ? -1 : ubase[u] + q - start[u];
        }
        mg.panel = s.gpanel, md.panel = s.dpanel, mg.ubase = md.ubase = ubase;
        if (cols) __atomic_add_fetch(&st.amx_calls, 1, __ATOMIC_RELAXED);
        else mg.amx = md.amx = 0;   /* no expert qualified (decode): tasks as without tiles */
    }
    s.damx = md.amx;
    Layer L = {T, K, H, I, U, io, pipelined && chunk_kb > 0, &mg, &md, &s, uniq, start, order, x, wts, out};
    L.ngroups = 0;
    for (int u = 0; mg.amx && u < U; u++)   /* ≤ 2P / 16 = 512 groups (AMX_MIN ≥ 8) */
        for (int g = 0; ubase[u] >= 0 && g * 16 < start[u + 1] - start[u]; g++) L.grp[L.ngroups++] = u << 16 | g;
    if (L.pipe) pipe_init(s.pipe, &mg, U, H, I);
    if (prof) prof[1] = secs();
    team_run(layer_member, &L, threads);
    uint64_t t1 = now_ns();
    if (prof) prof[2] = t1 * 1e-9;
    stats_kernel(t1 - t0, U * expert_bytes(fmt, G, H, I));
    return 0;
}

#include "entry.h"
#include "knobs.h"
#include "flags.h"
