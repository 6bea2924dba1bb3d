/* The x86 SIMD tiles: AVX-512 VNNI (vpdpbusd) and AVX2 (vpmaddubsw + vpmaddwd). Each function carries its
 * own target attribute, so the file builds with the compiler's default flags and the dispatcher (gemv.c)
 * calls only what the CPU has.
 *
 * vpdpbusd multiplies unsigned by signed bytes. The activations stay signed (Q8_0); the weights become
 * the unsigned operand: INT8 with its sign bit flipped (w + 128, one xor per weight vector for all batch
 * rows), INT4's nibbles as stored (q + 8). Each accumulator starts at -128 (or -8) times the sum of the
 * same four activations (gemv.c computes them once per call), so the int32 lanes are exact dot products. The AVX2 tiles move the activation's sign onto the weight (|x| * sign(x) w), as vpmaddubsw's
 * int16 pairs then stay below 2 * 127 * 127 (weights are in [-127, 127], the format's range). */
#include "gemv.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define ALWAYS static inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define T256 __attribute__((target("avx2,fma")))

/* weight bytes ahead to prefetch: the hardware prefetcher alone left ~8 % of the read speed (measured) */
#define PREFETCH 1024

/* ---- AVX-512 VNNI: 64 weight bytes (two blocks) per step, a 32-byte tail by masked loads ---- */

/* acc += float(corr + dot lanes of w_u8 . x) * block scales */
ALWAYS T512 __m512 vnni_step(__m512 acc, __m512i corr, __m512i w, __m512i x, __m512 d) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, w, x)), d, acc);
}

/* INT8: w ^ 0x80 = w + 128 as unsigned bytes; corr = -128 * (sum of 4 x) takes the 128 off again */
ALWAYS T512 void vnni_int8_body(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx,
                                const int32_t *corr, const int mt, float *res) {
    __m512 acc[8];
    const int64_t ds = k / 4;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < mt; r++) acc[r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
        _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);
        __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + j), flip);
        for (int r = 0; r < mt; r++)
            acc[r] = vnni_step(acc[r], _mm512_loadu_si512(corr + r * ds + j / 4), wv,
                               _mm512_loadu_si512(xq + r * k + j), _mm512_loadu_ps(dx + r * ds + j / 4));
    }
    if (j < k) { /* one block left: the upper half of each vector loads as zeros */
        __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(0xFFFFFFFFull, w + j), flip);
        for (int r = 0; r < mt; r++)
            acc[r] = vnni_step(acc[r], _mm512_maskz_loadu_epi32(0x00FF, corr + r * ds + j / 4), wv,
                               _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xq + r * k + j),
                               _mm512_maskz_loadu_ps(0x00FF, dx + r * ds + j / 4));
    }
    for (int r = 0; r < mt; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}

/* INT4 halves: packed byte j holds column j (low nibble) and column k/2 + j (high), both q + 8: the
 * nibbles are the unsigned operand as they are, and corr = -8 * (sum of 4 x) takes the 8 off */
ALWAYS T512 void vnni_int4_chunk(__m512 *acc, __m512i v, const int8_t *xq, const float *dx, const int32_t *corr,
                                 int64_t k, int64_t j, __mmask64 m, __mmask16 mf, const int mt) {
    const int64_t ds = k / 4, half = k / 2;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    for (int r = 0; r < mt; r++) {
        const int8_t *x = xq + r * k;
        const float *d = dx + r * ds;
        const int32_t *c = corr + r * ds;
        acc[r] = vnni_step(acc[r], _mm512_maskz_loadu_epi32(mf, c + j / 4), lo, _mm512_maskz_loadu_epi8(m, x + j),
                           _mm512_maskz_loadu_ps(mf, d + j / 4));
        acc[r] = vnni_step(acc[r], _mm512_maskz_loadu_epi32(mf, c + (half + j) / 4), hi,
                           _mm512_maskz_loadu_epi8(m, x + half + j), _mm512_maskz_loadu_ps(mf, d + (half + j) / 4));
    }
}

