/* glm-tp's native CPU GEMV for its quantized weights, loaded with ctypes by glm_tp/kernels/native.py.
 *
 * y[b, n] = s[n] * sum over blocks j of Q8_BLOCK input columns of dot(W[n, j], xq[b, j]) * dx[b, j]
 * where xq, dx are the activations quantized per block (Q8_0: dx = absmax / 127, xq = round-half-even(x /
 * dx), 0 for an all-zero block) once per call, W is the int8 weight ([out, in], row absmax) or the INT4
 * weight in halves layout ([out, in / 2], byte j = (q[j] + 8) | (q[in / 2 + j] + 8) << 4), and s the
 * row scales (fp16 in the checkpoint, passed here as fp32). The dot products are exact int32; the block
 * sums are fp32, so paths differ only in fp32 summation order. Output rows are split over a thread pool.
 * The ABI (the glm_* functions below) is what native.py declares. */
#define _ISOC11_SOURCE
#include "gemv.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- the portable path ---- */

static void scalar_int8_tile(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx, const int32_t *corr,
                             int mt, float *res) {
    (void)corr;
    const int8_t *ws = (const int8_t *)w;
    for (int r = 0; r < mt; r++) {
        const int8_t *x = xq + r * k;
        float acc = 0;
        for (int64_t j = 0; j < k; j += Q8_BLOCK) {
            int32_t s = 0;
            for (int i = 0; i < Q8_BLOCK; i++) s += ws[j + i] * x[j + i];
            acc += (float)s * dx[r * (k / 4) + j / 4];
        }
        res[r] = acc;
    }
}

static void scalar_int4_tile(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx, const int32_t *corr,
                             int mt, float *res) {
    (void)corr;
    const int64_t half = k / 2;
    for (int r = 0; r < mt; r++) {
        const int8_t *x = xq + r * k;
        float acc = 0;
        for (int64_t j = 0; j < half; j += Q8_BLOCK) {
            int32_t lo = 0, hi = 0;
            for (int i = 0; i < Q8_BLOCK; i++) {
                lo += ((w[j + i] & 0x0F) - 8) * x[j + i];
                hi += ((w[j + i] >> 4) - 8) * x[half + j + i];
            }
            acc += (float)lo * dx[r * (k / 4) + j / 4];
            acc += (float)hi * dx[r * (k / 4) + (half + j) / 4];
        }
        res[r] = acc;
    }
}

static const isa_ops SCALAR = {scalar_int8_tile, scalar_int4_tile, 8, 0, 0};
const isa_ops *gemv_ops_scalar(void) { return &SCALAR; }

/* ---- activation quantization (one definition, compiled per target so it vectorizes) ---- */

static inline __attribute__((always_inline)) void quantize_body(const void *x, int x_bf16, int64_t m, int64_t k,
                                                                int8_t *xq, float *dx) {
    for (int64_t b = 0; b < m * k / Q8_BLOCK; b++) {
        float v[Q8_BLOCK], amax = 0;
        if (x_bf16) {
            const uint16_t *h = (const uint16_t *)x + b * Q8_BLOCK;
            for (int i = 0; i < Q8_BLOCK; i++) {
                uint32_t u = (uint32_t)h[i] << 16;
                memcpy(&v[i], &u, 4);
            }
        } else {
            memcpy(v, (const float *)x + b * Q8_BLOCK, sizeof v);
        }
        for (int i = 0; i < Q8_BLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float d = amax / 127.0f;
        for (int i = 0; i < Q8_BLOCK; i++) xq[b * Q8_BLOCK + i] = (int8_t)(d == 0.0f ? 0.0f : rintf(v[i] / d));
        for (int i = 0; i < SCALE_COPIES; i++) dx[b * SCALE_COPIES + i] = d;
    }
}

void quantize_rows_scalar(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *dx) {
    quantize_body(x, x_bf16, m, k, xq, dx);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) void quantize_rows_avx2(const void *x, int x_bf16, int64_t m, int64_t k,
                                                            int8_t *xq, float *dx) {
    quantize_body(x, x_bf16, m, k, xq, dx);
}
#endif

/* ---- the call: quantize once, then output rows over the pool ---- */

typedef struct {
    const isa_ops *ops;
    const uint8_t *w;
    const float *rs;
    int64_t n, k, m, row_bytes;
    int bits, out_bf16;
    const int8_t *xq;
    const float *dx;
    const int32_t *corr;
    void *out;
    const float *bias; /* fp32 [n] or NULL */
    int act;           /* ACT_*: applied before the store; the GLUs write fp32 to `out` (scratch) */
} job;

/* the activations fused after the GEMV (gemv.h), each as torch defines it, in fp32 */
static inline float gelu_tanh(float v) { return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))); }
static inline float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f)); }
static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static void run_rows(void *ctx, int64_t n0, int64_t n1) {
    const job *jb = ctx;
    const tile_fn tile = jb->bits == 8 ? jb->ops->int8_tile : jb->ops->int4_tile;
    float res[16];
    for (int64_t n = n0; n < n1; n++) {
        const float b = jb->bias ? jb->bias[n] : 0.0f;
        for (int64_t r0 = 0; r0 < jb->m; r0 += jb->ops->max_rows) {
            const int mt = (int)(jb->m - r0 < jb->ops->max_rows ? jb->m - r0 : jb->ops->max_rows);
            tile(jb->w + n * jb->row_bytes, jb->k, jb->xq + r0 * jb->k, jb->dx + r0 * (jb->k / 4),
                 jb->corr + r0 * (jb->k / 4), mt, res);
            for (int r = 0; r < mt; r++) {
                const float v = res[r] * jb->rs[n] + b;
                store(jb->out, jb->out_bf16, (r0 + r) * jb->n + n, jb->act == ACT_GELU_TANH ? gelu_tanh(v) : v);
            }
        }
    }
}

