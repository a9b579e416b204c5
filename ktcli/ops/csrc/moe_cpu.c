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
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "dots.h"
#include "acts.h"
#include "rows.h"

static int int_dot = HAS_VNNI;   /* int8/int4 use IDOT (int8 activations) where its sizes fit */
static int chunk_kb = 256;       /* rows handed to threads in chunks of this many KiB of weights (0: static split) */
static int pipelined = 1;        /* one task list for both matrices (1) or two phases with a barrier between (0) */
static double *prof;             /* moe_profile(): per-thread timestamps of the last call, or NULL */

int moe_caps(void) { return HAS_DPBF16 | HAS_VNNI << 1; }

/* Tuning knobs for benchmarks and tests, in this order: chunk, prefetch, idot, pipelined. Writes the
 * settings in force to was[4], then applies set[4] (a negative value keeps a setting). */
void moe_tune(const int *set, int *was) {
    int *knob[] = {&chunk_kb, &pf_bytes, &int_dot, &pipelined};
    for (int k = 0; k < 4; k++) {
        was[k] = *knob[k];
        if (set[k] >= 0) *knob[k] = set[k];
    }
}

/* Timestamps (omp_get_wtime) of each call from now on: buf[0] the call's entry, buf[1] the thread team's fork,
 * buf[2] the return, then 8 slots per thread (T_* below); NULL stops. buf holds 4 + 8 × threads doubles. */
enum { T_START, T_PREP, T_GATE_UP, T_DOWN, T_END };
void moe_profile(double *buf) { prof = buf; }
#define STAMP(k) do { if (prof) prof[4 + 8 * omp_get_thread_num() + (k)] = omp_get_wtime(); } while (0)

static int path_for(int fmt, int C, int G) {
    if (fmt == 0) return HAS_DPBF16 ? DPBF16 : FLOAT;
    if (int_dot && C % QB == 0 && C / QB <= MAXB && (fmt == 1 || G % QB == 0)) return IDOT;
    return FLOAT;
}

/* Rows per task: about chunk_kb KiB of one matrix's weights, within one expert. */
static long rows_per_task(const Mat *m, int R, int C) {
    size_t row_bytes = m->fmt == 0 ? (size_t)C * 2 : m->fmt == 1 ? (size_t)C : (size_t)C / 2;
    long rpb = (long)(chunk_kb * 1024 / row_bytes);
    return rpb < 1 ? 1 : rpb > R ? R : rpb;
}

/* Task b of a matrix cut into tasks of rpb rows, tpe tasks per expert. */
static void task_rows(const Mat *m, int R, const Acts *a, long b, long rpb, long tpe, const int *uniq,
                      const int *start, const int *order, int K, int by_token, float *out) {
    int u = (int)(b / tpe), r0 = (int)((b % tpe) * rpb), r1 = r0 + rpb < R ? r0 + (int)rpb : R;
    expert_rows(m, R, a, u, r0, r1, uniq, start, order, K, by_token, out);
}

/* Every selected expert's rows of one matrix against the vectors routed to it: out[p * R + row] for pair p
 * (no barrier at the end: the caller's). Tasks handed out as threads free up (dynamic schedule); chunk_kb = 0 splits the U·R rows into one contiguous range per thread instead (the same rows every
 * call: benchmarks use it to keep weights in each core's L2). */
static void matrix_rows(const Mat *m, int R, const Acts *a, int U, const int *uniq, const int *start,
                        const int *order, int K, int by_token, float *out) {
    if (chunk_kb == 0) {
        long N = (long)U * R, nth = omp_get_num_threads(), id = omp_get_thread_num();
        for (long g = N * id / nth, g1 = N * (id + 1) / nth; g < g1;) {
            int u = (int)(g / R), r0 = (int)(g % R), r1 = g1 - g < R - r0 ? r0 + (int)(g1 - g) : R;
            expert_rows(m, R, a, u, r0, r1, uniq, start, order, K, by_token, out);
            g += r1 - r0;
        }
        return;
    }
    long rpb = rows_per_task(m, R, a->n), tpe = (R + rpb - 1) / rpb;
#pragma omp for schedule(runtime) nowait
    for (long b = 0; b < U * tpe; b++) task_rows(m, R, a, b, rpb, tpe, uniq, start, order, K, by_token, out);
}

