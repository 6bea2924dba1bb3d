/* A CPU decode step's attention (one query per row) on the native pool: what the numba kernel in
 * glm_tp/kernels/cpu_attention.py computes, from the same inputs. Rotary on the query and the new key,
 * the key and value written into the cache at each row's slot, then softmax(q k^T / sqrt(d)) v over the
 * window with every score, the max-subtracted exponentials and the weighted sum in fp32, the cache read
 * as it is (fp32 or bf16 bits). Grouped-query layers read their group's KV head in place; a task serves
 * up to 4 query heads of a group, reading each cached key and value once for them.
 *
 * One body, compiled for AVX-512, AVX2 and portable C: the dot products keep 16 partial sums (one
 * vector's lanes) added in a fixed order; the SIMD paths fuse multiply-adds, so they differ from the
 * portable one by fp32 rounding only. The ABI (glm_decode_attention) is what native_attention.py declares. */
#define _ISOC11_SOURCE
#include "gemv.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* multiply-adds fused where the target has FMA (the AVX2 and AVX-512 paths), as numba's fastmath fuses them */
#pragma GCC optimize("fp-contract=fast")

#define LANES 16
#define ALWAYS static inline __attribute__((always_inline))

typedef struct {
    const void *qkv, *cos, *sin; /* [rows, width] (fp32, or bf16 bits: act_bf16), [rows, d] (trig_bf16) */
    const int64_t *slots;        /* [rows] */
    void *k, *v;                 /* the layer's cache: row r, KV head g, slot s at r * rs + g * hs + s * d */
    const uint8_t *hidden;       /* [rows, window], 1 = masked */
    void *out;                   /* [rows, heads * d], as qkv */
    int64_t rows, kv_heads, d, window, width, rs, hs;
    int heads, half, hb, blocks, act_bf16, trig_bf16, cache_bf16, q_step, kv_step;
    int64_t k0, v0;
    float scale;
} attn_job;

ALWAYS float load(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* the head vector at qkv[r, base:] rotated into dst[d] (half 0: interleaved pairs (2i, 2i + 1), else NeoX
 * blocks of 2 half: the first half pairing with the second); loops without divisions (an int64 division
 * per element cost more than the attention at a 128-slot window) */
ALWAYS void rotate_head(const attn_job *j, int64_t r, int64_t base, float *dst) {
    const int64_t d = j->d, x = r * j->width + base, t = r * d;
    const int bf = j->act_bf16, tb = j->trig_bf16;
    if (j->half == 0) {
        for (int64_t e = 0; e < d; e += 2) {
            const float a = load(j->qkv, bf, x + e), b = load(j->qkv, bf, x + e + 1);
            dst[e] = a * load(j->cos, tb, t + e) + b * -1.0f * load(j->sin, tb, t + e);
            dst[e + 1] = b * load(j->cos, tb, t + e + 1) + a * load(j->sin, tb, t + e + 1);
        }
        return;
    }
    const int64_t h = j->half;
    for (int64_t b0 = 0; b0 < d; b0 += 2 * h)
        for (int64_t i = b0; i < b0 + h; i++) {
            const float a = load(j->qkv, bf, x + i), b = load(j->qkv, bf, x + i + h);
            dst[i] = a * load(j->cos, tb, t + i) + b * -1.0f * load(j->sin, tb, t + i);
            dst[i + h] = b * load(j->cos, tb, t + i + h) + a * load(j->sin, tb, t + i + h);
        }
}

/* numba's _exp (cpu.py): 2^n * e^r, |r| <= ln2 / 2, in plain arithmetic that vectorizes; a few ulp */
ALWAYS float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x; /* not fminf/fmaxf: library calls, not vectorized */
    const float n = floorf(x * 1.4426950408889634f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r * r + r) + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

/* LANES floats: GCC's vector extension, one AVX-512 register (two AVX2 ones, four SSE ones) */
typedef float vec __attribute__((vector_size(4 * LANES)));

ALWAYS vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef uint16_t vec_u16 __attribute__((vector_size(2 * LANES)));
typedef uint32_t vec_u32 __attribute__((vector_size(4 * LANES)));

/* LANES cached elements from element i as fp32: read in place, bf16 widened in registers (a copy of
 * the widened row measured ~30 % slower for one head; a task of several heads widens it once) */
ALWAYS vec vload_cached(const void *c, const int bf16, int64_t i) {
    if (!bf16) return vload((const float *)c + i);
    vec_u16 h;
    memcpy(&h, (const uint16_t *)c + i, sizeof h);
    const vec_u32 u = __builtin_convertvector(h, vec_u32) << 16;
    vec v;
    memcpy(&v, &u, sizeof v);
    return v;
}

typedef int32_t vec_i32 __attribute__((vector_size(4 * LANES)));

/* fast_exp on LANES values at once: the compiler does not vectorize its clamp and floor (fminf, fmaxf and
 * floorf keep their NaN and trap rules under -std=c11), so they are written as lane masks */
ALWAYS vec vexp(vec x) {
    const vec lo = x * 0 - 87.0f, hi = x * 0 + 88.0f;
    vec_i32 m = x < lo;
    x = (vec)(((vec_i32)x & ~m) | ((vec_i32)lo & m));
    m = x > hi;
    x = (vec)(((vec_i32)x & ~m) | ((vec_i32)hi & m));
    const vec y = x * 1.4426950408889634f + 0.5f;
    const vec_i32 t = __builtin_convertvector(y, vec_i32); /* truncation, then down where y < 0 */
    const vec_i32 ni = t + (__builtin_convertvector(t, vec) > y);
    const vec n = __builtin_convertvector(ni, vec);
    const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vec p = r * 0 + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r * r + r) + 1.0f;
    return p * (vec)((ni + 127) << 23);
}

