/* Entry points that take one argument block: from Python (ctypes: one argument costs a few µs less than 17) and
 * from a CUDA host function (cuLaunchHostFunc(stream, moe_host, call)), which runs no Python at all. */
typedef struct {
    int T, K, H, I;
    const void *x; const int64_t *idx; const void *wts;
    int fmt, G;
    const void *gu; const float *gu_s; const void *dn; const float *dn_s;
    void *out, *scratch;
    int threads, io, E;
    int rc;   /* moe_host: the last call's result (0, or -1: arguments refused) */
} Call;

int moe_call(const Call *c) {
    return moe_forward(c->T, c->K, c->H, c->I, c->E, c->x, c->idx, c->wts, c->fmt, c->G, c->gu, c->gu_s, c->dn,
                       c->dn_s, c->out, c->scratch, c->threads, c->io);
}

/* One CPU-expert layer step: the same for a CUDA host function, piecewise replay and eager decode. An error is
 * kept in the block and counted (a host function cannot return one); the engine raises it after the replay. */
static void nop_member(void *arg, int id, int n) { (void)arg, (void)id, (void)n; }

void moe_host(void *arg) {
    Call *c = arg;
    uint64_t t0 = now_ns();
    int rc = 0;
    if (c->T == 0) team_run(nop_member, NULL, c->threads);   /* an empty step (bench's fixed-cost probe) */
    else rc = moe_call(c);
    c->rc = rc;
    if (rc != 0) __atomic_add_fetch(&st.errors, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st.host_calls, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st.host_ns, now_ns() - t0, __ATOMIC_RELAXED);
}

/* Host calls refused since the last moe_errors() (and reset). */
int moe_errors(void) { return (int)__atomic_exchange_n(&st.errors, 0, __ATOMIC_RELAXED); }

typedef struct { const uint64_t *p; long blocks, chunk, next, fin; uint64_t sum[MAXT]; } Probe;

static void probe_member(void *arg, int id, int n) {
    Probe *r = arg;
    uint64_t acc[8] = {0};   /* one 64-byte line per step: a vector add, one horizontal sum per member */
    long chunk = r->chunk > 0 ? r->chunk : (r->blocks + n - 1) / n, nc = (r->blocks + chunk - 1) / chunk;
    for (long c; (c = claim(&r->next, nc)) >= 0; done(&r->fin, 1))
        for (long b = c * chunk, b1 = b + chunk < r->blocks ? b + chunk : r->blocks; b < b1; b++) {
            PREFETCH(r->p + b * 8);
            for (int k = 0; k < 8; k++) acc[k] += r->p[b * 8 + k];
        }
    uint64_t total = 0;
    for (int k = 0; k < 8; k++) total += acc[k];
    __atomic_add_fetch(&r->sum[id], total, __ATOMIC_RELAXED);
    if (id == 0) await_count(&r->fin, nc);
}

/* Bandwidth probe with the kernel's thread team and prefetch setting: members stream chunks of chunk_kb KiB as
 * they free up (0: n contiguous ranges). The roofline's CPU denominator. Returns a checksum so the reads cannot
 * be optimised away. */
uint64_t stream_read(const uint64_t *p, size_t n, int threads) {
    Probe r = {p, (long)(n / 8), chunk_kb > 0 ? chunk_kb * 16L : 0};
    team_run(probe_member, &r, threads);
    uint64_t total = 0;
    for (int i = 0; i < MAXT; i++) total += r.sum[i];
    for (size_t i = (size_t)r.blocks * 8; i < n; i++) total += p[i];
    return total;
}