/* h = SiLU(gate) * up for pair p, prepared for the down rows' dot path. */
static void act_pair(Scratch *s, int p, int I) {
    const float *g = s->gu_out + (size_t)p * 2 * I, *up = g + I;
    float *h = s->h + (size_t)p * I;
#pragma omp simd
    for (int i = 0; i < I; i++) h[i] = g[i] / (1.f + exp_approx(-g[i])) * up[i];
    prep(&s->ha, p, 0, I);
}

/* The pipelined schedule: one task counter over the gate/up tasks of every expert, then its down tasks. An
 * expert's down tasks wait only for that expert's own gate/up tasks (the thread finishing the last one computes
 * its h), so threads done with gate/up rows go on to down rows without a barrier between the matrices. */
static void pipe_init(Pipe *pp, const Mat *mg, int U, int H, int I) {
    long rg = rows_per_task(mg, 2 * I, H);
    pp->next = 0;
    for (int u = 0; u < U; u++) pp->left[u] = (int)((2 * I + rg - 1) / rg), pp->ready[u] = 0;
}

static void pipelined_rows(Pipe *pp, const Mat *mg, const Mat *md, Scratch *s, int U, int H, int I,
                           const int *uniq, const int *start, const int *order, int K) {
    long rg = rows_per_task(mg, 2 * I, H), tg = (2 * I + rg - 1) / rg, ng = U * tg;
    long rd = rows_per_task(md, H, I), td = (H + rd - 1) / rd;
    for (long b; (b = __atomic_fetch_add(&pp->next, 1, __ATOMIC_RELAXED)) < ng + U * td;) {
        if (b < ng) {
            task_rows(mg, 2 * I, &s->xa, b, rg, tg, uniq, start, order, K, 1, s->gu_out);
            STAMP(T_GATE_UP);
            int u = (int)(b / tg);
            if (__atomic_sub_fetch(&pp->left[u], 1, __ATOMIC_ACQ_REL) == 0) {   /* sees every task's rows */
                for (int q = start[u]; q < start[u + 1]; q++) act_pair(s, order[q], I);
                __atomic_store_n(&pp->ready[u], 1, __ATOMIC_RELEASE);
            }
            continue;
        }
        b -= ng;
        while (!__atomic_load_n(&pp->ready[b / td], __ATOMIC_ACQUIRE))
#if defined(__x86_64__)
            __builtin_ia32_pause();
#else
            ;
#endif
        task_rows(md, H, &s->ha, b, rd, td, uniq, start, order, K, 0, s->y);
    }
}

size_t moe_scratch_bytes(int T, int K, int H, int I) {
    Scratch s;
    return layout(&s, 0, T, K, H, I, FLOAT, FLOAT, 0);
}

/* scratch: moe_scratch_bytes() bytes. io: 0 = x, wts, out in fp32; 1 = in bf16 (the model's dtype, no
 * conversion on the caller's side). E: the layer's expert count. Returns 0, or -1 for bad arguments (over 4096
 * pairs or experts, an expert id outside [0, E): it would read past the weights, an int4 group that does not
 * divide H and I). */