/* a bf16 cached row as fp32 */
ALWAYS void widen(const void *c, int64_t at, int64_t d, float *row) {
    int64_t e = 0;
    for (; e + LANES <= d; e += LANES) {
        const vec x = vload_cached(c, 1, at + e);
        memcpy(row + e, &x, sizeof x);
    }
    for (; e < d; e++) row[e] = load(c, 1, at + e);
}

typedef float half_vec __attribute__((vector_size(2 * LANES)));
typedef float quarter_vec __attribute__((vector_size(LANES)));

/* the lanes' sum as a tree of vector adds: halves, then quarters (a chain of scalar adds, or a tree
 * through memory, measured slower) */
ALWAYS float lane_sum(vec v) {
    half_vec lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    const half_vec h = lo + hi;
    quarter_vec a, b;
    memcpy(&a, &h, sizeof a);
    memcpy(&b, (const char *)&h + sizeof a, sizeof b);
    const quarter_vec q = a + b;
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* sum of a[e] * c[at + e] (c cached): two chains of LANES partial sums (so the multiply-adds overlap),
 * added in a fixed order */
ALWAYS float dot(const float *a, const void *c, const int bf16, int64_t at, int64_t d) {
    vec p0 = {0}, p1 = {0};
    int64_t e = 0;
    for (; e + 2 * LANES <= d; e += 2 * LANES) {
        p0 += vload(a + e) * vload_cached(c, bf16, at + e);
        p1 += vload(a + e + LANES) * vload_cached(c, bf16, at + e + LANES);
    }
    if (e + LANES <= d) p0 += vload(a + e) * vload_cached(c, bf16, at + e), e += LANES;
    float acc = lane_sum(p0 + p1);
    for (; e < d; e++) acc += a[e] * load(c, bf16, at + e);
    return acc;
}

/* acc[e] += p * c[at + e] (c cached) */
ALWAYS void axpy(float *acc, float p, const void *c, const int bf16, int64_t at, int64_t d) {
    int64_t e = 0;
    for (; e + LANES <= d; e += LANES) {
        const vec x = vload(acc + e) + p * vload_cached(c, bf16, at + e);
        memcpy(acc + e, &x, sizeof x);
    }
    for (; e < d; e++) acc[e] += p * load(c, bf16, at + e);
}

/* one task: query heads h0 .. h0 + hb - 1 of row r, all on KV head g (bf16: the cache's, a constant so
 * that each case compiles apart). buf: hb * (window + 2 d) + d floats */
ALWAYS void task_body(const attn_job *j, int64_t r, int64_t g, int64_t h0, float *buf, const int bf16) {
    const int64_t d = j->d, w = j->window, hb = j->hb, base = r * j->rs + g * j->hs;
    float *scores = buf, *qf = scores + hb * w, *acc = qf + hb * d, *row = acc + hb * d;
    float top[4], total[4];
    const uint8_t *hidden = j->hidden + r * w;
    for (int64_t i = 0; i < hb; i++) {
        rotate_head(j, r, (h0 + i) * j->q_step, qf + i * d);
        for (int64_t e = 0; e < d; e++) qf[i * d + e] *= j->scale;
        top[i] = -INFINITY, total[i] = 0;
    }
    memset(scores, 0, (size_t)(hb * w) * 4);
    memset(acc, 0, (size_t)(hb * d) * 4);
    for (int64_t s = 0; s < w; s++) {
        if (hidden[s]) continue;
        const int64_t at = base + s * d;
        const int copy = bf16 && hb > 1; /* widened once for the heads that read it */
        if (copy) widen(j->k, at, d, row);
        for (int64_t i = 0; i < hb; i++) {
            const float x = copy ? dot(qf + i * d, row, 0, 0, d) : dot(qf + i * d, j->k, bf16, at, d);
            scores[i * w + s] = x;
            top[i] = x > top[i] ? x : top[i];
        }
    }
    if (top[0] > -INFINITY) { /* the row sees a key (the mask is per row: every head sees the same keys) */
        for (int64_t i = 0; i < hb; i++) { /* over the whole window (hidden slots' values are never used) */
            float *p = scores + i * w;
            int64_t s = 0;
            for (; s + LANES <= w; s += LANES) {
                const vec x = vexp(vload(p + s) - top[i]);
                memcpy(p + s, &x, sizeof x);
            }
            for (; s < w; s++) p[s] = fast_exp(p[s] - top[i]);
        }
        for (int64_t s = 0; s < w; s++) {
            if (hidden[s]) continue;
            const int64_t at = base + s * d;
            const int copy = bf16 && hb > 1;
            if (copy) widen(j->v, at, d, row);
            for (int64_t i = 0; i < hb; i++) {
                const float p = scores[i * w + s];
                total[i] += p;
                if (copy) axpy(acc + i * d, p, row, 0, 0, d);
                else axpy(acc + i * d, p, j->v, bf16, at, d);
            }
        }
    }
    for (int64_t i = 0; i < hb; i++) {
        const float inv = total[i] > 0 ? 1.0f / total[i] : 0.0f;
        for (int64_t e = 0; e < d; e++)
            store(j->out, j->act_bf16, r * j->heads * d + (h0 + i) * d + e, acc[i * d + e] * inv);
    }
}

ALWAYS void tasks_body(const attn_job *j, int64_t t0, int64_t t1, float *buf) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t / (j->kv_heads * j->blocks), g = (t / j->blocks) % j->kv_heads;
        const int64_t h0 = (t % (j->kv_heads * j->blocks)) * j->hb;
        if (j->cache_bf16) task_body(j, r, g, h0, buf, 1);
        else task_body(j, r, g, h0, buf, 0);
    }
}

