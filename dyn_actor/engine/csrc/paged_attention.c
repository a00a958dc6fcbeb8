/*
 * Paged decode attention on the CPU: one query token per sequence attends over
 * its context, read in place from the paged KV pool (no gather copy).
 *
 * Pool element (block, t, kv_head, i) of one layer's K (or V) lives at
 *   base + block * block_stride + (t * nkv + kv_head) * d + i
 * which is the [num_blocks, num_layers, 2, block_size, nkv, d] layout of
 * dyn_actor.kv.pool seen from one layer. The query heads of one KV head
 * (grouped-query attention) are processed together, so each K/V row is read
 * once per step. Two passes over the context: scores + softmax, then the
 * weighted sum of V. Parallel over (sequence, KV head) with OpenMP; built and
 * loaded at run time by dyn_actor.engine.native_ops.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define DEFINE_DECODE(NAME, T, LOAD, STORE)                                                              \
    void NAME(const T *q, int64_t q_stride, const T *k, const T *v, int64_t block_stride,                \
              const int64_t *table, int64_t max_blocks, const int64_t *ctx, T *out, int64_t num_seqs,     \
              int64_t nh, int64_t nkv, int64_t d, int64_t bs, float scale, int nthreads) {                \
        const int64_t G = nh / nkv;                                                                       \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)")              \
        for (int64_t b = 0; b < num_seqs; b++) {                                                         \
            for (int64_t h = 0; h < nkv; h++) {                                                          \
                const int64_t n = ctx[b];                                                                \
                const int64_t *tb = table + b * max_blocks;                                              \
                float *scores = (float *)malloc(sizeof(float) * (size_t)(G * n + G * d + G * d));       \
                float *qf = scores + G * n;                                                              \
                float *acc = qf + G * d;                                                                 \
                const T *qb = q + b * q_stride + h * G * d;                                              \
                for (int64_t i = 0; i < G * d; i++) qf[i] = LOAD(qb[i]) * scale;                         \
                for (int64_t pos = 0; pos < n; pos++) {                                                  \
                    const T *kp = k + tb[pos / bs] * block_stride + ((pos % bs) * nkv + h) * d;          \
                    for (int64_t g = 0; g < G; g++) {                                                    \
                        const float *qg = qf + g * d;                                                    \
                        float s = 0.f;                                                                   \
                        _Pragma("omp simd reduction(+ : s)")                                            \
                        for (int64_t i = 0; i < d; i++) s += qg[i] * LOAD(kp[i]);                        \
                        scores[g * n + pos] = s;                                                         \
                    }                                                                                    \
                }                                                                                        \
                for (int64_t g = 0; g < G; g++) {                                                        \
                    float *sg = scores + g * n;                                                          \
                    float m = -INFINITY;                                                                 \
                    _Pragma("omp simd reduction(max : m)")                                              \
                    for (int64_t pos = 0; pos < n; pos++) m = sg[pos] > m ? sg[pos] : m;                 \
                    float sum = 0.f;                                                                     \
                    _Pragma("omp simd reduction(+ : sum)")                                              \
                    for (int64_t pos = 0; pos < n; pos++) {                                              \
                        sg[pos] = expf(sg[pos] - m);                                                     \
                        sum += sg[pos];                                                                  \
                    }                                                                                    \
                    const float inv = 1.f / sum;                                                         \
                    for (int64_t pos = 0; pos < n; pos++) sg[pos] *= inv;                                \
                }                                                                                        \
                memset(acc, 0, sizeof(float) * (size_t)(G * d));                                         \
                for (int64_t pos = 0; pos < n; pos++) {                                                  \
                    const T *vp = v + tb[pos / bs] * block_stride + ((pos % bs) * nkv + h) * d;          \
                    for (int64_t g = 0; g < G; g++) {                                                    \
                        const float p = scores[g * n + pos];                                             \
                        float *restrict ag = acc + g * d;                                                \
                        _Pragma("omp simd")                                                              \
                        for (int64_t i = 0; i < d; i++) ag[i] += p * LOAD(vp[i]);                        \
                    }                                                                                    \
                }                                                                                        \
                T *ob = out + (b * nh + h * G) * d;                                                      \
                for (int64_t i = 0; i < G * d; i++) ob[i] = STORE(acc[i]);                               \
                free(scores);                                                                            \
            }                                                                                            \
        }                                                                                                \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_DECODE(paged_decode_attention_f32, float, LOAD_F32, STORE_F32)
DEFINE_DECODE(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
