/* The sparse matvec of sparse_kernels/reference.py on the CPU: reads only the kept rows of W^T.

   y[b, n] = [residual[b, n] +] sum_k h[b, k] * (|h[b, k]| > t_s) * w_t[k, n], n in segment s,
   h = x, rms_norm(x) * norm_weight, or silu(gate) * up: the reference's roundings (its docstring).

   A decode step's matvec is bound by memory bandwidth, so the work is arranged around the bytes
   of W^T. The caller forms the inputs and the kept-row lists; then the threads split each
   segment's kept rows (each streams whole rows, its own partial sums), and the caller adds the
   parts (teal_sparse_matvec says why rows, not columns). Weights are fp32 or bf16 (the
   activations' dtype), int8 with a scale per column, or int4 in groups of rows with a scale and an
   offset per group and column; products are summed in fp32. Also the
   product in nn.Linear's layout (a tied LM head) and the decode attention step (RoPE, cache
   write, attention). Built by sparse_kernels/cpu.py (cc -O3 -march=native -pthread).
*/
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 }; /* activations F32 or BF16; weights any of these (I8: with column
                                                scales; I4: with group scales and offsets) */

#define UNIT 16        /* column tiles are multiples of 16 columns (64 bytes of fp32: one cache line) */
#define ROWS 4         /* kept rows summed per pass over the accumulators */
#define AHEAD 16       /* rows ahead whose first cache line(s) are prefetched (see DEFINE_STREAM) */
#define TILE_BYTES (16 << 10) /* accumulators of one column tile, all batch rows: stay in L1 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float load(const void *p, long i, int dtype) {
    return dtype == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline float round_to(float v, int dtype) { return dtype == BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* Eight lanes, where the compiler targets AVX2 (GCC and clang vector extensions and x86 intrinsics):
   eight bytes widened to int32 by one vpmovzxbd, instead of the byte -> word -> dword shuffles the
   auto-vectorizer emits for a loop over bytes (stream_i4, stream_i8). Elsewhere the plain loops run. */
#ifdef __AVX2__
#include <immintrin.h>
#define HAVE_LANES8 1
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

static inline i32x8 bytes8(const uint8_t *p) {
    return (i32x8)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

static inline i32x8 signed_bytes8(const int8_t *p) {
    return (i32x8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

static inline f32x8 splat8(float v) { return (f32x8){v, v, v, v, v, v, v, v}; }

static inline f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, 32);
    return v;
}
#endif

static inline void put(void *p, long i, float v, int dtype) { /* p[i] = v in the dtype (bf16: rounded) */
    if (dtype == BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* Per-thread scratch, grown on demand and kept (the threads live as long as the process): slot
   INPUTS holds a call's inputs and kept-row lists and slot SUMS its parts' partial sums (the
   caller's, read or written by every thread of the call), slot WORK a thread's attention buffers. */
enum { INPUTS = 0, WORK = 1, SUMS = 2 };
static __thread float *scratch[3];
static __thread size_t scratch_floats[3];

static float *thread_scratch(int slot, size_t floats) {
    if (floats > scratch_floats[slot]) {
        free(scratch[slot]);
        scratch[slot] = malloc(floats * sizeof(float));
        scratch_floats[slot] = scratch[slot] ? floats : 0;
    }
    return scratch[slot];
}

/* ---- A small thread pool that never waits for a helper that has not started ----
   On a busy machine a woken helper can wait a whole scheduler slice (10-20 ms) for a core, and an
   OpenMP region's closing barrier makes the call wait with it: 120 matvecs took 1.4 s instead of
   50 ms on this project's shared 2-core machine. Here a job is a few chunks that threads claim one
   at a time; the caller claims too, so it finishes the job alone if no helper turns up, and waits
   only for chunks a helper has started. Helpers spin for SPIN_NS after a job (the next matvec of a
   decode step comes within microseconds), then sleep on a condition variable; a caller waiting
   longer than that for a helper's chunk yields its core. */
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX()
#endif
#define SPIN_NS 200000L
#define MAX_HELPERS 63

typedef void (*chunk_fn)(void *ctx, int chunk);

static struct {
    pthread_mutex_t busy;          /* one job at a time; another caller meanwhile runs its job alone */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    _Atomic uint64_t ticket;       /* job id << 32 | number of chunks << 16 | next chunk to claim */
    atomic_int done;               /* chunks of the current job finished */
    atomic_int sleepers;
    chunk_fn fn;                   /* the current job: written before its ticket is published */
    void *ctx;
    int n_helpers;
    uint64_t jobs;                 /* the last job id, 1 .. 2^32 - 1 */
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* The next unclaimed chunk of job, or -1: the chunk count travels in the ticket, so a helper that
   wakes late cannot claim into another job. */
static int claim(uint64_t job) {
    uint64_t t = atomic_load(&pool.ticket);
    while (t >> 32 == job && (t & 0xffff) < ((t >> 16) & 0xffff)) {
        if (atomic_compare_exchange_weak(&pool.ticket, &t, t + 1))
            return (int)(t & 0xffff);
    }
    return -1;
}

static void run_claimed(uint64_t job) {
    for (int c; (c = claim(job)) >= 0; atomic_fetch_add(&pool.done, 1))
        pool.fn(pool.ctx, c);
}

static void *helper(void *unused) {
    (void)unused;
    uint64_t seen = 0;
    for (;;) {
        long idle_since = now_ns();
        while (atomic_load(&pool.ticket) >> 32 == seen) {
            CPU_RELAX();
            if (now_ns() - idle_since > SPIN_NS) {
                pthread_mutex_lock(&pool.sleep_lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.ticket) >> 32 == seen)
                    pthread_cond_wait(&pool.wake, &pool.sleep_lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.sleep_lock);
            }
        }
        seen = atomic_load(&pool.ticket) >> 32;
        run_claimed(seen);
    }
    return NULL;
}

/* fn(ctx, c) for c < n_chunks, on up to n_threads threads (the caller one of them). */
static void run_parallel(chunk_fn fn, void *ctx, int n_chunks, int n_threads) {
    if (n_chunks <= 1 || n_threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int c = 0; c < n_chunks; c++)
            fn(ctx, c);
        return;
    }
    while (pool.n_helpers < n_threads - 1 && pool.n_helpers < MAX_HELPERS) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, NULL) != 0)
            break;
        pthread_detach(thread);
        pool.n_helpers++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.done, 0);
    uint64_t job = pool.jobs = pool.jobs % 0xffffffffu + 1;
    atomic_store(&pool.ticket, job << 32 | (uint64_t)n_chunks << 16);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    run_claimed(job);
    for (long since = now_ns(); atomic_load(&pool.done) < n_chunks;) { /* chunks a helper is running */
        if (now_ns() - since < SPIN_NS)
            CPU_RELAX();
        else
            sched_yield(); /* the helper may be waiting for this core */
    }
    pthread_mutex_unlock(&pool.busy);
}

/* The chunks a product of `work` weights is split into: one for a tiny product (not worth a
   second thread), else one per thread. */
static int chunks_for(long work, int n_threads) { return work < (1L << 15) ? 1 : n_threads; }

/* exp(x) to about an ulp in a form the compiler vectorizes (libm's expf is a call per element):
   x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (the next term is below
   6e-9 of the result), times 2^n built in the exponent bits. Clamped where expf over/underflows. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f; /* ln2 in two parts: r is exact-ish */
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* The dtype's values of src[0..n) widened to fp32, and v[0..n) rounded to the dtype in place: one
   loop per dtype, so that each vectorizes. */
static void widen(float *dst, const void *src, int n, int dtype) {
    if (dtype == BF16)
        for (int i = 0; i < n; i++)
            dst[i] = bf16_to_f32(((const uint16_t *)src)[i]);
    else
        memcpy(dst, src, sizeof(float) * n);
}

static void round_all(float *v, int n, int dtype) {
    if (dtype == BF16)
        for (int i = 0; i < n; i++)
            v[i] = bf16_to_f32(f32_to_bf16(v[i]));
}

/* h (B, K): the values the thresholds see, each a value of the dtype (held in fp32); tmp: K floats
   (NULL without silu or a norm: h is then x widened). */
static void form_inputs(float *h, float *tmp, int B, int K, const void *x, long ldx, int dtype, int silu,
                        const void *norm_weight, float eps) {
    int es = dtype == BF16 ? 2 : 4;
    for (int b = 0; b < B; b++) {
        float *hb = h + (long)b * K;
        const char *row = (const char *)x + b * ldx * es;
        widen(hb, row, K, dtype);
        if (silu) { /* x = [gate | up]: silu(gate) * up in fp32, rounded once */
            widen(tmp, row + (long)K * es, K, dtype);
            for (int k = 0; k < K; k++)
                hb[k] = hb[k] / (1.0f + exp_f32(-hb[k])) * tmp[k];
            round_all(hb, K, dtype);
        } else if (norm_weight) { /* Llama's order: x * rsqrt(mean(x^2) + eps) rounded, times the weight, rounded */
            double ss = 0.0; /* exact enough that only torch's own rounding of the mean is left */
            for (int k = 0; k < K; k++)
                ss += (double)hb[k] * hb[k];
            float r = 1.0f / sqrtf((float)(ss / K) + eps);
            for (int k = 0; k < K; k++)
                hb[k] *= r;
            round_all(hb, K, dtype);
            widen(tmp, norm_weight, K, dtype);
            for (int k = 0; k < K; k++)
                hb[k] *= tmp[k];
            round_all(hb, K, dtype);
        }
    }
}

/* The rows of segment s that some batch row keeps (rows[]) and their inputs, zero where a batch row
   drops the entry (vals[j * B + b]); every row when dense. Returns the number of rows. */
static int kept_rows(int *rows, float *vals, const float *h, int B, int K, const float *threshold) {
    int n = 0;
    for (int k = 0; k < K; k++) {
        int any = threshold == NULL;
        for (int b = 0; b < B && !any; b++)
            any = fabsf(h[(long)b * K + k]) > *threshold;
        if (!any)
            continue;
        for (int b = 0; b < B; b++) {
            float v = h[(long)b * K + k];
            vals[(long)n * B + b] = (threshold == NULL || fabsf(v) > *threshold) ? v : 0.0f;
        }
        rows[n++] = k;
    }
    return n;
}

static inline void prefetch_ahead(const void *w, long row_bytes, const int *rows, int j, int n_rows, int lines) {
    /* the first `lines` cache lines of the rows AHEAD places on from j, ROWS of them */
    for (int r = j + AHEAD; r < j + AHEAD + ROWS && r < n_rows; r++)
        for (int line = 0; line < lines; line++)
            __builtin_prefetch((const char *)w + rows[r] * row_bytes + 64 * line);
}

/* One thread's pass over the kept rows for columns [col0, col0 + width) of every batch row:
   acc[b * width + slot(c)] += sum over rows j of vals[j * B + b] * w_t[rows[j], col0 + c].
   ROWS rows at a time, so the accumulators are read and written once per ROWS rows of weights.
   Each row's slice is a short stream that the hardware prefetcher only picks up after its first
   misses; asking for the first line of the rows AHEAD rows on hides that. Timed on SmolLM2's
   block (one thread, 30 layers, paired runs): dense 10-15% and 50% sparse 2-10% faster in fp32,
   6-10% in bf16 (two lines there); the whole slice, or 4 lines, gained less. */
#define DEFINE_STREAM(name, T, LANES) /* the pass for rows of element type T (each value widened to float); \
                                         LANES: the columns a vector step took first */                      \
    static void name(float *restrict acc, int B, int width, const int *rows, const float *vals, int n_rows,      \
                     const T *w, long ldw) {                                                                       \
        int j = 0;                                                                                                 \
        for (; j + ROWS <= n_rows; j += ROWS) {                                                                    \
            const T *w0 = w + rows[j] * ldw, *w1 = w + rows[j + 1] * ldw, *w2 = w + rows[j + 2] * ldw,            \
                    *w3 = w + rows[j + 3] * ldw;                                                                   \
            prefetch_ahead(w, ldw * (long)sizeof(T), rows, j, n_rows, 1);                                          \
            for (int b = 0; b < B; b++) {                                                                          \
                const float *v = vals + (long)j * B + b;                                                           \
                float v0 = v[0], v1 = v[B], v2 = v[2 * B], v3 = v[3 * B];                                          \
                float *restrict a = acc + (long)b * width;                                                         \
                for (int c = LANES(a, w0, w1, w2, w3, v0, v1, v2, v3, width); c < width; c++)                    \
                    a[c] += v0 * (float)w0[c] + v1 * (float)w1[c] + v2 * (float)w2[c] + v3 * (float)w3[c];         \
            }                                                                                                      \
        }                                                                                                          \
        for (; j < n_rows; j++) {                                                                                  \
            const T *w0 = w + rows[j] * ldw;                                                                       \
            for (int b = 0; b < B; b++) {                                                                          \
                float v0 = vals[(long)j * B + b], *restrict a = acc + (long)b * width;                             \
                for (int c = 0; c < width; c++)                                                                    \
                    a[c] += v0 * (float)w0[c];                                                                     \
            }                                                                                                      \
        }                                                                                                          \
    }

/* fp32 rows: the auto-vectorized loop is already one load and one FMA a value. */
static inline int lanes_f32(float *a, const float *w0, const float *w1, const float *w2, const float *w3, float v0,
                            float v1, float v2, float v3, int width) {
    return 0;
}

DEFINE_STREAM(stream_f32, float, lanes_f32)

/* int8 weights (weight-only quantization, one scale per output column): the same pass on the
   integer values, a quarter of fp32's bytes; the caller multiplies each column's sum by its scale.
   With AVX2, eight columns a step, each row's eight bytes widened once (as stream_i4's). */
static inline int lanes_i8(float *restrict a, const int8_t *w0, const int8_t *w1, const int8_t *w2, const int8_t *w3,
                           float v0, float v1, float v2, float v3, int width) {
    int c = 0;
#ifdef HAVE_LANES8
    f32x8 s0 = splat8(v0), s1 = splat8(v1), s2 = splat8(v2), s3 = splat8(v3);
    for (; c + 8 <= width; c += 8) {
        f32x8 sum = load8(a + c) + (s0 * __builtin_convertvector(signed_bytes8(w0 + c), f32x8) +
                                    s1 * __builtin_convertvector(signed_bytes8(w1 + c), f32x8) +
                                    s2 * __builtin_convertvector(signed_bytes8(w2 + c), f32x8) +
                                    s3 * __builtin_convertvector(signed_bytes8(w3 + c), f32x8));
        memcpy(a + c, &sum, 32);
    }
#endif
    return c;
}

DEFINE_STREAM(stream_i8, int8_t, lanes_i8)

/* int4's vector step, as lanes_i8's, over a row's bytes (pairs of columns): the low nibbles' products
   into the even plane, the high ones' into the odd. Returns the pairs it took. */
static inline int lanes_i4(float *restrict even, float *restrict odd, const uint8_t *w0, const uint8_t *w1,
                           const uint8_t *w2, const uint8_t *w3, float v0, float v1, float v2, float v3, int pairs) {
    int i = 0;
#ifdef HAVE_LANES8
    f32x8 s0 = splat8(v0), s1 = splat8(v1), s2 = splat8(v2), s3 = splat8(v3);
    for (; i + 8 <= pairs; i += 8) {
        i32x8 q0 = bytes8(w0 + i), q1 = bytes8(w1 + i), q2 = bytes8(w2 + i), q3 = bytes8(w3 + i);
        f32x8 e = load8(even + i) + (s0 * __builtin_convertvector(q0 & 15, f32x8) +
                                     s1 * __builtin_convertvector(q1 & 15, f32x8) +
                                     s2 * __builtin_convertvector(q2 & 15, f32x8) +
                                     s3 * __builtin_convertvector(q3 & 15, f32x8));
        f32x8 o = load8(odd + i) + (s0 * __builtin_convertvector(q0 >> 4, f32x8) +
                                    s1 * __builtin_convertvector(q1 >> 4, f32x8) +
                                    s2 * __builtin_convertvector(q2 >> 4, f32x8) +
                                    s3 * __builtin_convertvector(q3 >> 4, f32x8));
        memcpy(even + i, &e, 32);
        memcpy(odd + i, &o, 32);
    }
#endif
    return i;
}

/* bf16 weights are read two at a time: the 32 bits of a column pair hold the even column's fp32
   value in their shifted low half and the odd one's in their masked high half, so a vector of
   pairs widens with one shift and one and. The accumulators of even and odd columns are then two
   planes, (acc[i], acc[pairs + i]) for columns (2i, 2i + 1); an odd last column comes after them. */
static inline void bf16_pair(const uint16_t *p, float *even, float *odd) {
    uint32_t u, lo, hi;
    memcpy(&u, p, 4);
    lo = u << 16;
    hi = u & 0xffff0000u;
    memcpy(even, &lo, 4);
    memcpy(odd, &hi, 4);
}

/* a[c] += the integer sums of a group (planes: even columns, odd ones) times its scales, plus xsum
   (its kept inputs' sum) times its offsets, for columns c of a row of scales and offsets from `at`;
   bf16 ones read a column pair at a time (bf16_pair), so that the loop vectorizes. */
static void scale_group_i4(float *restrict a, const float *even, const float *odd, float xsum, const void *scale,
                           const void *zero, long at, int pairs, int sdtype) {
    if (sdtype == BF16) {
        const uint16_t *s = (const uint16_t *)scale + at, *z = (const uint16_t *)zero + at;
        for (int i = 0; i < pairs; i++) {
            float s0, s1, z0, z1;
            bf16_pair(s + 2 * i, &s0, &s1);
            bf16_pair(z + 2 * i, &z0, &z1);
            a[2 * i] += even[i] * s0 + xsum * z0;
            a[2 * i + 1] += odd[i] * s1 + xsum * z1;
        }
        return;
    }
    for (int i = 0; i < pairs; i++) {
        a[2 * i] += even[i] * load(scale, at + 2 * i, sdtype) + xsum * load(zero, at + 2 * i, sdtype);
        a[2 * i + 1] += odd[i] * load(scale, at + 2 * i + 1, sdtype) + xsum * load(zero, at + 2 * i + 1, sdtype);
    }
}

/* int4 weights: two values a byte along a row (the low nibble the even column), in groups of `group`
   rows with a scale and an offset per group and column (w = q * scale + zero; sdtype: theirs). The
   kept rows of one group are summed as integers into `part`, then the group's sum times its scales,
   plus the sum of its kept inputs times its offsets, is added: one multiply-add per column and group
   (as the GPU kernel does per chunk). col: the tile's first column (even), N: the row of scales.
   `part` holds two planes, the even columns' sums then the odd ones' (as stream_bf16's pairs), so
   that the loop over a row's bytes reads and writes contiguous floats and vectorizes: a byte's low
   and high nibbles are one AND and one shift apart (with AVX2, eight bytes a step, each widened
   once: lanes_i4). ROWS rows a pass, prefetched AHEAD, as DEFINE_STREAM. */
static void stream_i4(float *restrict acc, int B, int width, const int *rows, const float *vals, int n_rows,
                      const uint8_t *w, long ldw, int group, const void *scale, const void *zero, int sdtype, long N,
                      long col) {
    int pairs = width / 2; /* width is even: segments and tiles are */
    float part[B * width], xsum[B]; /* width * B * 4 <= TILE_BYTES (tile_columns) */
    for (int j = 0; j < n_rows;) {
        int g = rows[j] / group, end = j;
        while (end < n_rows && rows[end] / group == g)
            end++;
        memset(part, 0, sizeof(part));
        memset(xsum, 0, sizeof(xsum));
        for (int n; j < end; j += n) { /* ROWS rows a pass; a group's last 1-3 with the missing ones weighted 0 */
            n = end - j < ROWS ? end - j : ROWS;
            const uint8_t *w0 = w + rows[j] * ldw, *w1 = n > 1 ? w + rows[j + 1] * ldw : w0,
                          *w2 = n > 2 ? w + rows[j + 2] * ldw : w0, *w3 = n > 3 ? w + rows[j + 3] * ldw : w0;
            prefetch_ahead(w, ldw, rows, j, n_rows, 1);
            for (int b = 0; b < B; b++) {
                const float *v = vals + (long)j * B + b;
                float v0 = v[0], v1 = n > 1 ? v[B] : 0.0f, v2 = n > 2 ? v[2 * B] : 0.0f, v3 = n > 3 ? v[3 * B] : 0.0f;
                float *restrict even = part + b * width, *restrict odd = even + pairs;
                xsum[b] += (v0 + v1) + (v2 + v3);
                for (int i = lanes_i4(even, odd, w0, w1, w2, w3, v0, v1, v2, v3, pairs); i < pairs; i++) {
                    even[i] += v0 * (float)(w0[i] & 15) + v1 * (float)(w1[i] & 15) + v2 * (float)(w2[i] & 15) +
                               v3 * (float)(w3[i] & 15);
                    odd[i] += v0 * (float)(w0[i] >> 4) + v1 * (float)(w1[i] >> 4) + v2 * (float)(w2[i] >> 4) +
                              v3 * (float)(w3[i] >> 4);
                }
            }
        }
        for (int b = 0; b < B; b++)
            scale_group_i4(acc + b * width, part + b * width, part + b * width + pairs, xsum[b], scale, zero,
                           (long)g * N + col, pairs, sdtype);
    }
}

static inline long slot(long c, int width, int dtype) {
    int pairs = width / 2;
    return dtype != BF16 || c >= 2 * pairs ? c : (c & 1) * pairs + c / 2;
}

static void stream_bf16(float *restrict acc, int B, int width, const int *rows, const float *vals, int n_rows,
                        const uint16_t *w, long ldw) {
    int pairs = width / 2, j = 0;
    for (; j + ROWS <= n_rows; j += ROWS) {
        const uint16_t *w0 = w + rows[j] * ldw, *w1 = w + rows[j + 1] * ldw, *w2 = w + rows[j + 2] * ldw,
                       *w3 = w + rows[j + 3] * ldw;
        prefetch_ahead(w, 2 * ldw, rows, j, n_rows, width > 32 ? 2 : 1); /* 32 values a line */
        for (int b = 0; b < B; b++) {
            const float *v = vals + (long)j * B + b;
            float v0 = v[0], v1 = v[B], v2 = v[2 * B], v3 = v[3 * B];
            float *restrict even = acc + (long)b * width, *restrict odd = even + pairs;
            for (int i = 0; i < pairs; i++) {
                float e0, o0, e1, o1, e2, o2, e3, o3;
                bf16_pair(w0 + 2 * i, &e0, &o0);
                bf16_pair(w1 + 2 * i, &e1, &o1);
                bf16_pair(w2 + 2 * i, &e2, &o2);
                bf16_pair(w3 + 2 * i, &e3, &o3);
                even[i] += v0 * e0 + v1 * e1 + v2 * e2 + v3 * e3;
                odd[i] += v0 * o0 + v1 * o1 + v2 * o2 + v3 * o3;
            }
            if (width & 1)
                even[2 * pairs] += v0 * bf16_to_f32(w0[width - 1]) + v1 * bf16_to_f32(w1[width - 1]) +
                                   v2 * bf16_to_f32(w2[width - 1]) + v3 * bf16_to_f32(w3[width - 1]);
        }
    }
    for (; j < n_rows; j++) {
        const uint16_t *w0 = w + rows[j] * ldw;
        for (int b = 0; b < B; b++) {
            float v0 = vals[(long)j * B + b];
            float *restrict even = acc + (long)b * width, *restrict odd = even + pairs;
            for (int i = 0; i < pairs; i++) {
                float e0, o0;
                bf16_pair(w0 + 2 * i, &e0, &o0);
                even[i] += v0 * e0;
                odd[i] += v0 * o0;
            }
            if (width & 1)
                even[2 * pairs] += v0 * bf16_to_f32(w0[width - 1]);
        }
    }
}

/* One matvec, shared by the threads that run its chunks: chunk c sums part c % parts of the kept
   rows of segment c / parts over the segment's columns, into its own plane of partial sums. */
typedef struct {
    int B, K, N, dtype, wtype, parts; /* dtype: the activations'; wtype: the weights' */
    const void *w;
    const void *scale, *zero; /* in sdtype: int8, (N,) column scales; int4, (K / group, N) scales and offsets */
    int group, sdtype;
    long ldw;
    const int *splits, *n_kept;
    const long *seg_start;  /* the first column of each segment */
    const float *lists;     /* segment s's kept rows (ints) and their inputs at lists + s * per_seg */
    size_t per_seg;
    float *sums;            /* (parts, B, N): see sums_at */
} matvec_job;

/* Part p's sums of the column tile [c0, c0 + width) of segment s, laid out (B, width) (bf16: each
   row's columns in slot() order). */
static inline float *sums_at(const matvec_job *j, int p, int s, long c0) {
    return j->sums + ((size_t)p * j->N + j->seg_start[s] + c0) * j->B;
}

static inline int tile_columns(int B) { return (TILE_BYTES / 4 / B) / UNIT * UNIT; }

static void matvec_chunk(void *ctx, int chunk) {
    matvec_job *j = ctx;
    int s = chunk / j->parts, p = chunk % j->parts, B = j->B, n = j->n_kept[s], tile = tile_columns(B);
    int r0 = (int)((long)n * p / j->parts), r1 = (int)((long)n * (p + 1) / j->parts);
    const int *rows = (const int *)(j->lists + s * j->per_seg) + r0;
    const float *vals = j->lists + s * j->per_seg + j->K + (long)r0 * B;
    for (long c0 = 0; c0 < j->splits[s]; c0 += tile) {
        int width = (int)(j->splits[s] - c0 < tile ? j->splits[s] - c0 : tile);
        float *acc = sums_at(j, p, s, c0);
        memset(acc, 0, sizeof(float) * B * width);
        long col = j->seg_start[s] + c0;
        if (j->wtype == BF16)
            stream_bf16(acc, B, width, rows, vals, r1 - r0, (const uint16_t *)j->w + col, j->ldw);
        else if (j->wtype == I8)
            stream_i8(acc, B, width, rows, vals, r1 - r0, (const int8_t *)j->w + col, j->ldw);
        else if (j->wtype == I4)
            stream_i4(acc, B, width, rows, vals, r1 - r0, (const uint8_t *)j->w + col / 2, j->ldw, j->group, j->scale,
                      j->zero, j->sdtype, j->N, col);
        else
            stream_f32(acc, B, width, rows, vals, r1 - r0, (const float *)j->w + col, j->ldw);
    }
}

/* y from the parts' sums: added in part order (int8: times the column's scale), rounded once; then
   the residual add, rounded. */
static void reduce_parts(const matvec_job *j, int n_seg, const void *residual, long ldr, void *y) {
    int B = j->B, dtype = j->dtype, tile = tile_columns(B);
    for (int s = 0; s < n_seg; s++) {
        for (long c0 = 0; c0 < j->splits[s]; c0 += tile) {
            int width = (int)(j->splits[s] - c0 < tile ? j->splits[s] - c0 : tile);
            long col = j->seg_start[s] + c0;
            for (int b = 0; b < B; b++) {
                for (int c = 0; c < width; c++) {
                    long at = (long)b * width + slot(c, width, j->wtype);
                    float v = sums_at(j, 0, s, c0)[at];
                    for (int p = 1; p < j->parts; p++)
                        v += sums_at(j, p, s, c0)[at];
                    if (j->wtype == I8)
                        v *= load(j->scale, col + c, j->sdtype);
                    v = round_to(v, dtype);
                    if (residual)
                        v = round_to(load(residual, b * ldr + col + c, dtype) + v, dtype);
                    put(y, (long)b * j->N + col + c, v, dtype);
                }
            }
        }
    }
}

/* x (B, K) rows ldx apart ((B, 2K) [gate | up] when silu), w_t (K, N) rows ldw apart, thresholds
   (n_seg,) fp32 or NULL (dense), splits: the segments' widths (summing to N), norm_weight (K,) or
   NULL, residual (B, N) rows ldr apart or NULL -> y (B, N) contiguous. Weights in the activations'
   dtype, or int8 (wtype I8) with column scales `scale` (N,) in sdtype, or int4 (wtype I4: w_t (K, N / 2) bytes,
   every segment's width even) with scales and offsets `scale`, `zero` (K / group, N) in sdtype.
   Returns 0, or -1 if scratch could not be allocated.
   The threads split each segment's kept rows (whole rows of W^T: one long stretch of memory each,
   the whole matrix in two streams when dense), each summing its rows over all of the segment's
   columns; the parts' sums are then added in a fixed order. The result depends on the number of
   threads (the order of the sums), not on which thread ran what. Splitting the columns instead
   (each thread half of every row, no partial sums) streamed 10-20% slower on SmolLM2's shapes
   (dense and sparse, 2 threads): its rows are half as long. */
int teal_sparse_matvec(int B, int K, int N, const void *x, long ldx, const void *w, long ldw, int dtype,
                       int wtype, const void *scale, const void *zero, int group, int sdtype, const float *thresholds,
                       const int *splits, int n_seg, int silu, const void *norm_weight, float eps, const void *residual,
                       long ldr, void *y, int n_threads) {
    size_t per_seg = (size_t)K * (B + 1); /* rows[] (as ints) and vals[] of one segment */
    int parts = chunks_for((long)K * N, n_threads);
    float *h = thread_scratch(INPUTS, (size_t)B * K + (size_t)n_seg * per_seg + K);
    float *sums = thread_scratch(SUMS, (size_t)parts * B * N);
    if (h == NULL || sums == NULL)
        return -1;
    float *lists = h + (size_t)B * K, *tmp = lists + (size_t)n_seg * per_seg;
    int n_kept[n_seg];
    long seg_start[n_seg];
    form_inputs(h, tmp, B, K, x, ldx, dtype, silu, norm_weight, eps);
    for (int s = 0; s < n_seg; s++) {
        n_kept[s] = kept_rows((int *)(lists + s * per_seg), lists + s * per_seg + K, h, B, K,
                              thresholds ? thresholds + s : NULL);
        seg_start[s] = s ? seg_start[s - 1] + splits[s - 1] : 0;
    }
    matvec_job job = {B, K, N, dtype, wtype, parts, w, scale, zero, group, sdtype, ldw, splits, n_kept, seg_start,
                      lists, per_seg, sums};
    run_parallel(matvec_chunk, &job, n_seg * parts, n_threads);
    reduce_parts(&job, n_seg, residual, ldr, y);
    return 0;
}

/* ---- The product in nn.Linear's layout: y = x @ w^T for w (N, K), one row per output ----
   A tied LM head is the embedding table, (vocab, dim): the largest single read of a decode step
   (SmolLM2: 113 MB of 538 MB in fp32) and never sparse. Each output is a dot product over one
   contiguous row, so the threads split the rows into long contiguous stretches that the hardware
   prefetcher streams; torch's fp32 product of this shape read at a third of the bandwidth here. */
typedef struct {
    int B, K, N, dtype, n_chunks;
    const float *x; /* (B, K) widened to fp32 */
    const void *w;
    long ldw;
    void *y;
} rows_job;

/* x . w over K with 16 partial sums (one running sum is a chain of K dependent multiply-adds). */
static inline float dot_row(const float *x, const void *w, int K, int dtype) {
    float part[16] = {0.0f};
    int k = 0;
    if (dtype == BF16) {
        const uint16_t *wb = w;
        for (; k + 16 <= K; k += 16)
            for (int i = 0; i < 16; i++)
                part[i] += x[k + i] * bf16_to_f32(wb[k + i]);
    } else {
        const float *wf = w;
        for (; k + 16 <= K; k += 16)
            for (int i = 0; i < 16; i++)
                part[i] += x[k + i] * wf[k + i];
    }
    float sum = 0.0f;
    for (int i = 0; i < 16; i++)
        sum += part[i];
    for (; k < K; k++)
        sum += x[k] * load(w, k, dtype);
    return sum;
}

static void rows_chunk(void *ctx, int chunk) {
    rows_job *j = ctx;
    int es = j->dtype == BF16 ? 2 : 4;
    for (long n = (long)j->N * chunk / j->n_chunks; n < (long)j->N * (chunk + 1) / j->n_chunks; n++) {
        const char *row = (const char *)j->w + n * j->ldw * es;
        for (int b = 0; b < j->B; b++)
            put(j->y, (long)b * j->N + n, dot_row(j->x + (long)b * j->K, row, j->K, j->dtype), j->dtype);
    }
}

/* x (B, K) rows ldx apart, w (N, K) rows ldw apart -> y (B, N) contiguous = x @ w^T: fp32 sums
   rounded once to the dtype. Returns 0, or -1 if scratch could not be allocated. */
int teal_linear_rows(int B, int K, int N, const void *x, long ldx, const void *w, long ldw, int dtype, void *y,
                     int n_threads) {
    float *xf = thread_scratch(INPUTS, (size_t)B * K);
    if (xf == NULL)
        return -1;
    form_inputs(xf, NULL, B, K, x, ldx, dtype, 0, NULL, 0.0f); /* the rows widened to fp32 */
    int n_chunks = chunks_for((long)K * N, n_threads);
    rows_job job = {B, K, N, dtype, n_chunks, xf, w, ldw, y};
    run_parallel(rows_chunk, &job, n_chunks, n_threads);
    return 0;
}

/* RoPE of one head of hd values (adjacent channel pairs), the table's cos/sin of one position; fp32
   math, rounded once to the dtype (reference.rope). */
static void rope_head(float *out, const void *src, const float *cos_sin, int hd, int dtype) {
    widen(out, src, hd, dtype);
    for (int i = 0; i < hd / 2; i++) {
        float a = out[2 * i], b = out[2 * i + 1], c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        out[2 * i] = a * c - b * s;
        out[2 * i + 1] = b * c + a * s;
    }
    round_all(out, hd, dtype);
}

static void store(void *dst, const float *src, int n, int dtype) {
    for (int i = 0; i < n; i++)
        put(dst, i, src[i], dtype);
}

/* One decode attention step, shared by the threads that run its chunks of (b, kv) heads. */
typedef struct {
    int B, KV, G, hd, dtype, n_chunks;
    const void *qkv;
    void *k_cache, *v_cache, *out;
    long ldq, sb, skv, ss, pos;
    const float *cos_sin;
    atomic_int failed;
} attention_job;

/* a . b with eight partial sums: a single running sum is a chain of n dependent multiply-adds. */
static inline float dot(const float *a, const float *b, int n) {
    float part[8] = {0.0f};
    int d = 0;
    for (; d + 8 <= n; d += 8)
        for (int i = 0; i < 8; i++)
            part[i] += a[d + i] * b[d + i];
    float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; d < n; d++)
        sum += a[d] * b[d];
    return sum;
}

