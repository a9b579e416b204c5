/* The kernel's knobs and what it can do, for benchmarks and tests (kernels.tune, kernels.caps). */

/* bit 0 AVX-512 BF16 dots, 1 VNNI dots, 2 AMX tiles granted, 3 the AMX path in use (amx knob, KTCLI_CPU_AMX) */
int moe_caps(void) { return HAS_DPBF16 | HAS_VNNI << 1 | amx_hw << 2 | amx_active() << 3; }

/* Stops the thread team (the next call starts a new one): at exit, so no worker outlives the interpreter. */
void moe_shutdown(void) {
    pthread_mutex_lock(&team_lock);
    team_stop();
    pthread_mutex_unlock(&team_lock);
}

/* Tuning knobs for benchmarks and tests, in this order: chunk, prefetch, idot, pipelined, spin_us, pin, amx, amx_pf.
 * Writes the settings in force to was[8], then applies set[8] (a negative value keeps a setting). A new pin
 * setting restarts the thread team. */
void moe_tune(const int *set, int *was) {
    int *knob[] = {&chunk_kb, &pf_bytes, &int_dot, &pipelined, &spin_us, &pin, &amx_mode, &amx_pf};
    for (int k = 0; k < 8; k++) {
        was[k] = *knob[k];
        if (set[k] >= 0) *knob[k] = set[k];
    }
    if (set[5] >= 0 && set[5] != was[5]) moe_shutdown();
}

/* Members in the team and whether they are pinned: out[2]. */
void moe_team(int *out) { out[0] = team.n, out[1] = team.pinned; }