typedef struct {
    const float *y; /* fp32 [m, 2f]: the GEMV's output with its bias */
    void *out;      /* [m, f] */
    int64_t m, f;
    int out_bf16, act;
} glu_job;

/* SwiGLU: silu(first half) * second half (ChatGLM2's gate, then up); GeGLU: first * gelu(second) (GLM's
 * value, then gate); one rounding */
static void run_glu(void *ctx, int64_t j0, int64_t j1) {
    const glu_job *g = ctx;
    for (int64_t r = 0; r < g->m; r++) {
        const float *y = g->y + r * 2 * g->f;
        for (int64_t j = j0; j < j1; j++) {
            const float a = y[j], b = y[g->f + j];
            store(g->out, g->out_bf16, r * g->f + j, g->act == ACT_SWIGLU ? silu(a) * b : a * gelu_erf(b));
        }
    }
}

static const isa_ops *ops_for(int isa) {
    if (!gemv_isa_supported(isa)) return 0;
    return isa == ISA_VNNI512 ? gemv_ops_vnni512() : isa == ISA_AVX2 ? gemv_ops_avx2() : gemv_ops_scalar();
}

/* the best path this CPU runs */
int glm_best_isa(void) {
    for (int isa = ISA_VNNI512; isa > ISA_NONE; isa--)
        if (gemv_isa_supported(isa)) return isa;
    return ISA_NONE;
}

int glm_isa_supported(int isa) { return gemv_isa_supported(isa); }

/* fp32 (x_bf16 = 0) or bf16 bits [m, k] -> int8 [m, k] and expanded scales [m, k / 4]; 0, or -1 if refused */
int glm_quantize_q8(int isa, const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *dx) {
    if (k % Q8_BLOCK || !gemv_isa_supported(isa)) return -1;
#if defined(__x86_64__) || defined(__i386__)
    if (isa == ISA_VNNI512) return quantize_rows_avx512(x, x_bf16, m, k, xq, dx), 0;
    if (isa == ISA_AVX2) return quantize_rows_avx2(x, x_bf16, m, k, xq, dx), 0;
#endif
    return quantize_rows_scalar(x, x_bf16, m, k, xq, dx), 0;
}

/* corr[i] = -factor * (xq[4i] + ... + xq[4i + 3]) */
static void lane_corrections(const int8_t *xq, int64_t count, int32_t factor, int32_t *corr) {
    for (int64_t i = 0; i < count / 4; i++)
        corr[i] = -factor * (xq[4 * i] + xq[4 * i + 1] + xq[4 * i + 2] + xq[4 * i + 3]);
}

pthread_mutex_t glm_call_lock = PTHREAD_MUTEX_INITIALIZER;
static int8_t *scratch_q;
static float *scratch_d;
static int32_t *scratch_c;
static int64_t scratch_cols;
static float *scratch_y; /* a GLU's fp32 GEMV output */
static int64_t scratch_y_size;