/* The row of a cache at position s in fp32: the row itself (fp32) or widened into tmp (bf16). */
static inline const float *cache_row(const char *cache, long s, long ss, int hd, int dtype, float *tmp) {
    const char *row = cache + s * ss * (dtype == BF16 ? 2 : 4);
    if (dtype != BF16)
        return (const float *)row;
    widen(tmp, row, hd, dtype);
    return tmp;
}

static void attention_chunk(void *ctx, int chunk) {
    attention_job *j = ctx;
    int KV = j->KV, G = j->G, hd = j->hd, dtype = j->dtype, es = dtype == BF16 ? 2 : 4;
    long n = j->pos + 1, ss = j->ss; /* positions attended to */
    float scale = 1.0f / sqrtf((float)hd);
    float *buf = thread_scratch(WORK, (2 * (size_t)G + 1) * hd + (size_t)G * n);
    if (buf == NULL) {
        atomic_store(&j->failed, 1);
        return;
    }
    float *q = buf, *o = q + (size_t)G * hd, *tmp = o + (size_t)G * hd, *p = tmp + hd; /* p: (G, n) */
    int heads = j->B * KV;
    for (int bk = heads * chunk / j->n_chunks; bk < heads * (chunk + 1) / j->n_chunks; bk++) {
        int b = bk / KV, kv = bk % KV;
        const char *row = (const char *)j->qkv + b * j->ldq * es;
        char *kc = (char *)j->k_cache + (b * j->sb + kv * j->skv) * es;
        char *vc = (char *)j->v_cache + (b * j->sb + kv * j->skv) * es;
        rope_head(tmp, row + ((long)KV * G + kv) * hd * es, j->cos_sin, hd, dtype); /* this step's k and v */
        store(kc + j->pos * ss * es, tmp, hd, dtype);
        memcpy(vc + j->pos * ss * es, row + ((long)KV * G + KV + kv) * hd * es, (size_t)hd * es);
        for (int g = 0; g < G; g++) /* the G query heads of this kv head, each cache row read once for all */
            rope_head(q + (size_t)g * hd, row + ((long)kv * G + g) * hd * es, j->cos_sin, hd, dtype);
        for (long s = 0; s < n; s++) {
            const float *k = cache_row(kc, s, ss, hd, dtype, tmp);
            for (int g = 0; g < G; g++)
                p[g * n + s] = dot(q + (size_t)g * hd, k, hd) * scale;
        }
        for (int g = 0; g < G; g++) { /* softmax in fp32, the probabilities rounded to the dtype */
            float *pg = p + g * n, top = -INFINITY, sum = 0.0f;
            for (long s = 0; s < n; s++)
                top = pg[s] > top ? pg[s] : top;
            for (long s = 0; s < n; s++) {
                pg[s] = exp_f32(pg[s] - top);
                sum += pg[s];
            }
            for (long s = 0; s < n; s++)
                pg[s] /= sum;
            round_all(pg, (int)n, dtype);
        }
        memset(o, 0, sizeof(float) * G * hd);
        for (long s = 0; s < n; s++) {
            const float *v = cache_row(vc, s, ss, hd, dtype, tmp);
            for (int g = 0; g < G; g++)
                for (int d = 0; d < hd; d++)
                    o[g * hd + d] += p[g * n + s] * v[d];
        }
        for (int g = 0; g < G; g++)
            store((char *)j->out + (((long)b * KV + kv) * G + g) * hd * es, o + (size_t)g * hd, hd, dtype);
    }
}

