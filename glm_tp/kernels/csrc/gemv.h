/* Shared declarations of glm-tp's native CPU GEMV kernels (see gemv.c for the computation). */
#ifndef GLM_TP_GEMV_H
#define GLM_TP_GEMV_H

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define Q8_BLOCK 32    /* input columns per activation scale (llama.cpp's Q8_0 block) */
#define SCALE_COPIES 8 /* each block scale is stored 8 times: one 256-bit vector of fp32 per block */

/* The activations glm_gemv can apply to its output; the ids are the library's ABI (native.py names them). */
enum { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_SWIGLU = 2, ACT_GEGLU = 3 };

/* The instruction-set paths, best last; the ids are the library's ABI (native.py names them). */
enum { ISA_NONE = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_VNNI512 = 3 };

/* One output row against `mt` batch rows: res[r] = sum over blocks b of
 * dot(w[b], xq[r][b]) * dx[r][b]. w: the row (int8 [k], or INT4 halves [k/2]); xq: int8 rows, stride k;
 * dx: expanded block scales, stride k / 4 (SCALE_COPIES per block of Q8_BLOCK); corr: for paths that set
 * `corr_int8`/`corr_int4`, -factor * (sum of each 4 consecutive xq), stride k / 4 (see gemv_x86.c). */
typedef void (*tile_fn)(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx, const int32_t *corr,
                        int mt, float *res);

typedef struct {
    tile_fn int8_tile, int4_tile;
    int max_rows;            /* the most batch rows one tile call takes */
    int corr_int8, corr_int4; /* the factor of the lane corrections the tiles need, 0: none */
} isa_ops;

int gemv_isa_supported(int isa);
const isa_ops *gemv_ops_scalar(void);
const isa_ops *gemv_ops_avx2(void);
const isa_ops *gemv_ops_vnni512(void);

/* bf16 weight rows against `mt` (<= 4) fp32 rows, each deinterleaved per 32 columns (16 even, 16 odd) */
void bf16_tile_avx512(const uint16_t *w, int64_t k, const float *x, int mt, float *res);

void quantize_rows_scalar(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *dx);
void quantize_rows_avx2(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *dx);
void quantize_rows_avx512(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *dx);

/* pool.c: run fn(ctx, begin, end) over [0, total) split into `nthreads` contiguous parts (multiples of
 * `align`), the calling thread taking the first part. Not reentrant: callers serialise. */
/* held by each call that uses the pool or the shared scratch (gemv.c, attention.c) */
extern pthread_mutex_t glm_call_lock;

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* out[i] = v as fp32, or rounded to bf16 bits (nearest even, as torch rounds; NaN stays a quiet NaN) */
static inline void store(void *out, int bf16, int64_t i, float v) {
    if (!bf16) {
        ((float *)out)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    ((uint16_t *)out)[i] = v != v ? 0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);
void pool_run(int nthreads, range_fn fn, void *ctx, int64_t total, int64_t align);

#endif