/* out = act(x[m, k] @ W^T + bias) as described at the top. bits 8: w int8 [n, k]; bits 4: halves [n, k / 2].
 * bias: fp32 [n] or NULL; act: ACT_NONE, ACT_GELU_TANH (out [m, n]), or a GLU (ACT_SWIGLU, ACT_GEGLU: n even,
 * out [m, n / 2]). Returns 0, or -1 for a refused call (unsupported path, k not a multiple of the block,
 * INT4 halves not whole blocks, an odd n for a GLU, an unknown act, no memory). */
int glm_gemv(int isa, int bits, const void *w, const float *rs, int64_t n, int64_t k, const void *x, int x_bf16,
             int64_t m, void *out, int out_bf16, int nthreads, const float *bias, int act) {
    const isa_ops *ops = ops_for(isa);
    const int glu = act == ACT_SWIGLU || act == ACT_GEGLU;
    if (!ops || k <= 0 || k % Q8_BLOCK || (bits == 4 && k % (2 * Q8_BLOCK)) || (bits != 8 && bits != 4)) return -1;
    if (act < ACT_NONE || act > ACT_GEGLU || (glu && n % 2)) return -1;
    if (nthreads < 1) nthreads = 1;
    pthread_mutex_lock(&glm_call_lock); /* one call at a time: the scratch and the pool are shared */
    if (scratch_cols < m * k) {
        free(scratch_q), free(scratch_d), free(scratch_c);
        /* cache-line aligned: every 64-byte load of a row then stays within one line (k is a multiple of 32
         * and the strides multiples of 64 when k is; split loads measured ~2x slower at batch 8) */
        scratch_q = aligned_alloc(64, (size_t)(m * k + 63) / 64 * 64);
        scratch_d = aligned_alloc(64, (size_t)(m * k + 63) / 64 * 64);
        scratch_c = aligned_alloc(64, (size_t)(m * k + 63) / 64 * 64);
        scratch_cols = scratch_q && scratch_d && scratch_c ? m * k : 0;
        if (!scratch_cols) return pthread_mutex_unlock(&glm_call_lock), -1;
    }
    if (glu && scratch_y_size < m * n) {
        free(scratch_y);
        scratch_y = aligned_alloc(64, (size_t)(m * n * 4 + 63) / 64 * 64);
        scratch_y_size = scratch_y ? m * n : 0;
        if (!scratch_y) return pthread_mutex_unlock(&glm_call_lock), -1;
    }
    glm_quantize_q8(isa, x, x_bf16, m, k, scratch_q, scratch_d);
    const int factor = bits == 8 ? ops->corr_int8 : ops->corr_int4;
    if (factor) lane_corrections(scratch_q, m * k, factor, scratch_c);
    job jb = {ops, w, rs, n, k, m, bits == 8 ? k : k / 2, bits, glu ? 0 : out_bf16, scratch_q, scratch_d, scratch_c,
              glu ? (void *)scratch_y : out, bias, act};
    /* a thread's rows: a multiple of 16 (whole cache lines of fp32 output) */
    pool_run(nthreads, run_rows, &jb, n, 16);
    if (glu) {
        glu_job g = {scratch_y, out, m, n / 2, out_bf16, act};
        pool_run(m * n / 2 >= 4096 ? nthreads : 1, run_glu, &g, n / 2, 16); /* small: not worth a wake-up */
    }
    pthread_mutex_unlock(&glm_call_lock);
    return 0;
}

/* ---- bf16 weights (AVX-512 only: elsewhere numba's bf16 GEMV serves them) ---- */

typedef struct {
    const uint16_t *w;
    const float *x; /* [m, k], deinterleaved per 32 columns */
    int64_t n, k, m;
    void *out;
    int out_bf16;
} bf16_job;

static void run_bf16(void *ctx, int64_t n0, int64_t n1) {
    const bf16_job *jb = ctx;
    float res[4];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t r0 = 0; r0 < jb->m; r0 += 4) {
            const int mt = (int)(jb->m - r0 < 4 ? jb->m - r0 : 4);
            bf16_tile_avx512(jb->w + n * jb->k, jb->k, jb->x + r0 * jb->k, mt, res);
            for (int r = 0; r < mt; r++) store(jb->out, jb->out_bf16, (r0 + r) * jb->n + n, res[r]);
        }
}

static float *scratch_x;
static int64_t scratch_x_size;

/* out[m, n] = x[m, k] @ W^T for a bf16 weight W [n, k] (bits), k a multiple of 32, x fp32 or bf16, out the
 * same; fp32 accumulation, one rounding. 0, or -1 if refused (no AVX-512 here, k, no memory). */
