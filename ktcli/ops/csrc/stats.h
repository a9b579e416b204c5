/* What the kernel's calls did since the last moe_stats(): read by the engine's clocks (ops/clocks.py), since a
 * call from a CUDA host function has no Python around it to time it. Updated with atomics: calls come from the
 * main thread and from CUDA's callback thread. */
static struct {
    uint64_t calls, kernel_ns;      /* every moe_forward */
    uint64_t host_calls, host_ns;   /* moe_host: the whole step a CUDA host function (or a direct call) takes */
    uint64_t best_bps;              /* the fastest call's selected-expert bytes ÷ its time, B/s */
    uint64_t errors;                /* moe_host calls whose arguments were refused (taken by moe_errors) */
    uint64_t amx_calls;             /* kernel calls where some expert went through AMX tiles (amx.h) */
} st;

/* Stored bytes of one expert: gate/up [2I, H] and down [H, I] in the format, with their scales. */
static double expert_bytes(int fmt, int G, int H, int I) {
    double w = 3.0 * H * I;
    if (fmt == 0) return 2 * w;
    if (fmt == 1) return w + 4.0 * (2 * I + H);
    return w / 2 + 4.0 * w / G;
}

static void stats_kernel(uint64_t ns, double bytes) {
    __atomic_add_fetch(&st.calls, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st.kernel_ns, ns, __ATOMIC_RELAXED);
    uint64_t bps = ns ? (uint64_t)(bytes * 1e9 / ns) : 0, was = __atomic_load_n(&st.best_bps, __ATOMIC_RELAXED);
    while (bps > was && !__atomic_compare_exchange_n(&st.best_bps, &was, bps, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* out[6]: kernel calls, kernel seconds, host-step calls, host-step seconds, best B/s, calls with AMX tiles; then
 * they start again from zero. */
void moe_stats(double *out) {
    uint64_t v[5] = {__atomic_exchange_n(&st.calls, 0, __ATOMIC_RELAXED),
                     __atomic_exchange_n(&st.kernel_ns, 0, __ATOMIC_RELAXED),
                     __atomic_exchange_n(&st.host_calls, 0, __ATOMIC_RELAXED),
                     __atomic_exchange_n(&st.host_ns, 0, __ATOMIC_RELAXED),
                     __atomic_exchange_n(&st.best_bps, 0, __ATOMIC_RELAXED)};
    out[0] = (double)v[0], out[1] = v[1] * 1e-9, out[2] = (double)v[2], out[3] = v[3] * 1e-9;
    out[4] = (double)v[4];
    out[5] = (double)__atomic_exchange_n(&st.amx_calls, 0, __ATOMIC_RELAXED);
}