static void tasks_generic(const attn_job *j, int64_t t0, int64_t t1, float *buf) { tasks_body(j, t0, t1, buf); }
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static void tasks_avx2(const attn_job *j, int64_t t0, int64_t t1, float *buf) {
    tasks_body(j, t0, t1, buf);
}
__attribute__((target("avx512f,avx512bw"))) static void tasks_avx512(const attn_job *j, int64_t t0, int64_t t1,
                                                                     float *buf) {
    tasks_body(j, t0, t1, buf);
}
#endif

typedef struct {
    const attn_job *job;
    int isa;
    atomic_int failed; /* a part that could not get its buffer */
} attn_call;

static void run_tasks(void *ctx, int64_t t0, int64_t t1) {
    attn_call *c = ctx;
    const attn_job *j = c->job;
    float *buf = malloc((size_t)(j->hb * (j->window + 2 * j->d) + j->d) * 4);
    if (!buf) { /* reported after the call; the other parts still run */
        atomic_store(&c->failed, 1);
        return;
    }
#if defined(__x86_64__) || defined(__i386__)
    if (c->isa == ISA_VNNI512) tasks_avx512(j, t0, t1, buf);
    else if (c->isa == ISA_AVX2) tasks_avx2(j, t0, t1, buf);
    else
#endif
        tasks_generic(j, t0, t1, buf);
    free(buf);
}