int moe_forward(int T, int K, int H, int I, int E, const void *x, const int64_t *idx, const void *wts,
                int fmt, int G, const void *gu, const float *gu_s, const void *dn, const float *dn_s,
                void *out, void *scratch, int threads, int io) {
    if (prof) prof[0] = omp_get_wtime();
    int P = T * K;
    if (P > 4096 || E < 1 || E > 4096 || (fmt == 2 && (G % 2 || H % G || I % G))) return -1;
    Mat mg = {fmt, G, path_for(fmt, H, G), gu, gu_s}, md = {fmt, G, path_for(fmt, I, G), dn, dn_s};
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
    const uint16_t *xb = x, *wb = wts;
    const float *xf = x, *wf = wts;
    int pipe = pipelined && chunk_kb > 0;
    if (pipe) pipe_init(s.pipe, &mg, U, H, I);
    omp_set_schedule(omp_sched_dynamic, 1);   /* matrix_rows' schedule(runtime) */
    if (prof) prof[1] = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        STAMP(T_START);
        /* the input in fp32, prepared for the gate/up rows' dot path, in pieces of QB inputs */
        int pieces = (H + QB - 1) / QB;
#pragma omp for schedule(static)
        for (int k = 0; k < T * pieces; k++) {
            int t = k / pieces, j0 = k % pieces * QB, j1 = j0 + QB < H ? j0 + QB : H;
            for (size_t j = (size_t)t * H + j0; j < (size_t)t * H + j1; j++) s.x32[j] = io ? bf16f(xb[j]) : xf[j];
            prep(&s.xa, t, j0, j1);
        }
        STAMP(T_PREP);
        if (pipe) {
            pipelined_rows(s.pipe, &mg, &md, &s, U, H, I, uniq, start, order, K);
        } else {
            matrix_rows(&mg, 2 * I, &s.xa, U, uniq, start, order, K, 1, s.gu_out);   /* gate and up rows */
            STAMP(T_GATE_UP);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) act_pair(&s, p, I);
            matrix_rows(&md, H, &s.ha, U, uniq, start, order, K, 0, s.y);            /* down rows */
        }
        STAMP(T_DOWN);
#pragma omp barrier
        /* weighted sum over the K experts of each token */
#pragma omp for schedule(static) nowait
        for (long k = 0; k < (long)T * H; k++) {
            int t = (int)(k / H), j = (int)(k % H);
            float acc = 0.f;
            for (int kk = 0; kk < K; kk++)
                acc += (io ? bf16f(wb[t * K + kk]) : wf[t * K + kk]) * s.y[(size_t)(t * K + kk) * H + j];
            if (io) ((uint16_t *)out)[k] = f2bf16(acc);
            else ((float *)out)[k] = acc;
        }
        STAMP(T_END);
    }
    if (prof) prof[2] = omp_get_wtime();
    return 0;
}

/* moe_forward's arguments in one struct: a ctypes call with one argument costs a few µs less than with 17, and
 * decode makes one call per layer per token. */
typedef struct {
    int T, K, H, I;
    const void *x; const int64_t *idx; const void *wts;
    int fmt, G;
    const void *gu; const float *gu_s; const void *dn; const float *dn_s;
    void *out, *scratch;
    int threads, io, E;
} Call;

int moe_call(const Call *c) {
    return moe_forward(c->T, c->K, c->H, c->I, c->E, c->x, c->idx, c->wts, c->fmt, c->G, c->gu, c->gu_s, c->dn, c->dn_s,
                       c->out, c->scratch, c->threads, c->io);
}

/* Bandwidth probe with the kernel's thread team and prefetch setting: each thread streams contiguous chunks
 * of chunk_kb KiB (0: one contiguous range per thread). The roofline's CPU denominator. Returns a checksum so
 * the reads cannot be optimised away. */
uint64_t stream_read(const uint64_t *p, size_t n, int threads) {
    uint64_t total = 0;
    long blocks = (long)(n / 8);
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        uint64_t acc[8] = {0};   /* one 64-byte line per step: a vector add, one horizontal sum per thread */
        long chunk = chunk_kb > 0 ? chunk_kb * 16L : (blocks + omp_get_num_threads() - 1) / omp_get_num_threads();
#pragma omp for schedule(dynamic, chunk > 0 ? chunk : 1)
        for (long b = 0; b < blocks; b++) {
            PREFETCH(p + b * 8);
            for (int k = 0; k < 8; k++) acc[k] += p[b * 8 + k];
        }
        for (int k = 0; k < 8; k++) total += acc[k];
    }
    for (size_t i = (size_t)blocks * 8; i < n; i++) total += p[i];
    return total;
}
