/* The sparse matvec of sparse_kernels/reference.py on the CPU: reads only the kept rows of W^T.

   y[b, n] = [residual[b, n] +] sum_k h[b, k] * (|h[b, k]| > t_s) * w_t[k, n], n in segment s,
   h = x, rms_norm(x) * norm_weight, or silu(gate) * up: the reference's roundings (its docstring).

   A decode step's matvec is bound by memory bandwidth, so the work is arranged around the bytes
   of W^T: the threads split the output columns (each streams its column slice of every kept row,
   no reduction between threads), weighted by the kept rows of each column's segment so that a
   segment with a low threshold does not leave the other threads idle. Every thread forms the
   (cheap) inputs and kept-row lists itself: no barrier inside the op. Weights are fp32 or bf16;
   products are summed in fp32. Built by sparse_kernels/cpu.py (cc -O3 -march=native -fopenmp).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { F32 = 0, BF16 = 1 };

#define UNIT 16        /* columns are split in units of 16 (64 bytes of fp32: one cache line) */
#define ROWS 4         /* kept rows summed per pass over the accumulators */
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

/* Per-thread scratch, grown on demand and kept: the pool's threads live as long as the process. */
static __thread float *scratch;
static __thread size_t scratch_floats;

static float *thread_scratch(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = malloc(floats * sizeof(float));
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

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

/* h (B, K): the values the thresholds see, each a value of the dtype (held in fp32); tmp: K floats. */
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

/* One thread's pass over the kept rows for columns [col0, col0 + width) of every batch row:
   acc[b * width + slot(c)] += sum over rows j of vals[j * B + b] * w_t[rows[j], col0 + c].
   ROWS rows at a time, so the accumulators are read and written once per ROWS rows of weights. */
static void stream_f32(float *restrict acc, int B, int width, const int *rows, const float *vals, int n_rows,
                       const float *w, long ldw) {
    int j = 0;
    for (; j + ROWS <= n_rows; j += ROWS) {
        const float *w0 = w + rows[j] * ldw, *w1 = w + rows[j + 1] * ldw, *w2 = w + rows[j + 2] * ldw,
                    *w3 = w + rows[j + 3] * ldw;
        for (int b = 0; b < B; b++) {
            const float *v = vals + (long)j * B + b;
            float v0 = v[0], v1 = v[B], v2 = v[2 * B], v3 = v[3 * B];
            float *restrict a = acc + (long)b * width;
            for (int c = 0; c < width; c++)
                a[c] += v0 * w0[c] + v1 * w1[c] + v2 * w2[c] + v3 * w3[c];
        }
    }
    for (; j < n_rows; j++) {
        const float *w0 = w + rows[j] * ldw;
        for (int b = 0; b < B; b++) {
            float v0 = vals[(long)j * B + b], *restrict a = acc + (long)b * width;
            for (int c = 0; c < width; c++)
                a[c] += v0 * w0[c];
        }
    }
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

/* The columns [*lo, *hi) of thread t of T: equal shares of the work, a column of segment s costing
   its segment's kept rows (plus one, for the output), in units of UNIT columns inside a segment. */
static void thread_columns(int t, int T, int n_seg, const int *splits, const int *n_kept, long *lo, long *hi) {
    double total = 0.0;
    for (int s = 0; s < n_seg; s++)
        total += (double)splits[s] * (n_kept[s] + 1);
    double from = total * t / T, to = total * (t + 1) / T, done = 0.0;
    long start = 0;
    *lo = *hi = -1;
    for (int s = 0; s < n_seg; s++) {
        double cost = n_kept[s] + 1;
        for (long c = 0; c < splits[s]; c += UNIT) { /* a unit belongs to the thread its first column's work falls in */
            if (*lo < 0 && done >= from)
                *lo = start + c;
            if (*hi < 0 && done >= to)
                *hi = start + c;
            long width = splits[s] - c < UNIT ? splits[s] - c : UNIT;
            done += cost * width;
        }
        start += splits[s];
    }
    if (*lo < 0)
        *lo = start;
    if (*hi < 0 || t == T - 1)
        *hi = start;
}

/* x (B, K) rows ldx apart ((B, 2K) [gate | up] when silu), w_t (K, N) rows ldw apart, thresholds
   (n_seg,) fp32 or NULL (dense), splits: the segments' widths (summing to N), norm_weight (K,) or
   NULL, residual (B, N) rows ldr apart or NULL -> y (B, N) contiguous. Returns 0, or -1 if scratch
   could not be allocated. */
int teal_sparse_matvec(int B, int K, int N, const void *x, long ldx, const void *w, long ldw, int dtype,
                       const float *thresholds, const int *splits, int n_seg, int silu, const void *norm_weight,
                       float eps, const void *residual, long ldr, void *y, int n_threads) {
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int t = 0, T = 1;
#endif
        int tile = (TILE_BYTES / 4 / B) / UNIT * UNIT;
        size_t per_seg = (size_t)K * (B + 1); /* rows[] (as ints) and vals[] of one segment */
        float *buf = thread_scratch((size_t)B * K + (size_t)n_seg * per_seg + (size_t)B * tile + K);
        if (buf == NULL) {
            failed = 1;
        } else {
            float *h = buf, *acc = buf + (size_t)B * K + (size_t)n_seg * per_seg, *tmp = acc + (size_t)B * tile;
            int n_kept[n_seg];
            form_inputs(h, tmp, B, K, x, ldx, dtype, silu, norm_weight, eps);
            for (int s = 0; s < n_seg; s++) {
                float *seg = h + (size_t)B * K + s * per_seg;
                n_kept[s] = kept_rows((int *)seg, seg + K, h, B, K, thresholds ? thresholds + s : NULL);
            }
            long lo, hi, start = 0;
            thread_columns(t, T, n_seg, splits, n_kept, &lo, &hi);
            for (int s = 0; s < n_seg; s++) {
                long a = lo > start ? lo : start, e = hi < start + splits[s] ? hi : start + splits[s];
                float *seg = h + (size_t)B * K + s * per_seg;
                for (long c0 = a; c0 < e; c0 += tile) {
                    int width = (int)(e - c0 < tile ? e - c0 : tile);
                    memset(acc, 0, sizeof(float) * B * width);
                    if (dtype == BF16)
                        stream_bf16(acc, B, width, (const int *)seg, seg + K, n_kept[s], (const uint16_t *)w + c0, ldw);
                    else
                        stream_f32(acc, B, width, (const int *)seg, seg + K, n_kept[s], (const float *)w + c0, ldw);
                    for (int b = 0; b < B; b++) { /* the sum rounded once; then the residual add, rounded */
                        for (int c = 0; c < width; c++) {
                            float v = round_to(acc[(long)b * width + slot(c, width, dtype)], dtype);
                            if (residual)
                                v = round_to(load(residual, b * ldr + c0 + c, dtype) + v, dtype);
                            if (dtype == BF16)
                                ((uint16_t *)y)[(long)b * N + c0 + c] = f32_to_bf16(v);
                            else
                                ((float *)y)[(long)b * N + c0 + c] = v;
                        }
                    }
                }
                start += splits[s];
            }
        }
    }
    return failed ? -1 : 0;
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
    for (int i = 0; i < n; i++) {
        if (dtype == BF16)
            ((uint16_t *)dst)[i] = f32_to_bf16(src[i]);
        else
            ((float *)dst)[i] = src[i];
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
    int es = dtype == BF16 ? 2 : 4, failed = 0;
    long n = pos + 1; /* positions attended to */
    float scale = 1.0f / sqrtf((float)hd);
    const float *cos_sin = rope_table + pos * hd;
#pragma omp parallel for num_threads(n_threads) if ((long)B * KV * n * hd > (1L << 18)) reduction(| : failed)
    for (int bk = 0; bk < B * KV; bk++) {
        int b = bk / KV, kv = bk % KV;
        float *buf = thread_scratch(3 * (size_t)hd + n);
        if (buf == NULL) {
            failed = 1;
            continue;
        }
        float *q = buf, *o = buf + hd, *tmp = buf + 2 * hd, *p = buf + 3 * hd;
        const char *row = (const char *)qkv + b * ldq * es;
        char *kc = (char *)k_cache + (b * sb + kv * skv) * es, *vc = (char *)v_cache + (b * sb + kv * skv) * es;
        rope_head(tmp, row + ((long)KV * G + kv) * hd * es, cos_sin, hd, dtype); /* this step's k and v */
        store(kc + pos * ss * es, tmp, hd, dtype);
        memcpy(vc + pos * ss * es, row + ((long)KV * G + KV + kv) * hd * es, (size_t)hd * es);
        for (int g = 0; g < G; g++) {
            rope_head(q, row + ((long)kv * G + g) * hd * es, cos_sin, hd, dtype);
            float top = -INFINITY, sum = 0.0f;
            for (long s = 0; s < n; s++) {
                widen(tmp, kc + s * ss * es, hd, dtype);
                float dot = 0.0f;
                for (int d = 0; d < hd; d++)
                    dot += q[d] * tmp[d];
                p[s] = dot * scale;
                top = p[s] > top ? p[s] : top;
            }
            for (long s = 0; s < n; s++) {
                p[s] = exp_f32(p[s] - top);
                sum += p[s];
            }
            for (long s = 0; s < n; s++)
                p[s] /= sum;
            round_all(p, (int)n, dtype);
            memset(o, 0, sizeof(float) * hd);
            for (long s = 0; s < n; s++) {
                widen(tmp, vc + s * ss * es, hd, dtype);
                for (int d = 0; d < hd; d++)
                    o[d] += p[s] * tmp[d];
            }
            store((char *)out + (((long)b * KV + kv) * G + g) * hd * es, o, hd, dtype);
        }
    }
    return failed ? -1 : 0;
}