/* this step's rotated key and value of each (row, KV head) at the row's slot, before any task reads them */
static void store_kv(const attn_job *j, float *key) {
    for (int64_t r = 0; r < j->rows; r++)
        for (int64_t g = 0; g < j->kv_heads; g++) {
            const int64_t at = r * j->rs + g * j->hs + j->slots[r] * j->d;
            rotate_head(j, r, j->k0 + g * j->kv_step, key);
            for (int64_t e = 0; e < j->d; e++) {
                store(j->k, j->cache_bf16, at + e, key[e]);
                store(j->v, j->cache_bf16, at + e, load(j->qkv, j->act_bf16, r * j->width + j->v0 + g * j->kv_step + e));
            }
        }
}

/* qkv [rows, (heads + 2 kv_heads) d]: grouped [q ; k ; v] (grouped 1) or head-major (each head's q, k, v;
 * heads = kv_heads); cos, sin [rows, d]; slots [rows]; k, v: cache rows of kv_heads x cache_slots x d
 * elements, row stride rs and head stride hs elements (slots contiguous); hidden [rows, window] bytes,
 * 1 = masked; out [rows, heads d]. act_bf16: qkv and out are bf16 bits, else fp32; trig_bf16: cos and
 * sin; cache_bf16: the cache. rotary: 0 interleaved pairs, 1 or 2 NeoX blocks per head. Returns 0, or -1 if refused
 * (an unsupported path or shape, a slot outside the cache, no memory). */
int glm_decode_attention(int isa, const void *qkv, const void *cos, const void *sin, const int64_t *slots,
                         void *k, void *v, int64_t rs, int64_t hs, int64_t cache_slots, const uint8_t *hidden,
                         int64_t rows, int64_t kv_heads, int64_t d, int64_t window, int heads, int grouped,
                         int rotary, int act_bf16, int trig_bf16, int cache_bf16, void *out, int nthreads) {
    if (!gemv_isa_supported(isa) || rows < 1 || kv_heads < 1 || d < 1 || heads < kv_heads || heads % kv_heads ||
        (!grouped && heads != kv_heads) || window < 1 || window > cache_slots || rotary < 0 || rotary > 2 ||
        (rotary == 0 ? d % 2 : d % (2 * rotary)))
        return -1;
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= cache_slots) return -1;
    const int per = heads / kv_heads, hb = per % 4 == 0 ? 4 : per % 2 == 0 ? 2 : 1;
    attn_job j = {qkv, cos, sin, slots, k, v, hidden, out, rows, kv_heads, d, window, (heads + 2 * kv_heads) * d,
                  rs, hs, heads, rotary == 0 ? 0 : (int)(d / (2 * rotary)), hb, per / hb, act_bf16, trig_bf16, cache_bf16,
                  (int)(grouped ? d : 3 * d), (int)(grouped ? d : 3 * d), grouped ? heads * d : d,
                  grouped ? (heads + kv_heads) * d : 2 * d, 1.0f / sqrtf((float)d)};
    attn_call c = {&j, isa};
    atomic_init(&c.failed, 0);
    const int64_t tasks = rows * kv_heads * j.blocks;
    float *key = malloc((size_t)d * 4);
    if (!key) return -1;
    pthread_mutex_lock(&glm_call_lock); /* the pool is shared with the GEMVs */
    store_kv(&j, key);
    free(key);
    pool_run(nthreads < 1 ? 1 : nthreads > tasks ? (int)tasks : nthreads, run_tasks, &c, tasks, 1);
    pthread_mutex_unlock(&glm_call_lock);
    return atomic_load(&c.failed) ? -1 : 0;
}