int glm_gemv_bf16(const uint16_t *w, int64_t n, int64_t k, const void *x, int x_bf16, int64_t m, void *out,
                  int nthreads) {
    if (!gemv_isa_supported(ISA_VNNI512) || k <= 0 || k % 32 || m < 1) return -1;
    pthread_mutex_lock(&glm_call_lock);
    if (scratch_x_size < m * k) {
        free(scratch_x);
        scratch_x = aligned_alloc(64, (size_t)(m * k * 4 + 63) / 64 * 64);
        scratch_x_size = scratch_x ? m * k : 0;
        if (!scratch_x) return pthread_mutex_unlock(&glm_call_lock), -1;
    }
    for (int64_t i = 0; i < m * k; i++) { /* column c of each 32 goes to (c odd) * 16 + c / 2 */
        float v;
        if (x_bf16) {
            uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
            memcpy(&v, &u, 4);
        } else {
            v = ((const float *)x)[i];
        }
        const int64_t c = i % 32;
        scratch_x[i - c + (c & 1) * 16 + c / 2] = v;
    }
    bf16_job jb = {w, scratch_x, n, k, m, out, x_bf16};
    pool_run(nthreads < 1 ? 1 : nthreads, run_bf16, &jb, n, 16);
    pthread_mutex_unlock(&glm_call_lock);
    return 0;
}

/* ---- the weight as bf16 integers, for a bf16 GEMM (prefill-sized batches) ---- */

/* int8 and INT4 values are exact in bf16 (|q| <= 127 fits its 8-bit significand): the row scales stay
 * outside, applied to the GEMM's output as the weight-only kernels apply them */
static inline __attribute__((always_inline)) uint16_t bf16_of(int v) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static inline __attribute__((always_inline)) void unpack_body(int bits, const uint8_t *w, int64_t r0, int64_t r1,
                                                              int64_t k, uint16_t *out) {
    if (bits == 8) {
        const int8_t *ws = (const int8_t *)w;
        for (int64_t i = r0 * k; i < r1 * k; i++) out[i - r0 * k] = bf16_of(ws[i]);
        return;
    }
    const int64_t half = k / 2;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + r * half;
        uint16_t *o = out + (r - r0) * k;
        for (int64_t j = 0; j < half; j++) {
            o[j] = bf16_of((row[j] & 0x0F) - 8);
            o[half + j] = bf16_of((row[j] >> 4) - 8);
        }
    }
}

static void unpack_generic(int bits, const uint8_t *w, int64_t r0, int64_t r1, int64_t k, uint16_t *out) {
    unpack_body(bits, w, r0, r1, k, out);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx512f,avx512bw"))) static void unpack_avx512(int bits, const uint8_t *w, int64_t r0,
                                                                      int64_t r1, int64_t k, uint16_t *out) {
    unpack_body(bits, w, r0, r1, k, out);
}
#endif

typedef struct {
    int bits, wide;
    const uint8_t *w;
    int64_t r0, k;
    uint16_t *out;
} unpack_job;

static void run_unpack(void *ctx, int64_t a, int64_t b) {
    const unpack_job *jb = ctx;
    uint16_t *out = jb->out + a * jb->k; /* a, b count from r0 */
#if defined(__x86_64__) || defined(__i386__)
    if (jb->wide) return unpack_avx512(jb->bits, jb->w, jb->r0 + a, jb->r0 + b, jb->k, out);
#endif
    unpack_generic(jb->bits, jb->w, jb->r0 + a, jb->r0 + b, jb->k, out);
}

/* weight rows [r0, r1) (int8 [n, k] or INT4 halves [n, k / 2], as glm_gemv takes them) -> bf16 bits
 * [r1 - r0, k]; 0, or -1 if refused */
int glm_unpack_bf16(int bits, const void *w, int64_t r0, int64_t r1, int64_t k, uint16_t *out, int nthreads) {
    if ((bits != 8 && bits != 4) || (bits == 4 && k % 2) || r0 < 0 || r1 < r0) return -1;
    unpack_job jb = {bits, gemv_isa_supported(ISA_VNNI512), w, r0, k, out};
    pthread_mutex_lock(&glm_call_lock);
    pool_run(nthreads < 1 ? 1 : nthreads, run_unpack, &jb, r1 - r0, 16);
    pthread_mutex_unlock(&glm_call_lock);
    return 0;
}

/* setuptools builds this as an extension module; nothing imports it as one (native.py uses ctypes) */
void *PyInit__gemv(void) { return 0; }
