/* A plain read of the weight bytes one decode step needs, for scripts/bench_cpu_bound.py: the
   memory system's bound on the CPU kernels, with no arithmetic but a checksum.

   A step is a list of calls (one per kernel call of the step: a block matrix, or the LM head); a
   call is a list of slices; slice s reads, for each of its n rows r, the bytes
   [base + r * stride + offset, + length). The threads split each slice's rows as the matvec
   kernel splits a segment's kept rows, and wait for each other at the end of every call, as the
   kernel's callers do. Returns the XOR of the 64-bit words read (each slice's bytes past its last
   whole word XORed in one by one), so the caller can check that exactly these bytes were read.
   Built by bench_cpu_bound.py with the flags of sparse_kernels/cpu.py. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int n_calls, n_threads;
    const long *call_slices; /* call c: slices call_slices[c] .. call_slices[c + 1] - 1 */
    const long *slices;      /* 6 longs a slice: base address, stride, offset, length, n rows, first row's index */
    const int *rows;
    atomic_int arrived, released, go; /* go: n_threads is final, start */
    uint64_t sums[64];
} step_t;

typedef uint64_t word __attribute__((may_alias, aligned(1))); /* any byte address */

static uint64_t read_span(const unsigned char *p, long length) {
    uint64_t acc[8] = {0};
    long i = 0;
    for (; i + 64 <= length; i += 64) { /* a cache line a pass, vectorized */
        const word *w = (const word *)(p + i);
        for (int j = 0; j < 8; j++)
            acc[j] ^= w[j];
    }
    uint64_t sum = 0;
    for (int j = 0; j < 8; j++)
        sum ^= acc[j];
    for (; i + 8 <= length; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        sum ^= w;
    }
    for (; i < length; i++)
        sum ^= p[i];
    return sum;
}

static void wait_all(step_t *st, int *generation) { /* a spin barrier: every thread ends the call */
    int target = ++*generation;
    if (atomic_fetch_add(&st->arrived, 1) == target * st->n_threads - 1)
        atomic_store(&st->released, target);
    else
        while (atomic_load(&st->released) < target)
            ;
}

static void run_thread(step_t *st, int t) {
    uint64_t sum = 0;
    int generation = 0;
    for (int c = 0; c < st->n_calls; c++) {
        for (long s = st->call_slices[c]; s < st->call_slices[c + 1]; s++) {
            const long *d = st->slices + 6 * s;
            const unsigned char *base = (const unsigned char *)d[0] + d[2];
            long n = d[4], r0 = n * t / st->n_threads, r1 = n * (t + 1) / st->n_threads;
            for (long j = r0; j < r1; j++)
                sum ^= read_span(base + st->rows[d[5] + j] * d[1], d[3]);
        }
        wait_all(st, &generation);
    }
    st->sums[t] = sum;
}

typedef struct {
    step_t *step;
    int thread;
} helper_arg;

static void *helper(void *arg) {
    helper_arg *a = arg;
    while (!atomic_load(&a->step->go))
        ;
    if (a->thread < a->step->n_threads)
        run_thread(a->step, a->thread);
    return NULL;
}

uint64_t teal_read_rows(int n_calls, const long *call_slices, const long *slices, const int *rows, int n_threads) {
    step_t st = {.n_calls = n_calls, .n_threads = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads,
                 .call_slices = call_slices, .slices = slices, .rows = rows};
    pthread_t threads[64];
    helper_arg args[64];
    int started = 1;
    for (; started < st.n_threads; started++) {
        args[started] = (helper_arg){&st, started};
        if (pthread_create(&threads[started], NULL, helper, &args[started]) != 0)
            break;
    }
    st.n_threads = started; /* threads that could not start: their rows go to the others */
    atomic_store(&st.go, 1);
    run_thread(&st, 0);
    uint64_t sum = st.sums[0];
    for (int t = 1; t < started; t++) {
        pthread_join(threads[t], NULL);
        sum ^= st.sums[t];
    }
    return sum;
}
