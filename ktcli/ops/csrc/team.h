/* A persistent team of worker threads for the CPU expert kernel (replaces OpenMP's fork/join per call).
 *
 * Why: decode calls the kernel once per layer per token, from whichever thread asks (a CUDA host callback, the
 * main thread). Workers stay alive (pinned to cores with KTCLI_CPU_PIN=1), spin for `spin_us` after their work,
 * then sleep on a futex, so a call made within spin_us of the last one starts without a system call, and idle
 * workers leave the cores to other processes. The calling thread is member 0 and works too. One call at a time (a mutex). No barrier
 * waits for a given member: phases hand out tasks and wait for task counts (graceful when cores are shared).
 */
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAXT 512
typedef void (*team_fn)(void *ctx, int id, int n);

static int spin_us = 200;   /* how long a waiting thread spins before it sleeps */
static int pin = 0;         /* KTCLI_CPU_PIN=1: worker i pinned to the i-th allowed CPU (slower on the H200 host, benchmarks/HISTORY.md) */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

static void futex(int *addr, int op, int val) { syscall(SYS_futex, addr, op, val, NULL, NULL, 0); }

/* Wait until *addr != val: spin for spin_us, then sleep on the futex. `sleepers` counts the sleeping waiters so
 * that the changer makes a system call only when someone sleeps (both sides use seq_cst: Dekker's pattern). */
static void wait_change(int *addr, int val, int *sleepers) {
    uint64_t end = 0;
    for (int i = 1;; i++) {
        if (__atomic_load_n(addr, __ATOMIC_ACQUIRE) != val) return;
        if ((i & 255) == 0) {
            uint64_t t = now_ns();
            if (!end) end = t + (uint64_t)spin_us * 1000u;
            else if (t >= end) break;
        }
        cpu_relax();
    }
    __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(addr, __ATOMIC_SEQ_CST) == val) futex(addr, FUTEX_WAIT_PRIVATE, val);
    __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
}

static void set_and_wake(int *addr, int val, int *sleepers) {
    __atomic_store_n(addr, val, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST)) futex(addr, FUTEX_WAKE_PRIVATE, INT_MAX);
}

/* The current job's word: its generation (bits 11+), closed (bit 10: no one joins any more), members inside
 * (bits 0-9). A worker that wakes late finds the job closed and skips it, so a worker descheduled by another
 * process never holds a call up: the members present share the work (every loop hands out tasks). */
#define W_CLOSED 1024u
#define W_COUNT 1023u
#define W_GEN(g) ((unsigned)(g) << 11)

static struct {
    int n, pinned;                  /* members (the caller included); workers pinned to CPUs */
    pthread_t th[MAXT];
    int gen, gen_sleepers;          /* bumped to start a job (or to stop, with stop set) */
    unsigned word;
    int word_sleepers;
    int stop, base;                 /* base: gen when the workers started (their first `seen`) */
    team_fn fn;
    void *ctx;
} team;
static pthread_mutex_t team_lock = PTHREAD_MUTEX_INITIALIZER;

/* Wait for *c ≥ target (tasks of a phase done by whichever members took them): spin, yielding the core now and
 * then in case the member finishing them waits for it. */
static void await_count(long *c, long target) {
    for (int i = 1; __atomic_load_n(c, __ATOMIC_ACQUIRE) < target; i++) {
        cpu_relax();
        if ((i & 1023) == 0) sched_yield();
    }
}

static void *team_worker(void *arg) {
    int id = (int)(intptr_t)arg, seen = team.base;
    for (;;) {
        wait_change(&team.gen, seen, &team.gen_sleepers);
        seen = __atomic_load_n(&team.gen, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&team.stop, __ATOMIC_ACQUIRE)) return NULL;
        unsigned w = __atomic_load_n(&team.word, __ATOMIC_ACQUIRE);
        int joined = 0;
        while ((w & ~(W_CLOSED | W_COUNT)) == W_GEN(seen) && !(w & W_CLOSED))
            if (__atomic_compare_exchange_n(&team.word, &w, w + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                joined = 1;
                break;
            }
        if (!joined) continue;   /* the job ended (or a newer one started) before this worker got a core */
        team.fn(team.ctx, id, team.n);
        w = __atomic_sub_fetch(&team.word, 1, __ATOMIC_SEQ_CST);
        if ((w & W_CLOSED) && !(w & W_COUNT) && __atomic_load_n(&team.word_sleepers, __ATOMIC_SEQ_CST))
            futex((int *)&team.word, FUTEX_WAKE_PRIVATE, INT_MAX);
    }
}