ALWAYS T512 void vnni_int4_body(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx,
                                const int32_t *corr, const int mt, float *res) {
    __m512 acc[8];
    const int64_t half = k / 2;
    for (int r = 0; r < mt; r++) acc[r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= half; j += 64) { /* full masks: the compiler drops the masking */
        _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);
        vnni_int4_chunk(acc, _mm512_loadu_si512(w + j), xq, dx, corr, k, j, ~0ull, 0xFFFF, mt);
    }
    if (j < half) /* a 32-byte tail: masked-off weight bytes load as 0 and meet zero activations */
        vnni_int4_chunk(acc, _mm512_maskz_loadu_epi8(0xFFFFFFFFull, w + j), xq, dx, corr, k, j, 0xFFFFFFFFull,
                        0x00FF, mt);
    for (int r = 0; r < mt; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}

/* Q8_0 as quantize_body (gemv.c) defines it, 16 columns per vector: IEEE division and round half to even
 * (the MXCSR default), so it equals the scalar code and torch's definition bit for bit */
ALWAYS T512 __m512 load16(const void *x, int x_bf16, int64_t i) {
    if (!x_bf16) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

T512 void quantize_rows_avx512(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *dx) {
    for (int64_t b = 0; b < m * k / Q8_BLOCK; b++) {
        __m512 v0 = load16(x, x_bf16, b * Q8_BLOCK), v1 = load16(x, x_bf16, b * Q8_BLOCK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        __m512 dv = _mm512_set1_ps(d == 0.0f ? 1.0f : d); /* an all-zero block divides 0 by 1 */
        __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(v0, dv)));
        __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(v1, dv)));
        _mm_storeu_si128((__m128i *)(xq + b * Q8_BLOCK), q0);
        _mm_storeu_si128((__m128i *)(xq + b * Q8_BLOCK + 16), q1);
        _mm256_storeu_ps(dx + b * SCALE_COPIES, _mm256_set1_ps(d));
    }
}

/* a tile size known at compile time keeps the accumulators in registers */
#define TILES(name, body, T)                                                                                 \
    static T void name(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx, const int32_t *corr, int mt,   \
                     float *res) {                                                               \
        switch (mt) {                                                                                        \
        case 1: body(w, k, xq, dx, corr, 1, res); break;                                                          \
        case 2: body(w, k, xq, dx, corr, 2, res); break;                                                          \
        case 3: body(w, k, xq, dx, corr, 3, res); break;                                                          \
        case 4: body(w, k, xq, dx, corr, 4, res); break;                                                          \
        case 5: body(w, k, xq, dx, corr, 5, res); break;                                                          \
        case 6: body(w, k, xq, dx, corr, 6, res); break;                                                          \
        case 7: body(w, k, xq, dx, corr, 7, res); break;                                                          \
        default: body(w, k, xq, dx, corr, 8, res); break;                                                         \
        }                                                                                                    \
    }

TILES(vnni_int8_tile, vnni_int8_body, T512)
TILES(vnni_int4_tile, vnni_int4_body, T512)

/* ---- AVX2: one block (32 bytes) per step ---- */

ALWAYS T256 __m256 avx2_step(__m256 acc, __m256i w, __m256i x, __m256 d) {
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1))), d, acc);
}

ALWAYS T256 float avx2_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

ALWAYS T256 void avx2_int8_body(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx,
                                const int32_t *corr, const int mt, float *res) {
    (void)corr;
    __m256 acc[4];
    const int64_t ds = k / 4;
    for (int r = 0; r < mt; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 32) {
        _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
        for (int r = 0; r < mt; r++)
            acc[r] = avx2_step(acc[r], wv, _mm256_loadu_si256((const __m256i *)(xq + r * k + j)),
                               _mm256_loadu_ps(dx + r * ds + j / 4));
    }
    for (int r = 0; r < mt; r++) res[r] = avx2_sum(acc[r]);
}