/* The causal decode step of reference.decode_attention_step_ref, one position per sequence.
   qkv (B, (KV G + 2 KV) hd) rows ldq apart: [q | k | v], head h = kv * G + g. The caches (B, KV, S,
   hd) with strides (sb, skv, ss) and unit stride along hd; rope_table (>= S, hd / 2, 2) fp32.
   Writes rope(k) and v into the caches at pos, then out (B, KV, G, hd) = softmax(q k^T / sqrt(hd))
   over positions 0..pos, the probabilities rounded to the dtype, times v: fp32 sums rounded once.
   The (b, kv) heads are split between threads when the caches are long enough to pay for it. */
int teal_decode_attention_step(int B, int KV, int G, int hd, const void *qkv, long ldq, void *k_cache,
                               void *v_cache, long sb, long skv, long ss, const float *rope_table, long pos,
                               void *out, int dtype, int n_threads) {
    int heads = B * KV, n_chunks = (long)heads * (pos + 1) * hd < (1L << 18) ? 1 : heads < n_threads ? heads : n_threads;
    attention_job job = {B, KV, G, hd, dtype, n_chunks, qkv, k_cache, v_cache, out, ldq, sb, skv, ss, pos,
                         rope_table + pos * hd, 0};
    run_parallel(attention_chunk, &job, n_chunks, n_threads);
    return atomic_load(&job.failed) ? -1 : 0;
}
