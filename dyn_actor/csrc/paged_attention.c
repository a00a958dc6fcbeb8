/*
 * Paged decode attention on the CPU: one query token per sequence attends over
 * its context, read in place from the paged KV pool (no gather copy).
 *
 * Pool element (block, t, kv_head, i) of one layer's K (or V) lives at
 *   base + block * block_stride + (t * nkv + kv_head) * d + i
 * which is the [num_blocks, num_layers, 2, block_size, nkv, d] layout of
 * dyn_actor.kv.pool seen from one layer. All query heads of a sequence are
 * processed together (grouped-query heads share their KV head's part of the
 * row), so each K/V row is read once per step, front to back. Two passes over the context: scores + softmax, then
 * the weighted sum of V. Parallel over sequences with OpenMP; built and loaded
 * at run time by dyn_actor.native_ops.
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

/* exp(x) for the softmax's x <= 0: 2^k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its
 * Taylor polynomial to degree 6 (relative error below 2e-7). Plain float arithmetic, so the
 * compiler vectorizes the loop around it (glibc's expf is vectorized only under -ffast-math). */
static inline float exp_nonpositive(float x) {
    /* e^-60 is nothing next to the max's e^0 (float's epsilon is e^-16), and cutting there keeps the
     * probabilities, and their products with V, clear of subnormal floats (slow on x86) */
    if (x < -60.f) return 0.f;
    const float kf = rintf(x * 1.44269504088896341f);
    const float r = x - kf * 0.693145751953125f - kf * 1.428606765330187045e-06f; /* ln 2 in two parts */
    const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    const int32_t bits = ((int32_t)kf + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* One task per sequence: each K/V row [nkv, d] of a position is read once, sequentially
 * (a block of one layer is block_size contiguous rows), and serves every query head. The loops
 * run block by block and KV head by KV head, so the inner loops divide nothing (an integer
 * division per position and head cost as much as the arithmetic). */
#define DEFINE_DECODE(NAME, T, LOAD, STORE)                                                              \
    void NAME(const T *q, int64_t q_stride, const T *k, const T *v, int64_t block_stride,                \
              const int64_t *table, int64_t max_blocks, const int64_t *ctx, T *out, int64_t num_seqs,     \
              int64_t nh, int64_t nkv, int64_t d, int64_t bs, float scale, int64_t window, float softcap,  \
              int nthreads) {                                                                             \
        const int64_t G = nh / nkv;                                                                       \
        const int64_t row = nkv * d;                                                                      \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                          \
        for (int64_t b = 0; b < num_seqs; b++) {                                                         \
            const int64_t end = ctx[b];                                                                  \
            /* a sliding window: only the last `window` positions (the newest one included) */           \
            const int64_t first = window > 0 && end > window ? end - window : 0;                         \
            const int64_t n = end - first;                                                               \
            const int64_t *tb = table + b * max_blocks;                                                  \
            float *scores = (float *)malloc(sizeof(float) * (size_t)(nh * n + 2 * nh * d));             \
            float *qf = scores + nh * n;                                                                 \
            float *acc = qf + nh * d;                                                                    \
            const T *qb = q + b * q_stride;                                                              \
            for (int64_t i = 0; i < nh * d; i++) qf[i] = LOAD(qb[i]) * scale;                            \
            for (int64_t blk = first / bs, t0 = first % bs, start = -t0; start < n; start += bs, blk++, t0 = 0) { \
                const T *kb = k + tb[blk] * block_stride;                                                \
                const int64_t lim = n - start < bs ? n - start : bs;                                     \
                for (int64_t t = t0; t < lim; t++) {                                                     \
                    const T *kr = kb + t * row;                                                          \
                    for (int64_t kh = 0, h = 0; kh < nkv; kh++) {                                        \
                        const T *kp = kr + kh * d;                                                       \
                        for (int64_t g = 0; g < G; g++, h++) {                                           \
                            const float *qh = qf + h * d;                                                \
                            float s = 0.f;                                                               \
                            _Pragma("omp simd reduction(+ : s)")                                        \
                            for (int64_t i = 0; i < d; i++) s += qh[i] * LOAD(kp[i]);                    \
                            scores[h * n + start + t] = s;                                               \
                        }                                                                                \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            if (softcap > 0.f) /* Gemma 2: scores squashed into (-softcap, softcap) before the softmax */ \
                for (int64_t i = 0; i < nh * n; i++) scores[i] = softcap * tanhf(scores[i] / softcap);    \
            for (int64_t h = 0; h < nh; h++) {                                                           \
                float *sh = scores + h * n;                                                              \
                float m = -INFINITY;                                                                     \
                _Pragma("omp simd reduction(max : m)")                                                  \
                for (int64_t pos = 0; pos < n; pos++) m = sh[pos] > m ? sh[pos] : m;                     \
                float sum = 0.f;                                                                         \
                _Pragma("omp simd reduction(+ : sum)")                                                  \
                for (int64_t pos = 0; pos < n; pos++) {                                                  \
                    sh[pos] = exp_nonpositive(sh[pos] - m);                                                         \
                    sum += sh[pos];                                                                      \
                }                                                                                        \
                const float inv = 1.f / sum;                                                             \
                for (int64_t pos = 0; pos < n; pos++) sh[pos] *= inv;                                    \
            }                                                                                            \
            memset(acc, 0, sizeof(float) * (size_t)(nh * d));                                            \
            for (int64_t blk = first / bs, t0 = first % bs, start = -t0; start < n; start += bs, blk++, t0 = 0) { \
                const T *vb = v + tb[blk] * block_stride;                                                \
                const int64_t lim = n - start < bs ? n - start : bs;                                     \
                for (int64_t t = t0; t < lim; t++) {                                                     \
                    const T *vr = vb + t * row;                                                          \
                    for (int64_t kh = 0, h = 0; kh < nkv; kh++) {                                        \
                        const T *vp = vr + kh * d;                                                       \
                        for (int64_t g = 0; g < G; g++, h++) {                                           \
                            const float p = scores[h * n + start + t];                                   \
                            float *restrict ah = acc + h * d;                                            \
                            _Pragma("omp simd")                                                          \
                            for (int64_t i = 0; i < d; i++) ah[i] += p * LOAD(vp[i]);                    \
                        }                                                                                \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            T *ob = out + b * nh * d;                                                                    \
            for (int64_t i = 0; i < nh * d; i++) ob[i] = STORE(acc[i]);                                  \
            free(scores);                                                                                \
        }                                                                                                \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_DECODE(paged_decode_attention_f32, float, LOAD_F32, STORE_F32)
DEFINE_DECODE(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* Whole-block copies between KV pools: block i of src goes to block ids[i] of dst
 * (scatter), or block ids[i] of src to block i of dst (gather). Each block is one
 * contiguous run, so this is n memcpy calls spread over the threads. */
void scatter_blocks(char *dst, const char *src, const int64_t *ids, int64_t n, int64_t block_bytes, int nthreads) {
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t i = 0; i < n; i++) memcpy(dst + ids[i] * block_bytes, src + i * block_bytes, (size_t)block_bytes);
}

void gather_blocks(char *dst, const char *src, const int64_t *ids, int64_t n, int64_t block_bytes, int nthreads) {
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * block_bytes, src + ids[i] * block_bytes, (size_t)block_bytes);
}

/* dst block dst_ids[i] = src block src_ids[i]: pool to pool, no staging copy. */
void move_blocks(char *dst, const char *src, const int64_t *dst_ids, const int64_t *src_ids, int64_t n,
                 int64_t block_bytes, int nthreads) {
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + dst_ids[i] * block_bytes, src + src_ids[i] * block_bytes, (size_t)block_bytes);
}

/* ---------------------------------------------------------------------------------------------
 * The elementwise work of a layer, fused (float32), each one pass over its rows, parallel over
 * rows: what PyTorch does in four to six kernels (and temporaries) per call. Rows may be
 * strided; the elements of a row are contiguous.
 */

/* x[t] += dx[t] (when dx is given), then h[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w. */
void add_rms_norm_f32(float *x, int64_t sx, const float *dx, int64_t sdx, const float *w, float *h, int64_t sh,
                      int64_t T, int64_t N, float eps, int nthreads) {
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * sx;
        float *hr = h + t * sh;
        float ss = 0.0f;
        if (dx != NULL) {
            const float *dr = dx + t * sdx;
            _Pragma("omp simd reduction(+:ss)")
            for (int64_t i = 0; i < N; i++) {
                float v = xr[i] + dr[i];
                xr[i] = v;
                ss += v * v;
            }
        } else {
            _Pragma("omp simd reduction(+:ss)")
            for (int64_t i = 0; i < N; i++) ss += xr[i] * xr[i];
        }
        float r = 1.0f / sqrtf(ss / (float)N + eps);
        _Pragma("omp simd")
        for (int64_t i = 0; i < N; i++) hr[i] = xr[i] * r * w[i];
    }
}

/* RoPE in place on the first H heads of each row of qkv (the query and key heads):
 * x[i] = x[i] * cos[p][i] + x[(i + D/2) % D] * sin_signed[p][i], p = pos[t]. */
void rope_inplace_f32(float *qkv, int64_t st, const float *cos_t, const float *sin_t, int64_t sc,
                      const int64_t *pos, int64_t T, int64_t H, int64_t D, int nthreads) {
    const int64_t half = D / 2;
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * sc;
        const float *s = sin_t + pos[t] * sc;
        for (int64_t hd = 0; hd < H; hd++) {
            float *x = qkv + t * st + hd * D;
            _Pragma("omp simd")
            for (int64_t i = 0; i < half; i++) {
                float a = x[i], b = x[i + half];
                x[i] = a * c[i] + b * s[i];
                x[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* out[t][j] = silu(gu[t][j]) * gu[t][I + j] */
void silu_mul_f32(const float *gu, int64_t sgu, float *out, int64_t so, int64_t T, int64_t I, int nthreads) {
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * sgu;
        const float *u = g + I;
        float *o = out + t * so;
        _Pragma("omp simd")
        for (int64_t j = 0; j < I; j++) { /* sigmoid from e^-|g| (vectorizable, never overflows) */
            const float e = exp_nonpositive(-fabsf(g[j]));
            const float sig = (g[j] >= 0.f ? 1.f : e) / (1.f + e);
            o[j] = g[j] * sig * u[j];
        }
    }
}

/* A bfloat16 linear map for the few rows of a decode step: y[m][o] = bf16(sum_i x[m][i] w[o][i] (+ b[o]))
 * for m < M <= 4, each weight row read once for all M rows, four weight rows at a time (sixteen
 * independent accumulators), with AVX-512 BF16's pairwise dot products into float32. A decode step
 * streams its weights from memory: oneDNN's bf16 GEMV reads them at about a quarter of this core's
 * bandwidth, this at most of it. linear_bf16_available() says whether the build has the instructions
 * (-march=native on a CPU with avx512_bf16); without them the caller keeps torch's. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

int linear_bf16_available(void) { return 1; }

static inline __m512bh load_bf16(const uint16_t *p, __mmask32 k) {
    return (__m512bh)_mm512_maskz_loadu_epi16(k, p);
}

static inline void linear_bf16_rows(const uint16_t *x, int64_t sx, const uint16_t *w, const uint16_t *b,
                                    uint16_t *y, int64_t sy, const int M, int64_t o0, int64_t n, int64_t I) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < 4; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I; i += 32) {
        const __mmask32 k = I - i >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (I - i)) - 1u);
        __m512bh xv[4];
        for (int m = 0; m < M; m++) xv[m] = load_bf16(x + m * sx + i, k);
        for (int r = 0; r < 4; r++) {
            if (r >= n) break;
            /* the rows two blocks on, a cache line at a time: the hardware prefetcher alone keeps too
             * few lines in flight to stream from memory at this core's rate */
            _mm_prefetch((const char *)(w + (o0 + 8 + r) * I + i), _MM_HINT_T0);
            const __m512bh wv = load_bf16(w + (o0 + r) * I + i, k);
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv[m], wv);
        }
    }
    for (int r = 0; r < n; r++)
        for (int m = 0; m < M; m++) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            if (b) s += bf16_to_f32(b[o0 + r]);
            y[m * sy + o0 + r] = f32_to_bf16(s);
        }
}

void linear_bf16(const uint16_t *x, int64_t sx, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t sy,
                 int64_t M, int64_t O, int64_t I, int nthreads) {
    const int64_t blocks = (O + 3) / 4;
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t o0 = blk * 4, n = O - o0 < 4 ? O - o0 : 4;
        switch (M) { /* M a constant in each inlined copy: its loops unrolled, the accumulators in registers */
        case 1: linear_bf16_rows(x, sx, w, b, y, sy, 1, o0, n, I); break;
        case 2: linear_bf16_rows(x, sx, w, b, y, sy, 2, o0, n, I); break;
        case 3: linear_bf16_rows(x, sx, w, b, y, sy, 3, o0, n, I); break;
        default: linear_bf16_rows(x, sx, w, b, y, sy, 4, o0, n, I); break;
        }
    }
}
#else
int linear_bf16_available(void) { return 0; }

void linear_bf16(const uint16_t *x, int64_t sx, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t sy,
                 int64_t M, int64_t O, int64_t I, int nthreads) {
    (void)x; (void)sx; (void)w; (void)b; (void)y; (void)sy; (void)M; (void)O; (void)I; (void)nthreads;
}
#endif
