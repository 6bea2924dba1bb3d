/* A decode step's residual add and the layer norm after it in one call (glm_tp/kernels/native_norm.py):
 * s = alpha * residual + branch (alpha in the model's dtype, one fused multiply-add: as torch.add computes
 * it), rounded to the model's dtype, then
 * - LayerNorm: (s - mean) / sqrt(var + eps) * w + b, in fp32, one rounding (torch's CPU LayerNorm);
 * - RMSNorm: round(s / sqrt(mean(s^2) + eps)) * w, rounded again (glm.RMSNorm: normalised in fp32,
 *   rounded to the dtype before the gain).
 * Decode rows are a few thousand elements: the calling thread does them (a pool wake-up costs more). */
#include "gemv.h"

#include <math.h>

static inline float round_to(int bf16, float v) {
    if (!bf16) return v;
    uint16_t h;
    store(&h, 1, 0, v);
    return bf16_to_f32(h);
}

static inline float at(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* residual, branch [rows, n]; w, b [n] (b NULL: none; RMSNorm has none); all fp32 or all bf16 bits.
 * sum_out [rows, n] (NULL: not wanted) gets s, norm_out [rows, n] the norm of s. 0, or -1 if refused. */
int glm_add_norm(const void *residual, const void *branch, float alpha, const void *w, const void *b, float eps,
                 int rms, int bf16, int64_t rows, int64_t n, void *sum_out, void *norm_out) {
    if (rows < 1 || n < 1 || !(eps >= 0) || (rms && b)) return -1;
    alpha = round_to(bf16, alpha); /* torch takes the scalar in the tensors' dtype */
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * n;
        double total = 0, squares = 0; /* the row's moments in double: no cancellation in the variance */
        for (int64_t i = 0; i < n; i++) {
            const float s = round_to(bf16, fmaf(alpha, at(residual, bf16, o + i), at(branch, bf16, o + i)));
            if (sum_out) store(sum_out, bf16, o + i, s);
            total += s, squares += (double)s * s;
        }
        const float mean = rms ? 0.0f : (float)(total / n);
        const double var = rms ? squares / n : squares / n - (total / n) * (total / n);
        const float inv = 1.0f / sqrtf((float)(var > 0 ? var : 0) + eps);
        for (int64_t i = 0; i < n; i++) {
            /* recomputed, the same rounding (the outputs never alias the inputs) */
            const float s = round_to(bf16, fmaf(alpha, at(residual, bf16, o + i), at(branch, bf16, o + i)));
            const float v = rms ? round_to(bf16, s * inv) * at(w, bf16, i)
                                : (s - mean) * inv * at(w, bf16, i) + (b ? at(b, bf16, i) : 0.0f);
            store(norm_out, bf16, o + i, v);
        }
    }
    return 0;
}
