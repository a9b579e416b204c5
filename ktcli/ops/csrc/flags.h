/* Full-graph decode's CPU steps driven by two words in pinned host memory instead of host functions: per CPU
 * layer the graph writes go = i + 1 (cuStreamWriteValue32) and waits for done == i + 1 (cuStreamWaitValue32);
 * a C thread here spins on go, runs layer i's block and writes done. Why: a host function costs the driver's
 * hand-off to its callback thread and back (tens of µs a layer, benchmarks/decode_timeline.py); a flag the GPU
 * polls and a thread that spins answer in about a microsecond each way.
 *
 * Python arms the thread before every replay (moe_flags_arm: one more replay expected); it spins on go while any
 * is expected and counts one off at a replay's last step (step n), then sleeps on a futex when none is left.
 * Arming never waits and is never lost: a replay armed while the previous one runs is served after it, and one
 * armed but never launched (Ctrl-C between the two) only keeps the thread spinning. The table is read again
 * before each step. A replay
 * that was not armed would wait forever on its first done: engine/graphs.py arms in the same call that replays. */
typedef struct {
    uint32_t *go, *done;   /* pinned host words, the GPU's view of them mapped (UVA) */
    Call **blocks;         /* the graph's CPU steps in capture order */
    int n;
} Req;

static struct {
    const Req *req;
    int armed, armed_sleepers;   /* replays requested and not yet served */
    int started;
    pthread_mutex_t lock;
} fl = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void *flags_server(void *arg) {
    (void)arg;
    for (;;) {
        while (__atomic_load_n(&fl.armed, __ATOMIC_ACQUIRE) == 0) wait_change(&fl.armed, 0, &fl.armed_sleepers);
        const Req *r = __atomic_load_n(&fl.req, __ATOMIC_ACQUIRE);
        uint32_t g;
        for (int i = 1; (g = __atomic_load_n(r->go, __ATOMIC_ACQUIRE)) == 0; i++) {
            cpu_relax();
            if ((i & 65535) == 0) {   /* a long GPU stretch: let others have the core now and then, and follow a */
                sched_yield();        /* re-arm that names another graph's words */
                r = __atomic_load_n(&fl.req, __ATOMIC_ACQUIRE);
            }
        }
        r = __atomic_load_n(&fl.req, __ATOMIC_ACQUIRE);   /* a re-arm may have named another graph's table */
        __atomic_store_n(r->go, 0, __ATOMIC_RELAXED);
        if (g >= 1 && g <= (uint32_t)r->n) {
            moe_host(r->blocks[g - 1]);
        } else {   /* a step number outside the table: counted, answered so the GPU goes on */
            __atomic_add_fetch(&st.errors, 1, __ATOMIC_RELAXED);
        }
        if (g == (uint32_t)r->n) __atomic_sub_fetch(&fl.armed, 1, __ATOMIC_ACQ_REL);   /* before done: see below */
        __atomic_store_n(r->done, g, __ATOMIC_RELEASE);   /* y written before done (x86 stores stay in order) */
    }
    return NULL;
}

/* One more replay of the graph whose steps `r` lists is about to start. The count is taken off before the last
 * done, so an arm made after the replay completed always finds it current. Returns 0, or -1 when the serving thread cannot start
 * (the caller then must not replay). */
int moe_flags_arm(const Req *r) {
    pthread_mutex_lock(&fl.lock);
    if (!fl.started) {
        pthread_t th;
        if (pthread_create(&th, NULL, flags_server, NULL) != 0) {
            pthread_mutex_unlock(&fl.lock);
            return -1;
        }
        pthread_detach(th);
        fl.started = 1;
    }
    pthread_mutex_unlock(&fl.lock);
    __atomic_store_n(&fl.req, r, __ATOMIC_RELEASE);
    __atomic_add_fetch(&fl.armed, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&fl.armed_sleepers, __ATOMIC_SEQ_CST)) futex(&fl.armed, FUTEX_WAKE_PRIVATE, INT_MAX);
    return 0;
}