ALWAYS T256 void avx2_int4_body(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx,
                                const int32_t *corr, const int mt, float *res) {
    (void)corr;
    __m256 acc[4];
    const int64_t ds = k / 4, half = k / 2;
    const __m256i nib = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    for (int r = 0; r < mt; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < half; j += 32) {
        _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + j));
        __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, nib), eight);
        __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), eight);
        for (int r = 0; r < mt; r++) {
            const int8_t *x = xq + r * k;
            const float *d = dx + r * ds;
            acc[r] = avx2_step(acc[r], lo, _mm256_loadu_si256((const __m256i *)(x + j)), _mm256_loadu_ps(d + j / 4));
            acc[r] = avx2_step(acc[r], hi, _mm256_loadu_si256((const __m256i *)(x + half + j)),
                               _mm256_loadu_ps(d + (half + j) / 4));
        }
    }
    for (int r = 0; r < mt; r++) res[r] = avx2_sum(acc[r]);
}

#define TILES4(name, body, T)                                                                                \
    static T void name(const uint8_t *w, int64_t k, const int8_t *xq, const float *dx, const int32_t *corr, int mt,   \
                     float *res) {                                                               \
        switch (mt) {                                                                                        \
        case 1: body(w, k, xq, dx, corr, 1, res); break;                                                          \
        case 2: body(w, k, xq, dx, corr, 2, res); break;                                                          \
        case 3: body(w, k, xq, dx, corr, 3, res); break;                                                          \
        default: body(w, k, xq, dx, corr, 4, res); break;                                                         \
        }                                                                                                    \
    }

TILES4(avx2_int8_tile, avx2_int8_body, T256)
TILES4(avx2_int4_tile, avx2_int4_body, T256)


/* ---- bf16 weights (the LM head): widened exactly to fp32 (a bf16 is a float's top half), fp32 FMA ---- */

ALWAYS T512 void bf16_body(const uint16_t *w, int64_t k, const float *x, const int mt, float *res) {
    __m512 acc[4];
    for (int r = 0; r < mt; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 32) {
        _mm_prefetch((const char *)(w + j) + PREFETCH, _MM_HINT_T0);
        __m512i v = _mm512_loadu_si512(w + j);
        /* the low and high halves of each 32-bit lane: columns 2i and 2i + 1 */
        __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
        for (int r = 0; r < mt; r++) {
            /* x is stored deinterleaved per 32 columns: 16 even ones, then 16 odd ones (gemv.c) */
            acc[r] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + r * k + j), acc[r]);
            acc[r] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + r * k + j + 16), acc[r]);
        }
    }
    for (int r = 0; r < mt; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}

T512 void bf16_tile_avx512(const uint16_t *w, int64_t k, const float *x, int mt, float *res) {
    switch (mt) {
    case 1: bf16_body(w, k, x, 1, res); break;
    case 2: bf16_body(w, k, x, 2, res); break;
    case 3: bf16_body(w, k, x, 3, res); break;
    default: bf16_body(w, k, x, 4, res); break;
    }
}

static const isa_ops VNNI512 = {vnni_int8_tile, vnni_int4_tile, 8, 128, 8};
static const isa_ops AVX2 = {avx2_int8_tile, avx2_int4_tile, 4, 0, 0};
const isa_ops *gemv_ops_vnni512(void) { return &VNNI512; }
const isa_ops *gemv_ops_avx2(void) { return &AVX2; }

int gemv_isa_supported(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case ISA_SCALAR: return 1;
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_VNNI512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni");
    default: return 0;
    }
}

#else /* not x86: the scalar path only */
void bf16_tile_avx512(const uint16_t *w, int64_t k, const float *x, int mt, float *res) { (void)w, (void)k, (void)x, (void)mt, (void)res; }
const isa_ops *gemv_ops_vnni512(void) { return 0; }
const isa_ops *gemv_ops_avx2(void) { return 0; }
int gemv_isa_supported(int isa) { return isa == ISA_SCALAR; }
#endif