static void team_stop(void) {
    if (team.n <= 1) { team.n = 0; return; }
    __atomic_store_n(&team.stop, 1, __ATOMIC_RELEASE);
    set_and_wake(&team.gen, team.gen + 1, &team.gen_sleepers);
    for (int i = 1; i < team.n; i++) pthread_join(team.th[i], NULL);
    team.n = team.stop = team.pinned = 0;
}

/* n members: n - 1 workers, pinned to the 2nd … n-th CPU this process may use when it may use at least n. */
static int team_start(int n) {
    cpu_set_t allowed;
    int cpus[MAXT], nc = 0;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0)
        for (int c = 0; c < CPU_SETSIZE && nc < MAXT; c++)
            if (CPU_ISSET(c, &allowed)) cpus[nc++] = c;
    team.pinned = pin && nc >= n;
    team.n = 1, team.base = team.gen;
    for (int i = 1; i < n; i++) {
        pthread_attr_t at;
        pthread_attr_init(&at);
        if (team.pinned) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(cpus[i], &one);
            pthread_attr_setaffinity_np(&at, sizeof one, &one);
        }
        int rc = pthread_create(&team.th[i], &at, team_worker, (void *)(intptr_t)i);
        pthread_attr_destroy(&at);
        if (rc) break;   /* fewer threads than asked: the job's tasks go to those there are */
        team.n = i + 1;
    }
    return team.n;
}

/* Run fn(ctx, id, n) on the caller (id 0) and on every worker that wakes before the job ends; fn hands its work
 * out as tasks, and the caller's fn returns only when every task is done. */
static void team_run(team_fn fn, void *ctx, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAXT) threads = MAXT;
    pthread_mutex_lock(&team_lock);
    if (team.n != threads) {
        team_stop();
        team_start(threads);
    }
    team.fn = fn, team.ctx = ctx;
    int g = team.gen + 1;
    __atomic_store_n(&team.word, W_GEN(g), __ATOMIC_SEQ_CST);
    set_and_wake(&team.gen, g, &team.gen_sleepers);
    fn(ctx, 0, team.n);
    unsigned w = __atomic_or_fetch(&team.word, W_CLOSED, __ATOMIC_SEQ_CST);   /* ctx lives until all are out */
    while (w & W_COUNT) {
        wait_change((int *)&team.word, (int)w, &team.word_sleepers);
        w = __atomic_load_n(&team.word, __ATOMIC_ACQUIRE);
    }
    pthread_mutex_unlock(&team_lock);
}

/* Claims task indices from a shared counter: returns the next task, or -1 when none are left. */
static inline long claim(long *next, long ntasks) {
    long b = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    return b < ntasks ? b : -1;
}

/* [lo, hi) of N items for part id of n. */
static inline void split(long N, int id, int n, long *lo, long *hi) {
    *lo = N * id / n, *hi = N * (id + 1) / n;
}

static inline void done(long *count, long k) { __atomic_add_fetch(count, k, __ATOMIC_RELEASE); }

/* A phase's task counter and finished count, each on its own cache line: 16 members claim and count at once. */
typedef struct { _Alignas(64) long next; _Alignas(64) long fin; } Phase;

/* Items per task when N small items (an input piece, a chunk of the sum) go to n members: about 8 tasks a member,
 * so a contended counter is claimed ~8n times, not N (T=512: 8,192 pieces one by one, the prep phase 1.4 ms). */
static inline long grain(long N, int n) { long g = N / (8L * (n < 1 ? 1 : n)); return g < 1 ? 1 : g; }

/* Claims the next g of a phase's N items, [*lo, *hi); 0 when none are left. The caller counts the items it did
 * (done(&fin, hi − lo)), so the phase waits for fin = N whatever the grain. */
static inline int claim_grain(long *next, long N, long g, long *lo, long *hi) {
    long c = claim(next, (N + g - 1) / g);
    if (c < 0) return 0;
    *lo = c * g, *hi = *lo + g < N ? *lo + g : N;
    return 1;
}

static void team_after_fork(void) {   /* a forked child has no workers: start a new team on first use */
    team.n = team.pinned = team.stop = 0;
    pthread_mutex_init(&team_lock, NULL);
}

__attribute__((constructor)) static void team_init(void) {
    const char *s = getenv("KTCLI_CPU_SPIN_US"), *p = getenv("KTCLI_CPU_PIN");
    if (s) spin_us = atoi(s);
    if (p) pin = atoi(p);
    pthread_atfork(NULL, NULL, team_after_fork);
}
