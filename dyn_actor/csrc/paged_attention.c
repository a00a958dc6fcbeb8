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

/* 4-bit weights (GPTQ, AWQ), group-wise: w[o][i] = q[o][i] * s[o][g] - zs[o][g], g = i / gs, where q is
 * 0..15, s the group's scale and zs its zero point times its scale (float32, [O, G]). q is packed two to
 * a byte, [O, I/2], by chunks of 64 inputs: byte k of a chunk's 32 holds input k in its low nibble and
 * input 32 + k in its high one, so that one 32-byte load, widened to 16 bits, gives the chunk's first 32
 * inputs (masked) and its last 32 (shifted) in order. Groups are multiples of 32 inputs, I of 64. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)

int linear_w4_vectorized(void) { return 1; }

/* a chunk's 64 weights as 16-bit integers 0..15: inputs 0..31 in *lo, 32..63 in *hi */
static inline void w4_chunk(const uint8_t *p, __m512i *lo, __m512i *hi) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    *lo = _mm512_and_si512(v, _mm512_set1_epi16(0x000f));
    *hi = _mm512_srli_epi16(v, 4);
}

/* a chunk's 64 weights as float32: inputs 0..15, 16..31, 32..47, 48..63 in w[0..3] */
static inline void w4_chunk_f32(const uint8_t *p, __m512 w[4]) {
    __m512i lo, hi;
    w4_chunk(p, &lo, &hi);
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(lo)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
    w[2] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)));
    w[3] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
}

/* bfloat16 activations: each weight read as the bfloat16 1 + q/128 (the bits 0x3f80 | q, one logic op),
 * dot products by AVX-512 BF16 in pairs into float32; per group y += 128 s * D - (zs + 128 s) * xsum,
 * which is s * sum(q x) - zs * xsum. */
static inline void linear_w4_bf16_rows(const uint16_t *x, int64_t sx, const float *xsum, const uint8_t *q,
                                       const float *s, const float *zs, const float *b, uint16_t *y, int64_t sy,
                                       const int M, int64_t o0, int64_t n, int64_t I, int64_t gs) {
    const int64_t G = I / gs, row_bytes = I / 2;
    const int H = M <= 2 ? 2 : 1; /* few rows: the low and high halves in separate accumulators (latency) */
    const __m512i one = _mm512_set1_epi16(0x3f80), nib = _mm512_set1_epi16(0x000f);
    __m512 tot[2][4];
    for (int r = 0; r < 2; r++)
        for (int m = 0; m < 4; m++) tot[r][m] = _mm512_setzero_ps();
    /* gs 32: a chunk spans two groups, its halves scaled apart; otherwise a group is whole chunks */
    const int64_t step = gs >= 64 ? gs : 64;
    for (int64_t i0 = 0; i0 < I; i0 += step) {
        __m512 acc[2][4][2];
        for (int r = 0; r < 2; r++)
            for (int m = 0; m < 4; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
        for (int64_t i = i0; i < i0 + step; i += 64) {
            __m512bh xl[4], xh[4];
            for (int m = 0; m < M; m++) {
                xl[m] = (__m512bh)_mm512_loadu_si512(x + m * sx + i);
                xh[m] = (__m512bh)_mm512_loadu_si512(x + m * sx + i + 32);
            }
            for (int r = 0; r < 2; r++) {
                if (r >= n) break;
                const uint8_t *row = q + (o0 + r) * row_bytes + i / 2;
                _mm_prefetch((const char *)(row + 4 * row_bytes), _MM_HINT_T0);
                const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)row));
                const __m512bh wl = (__m512bh)_mm512_ternarylogic_epi32(v, nib, one, 0xea); /* (v & 15) | 0x3f80 */
                const __m512bh wh = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), one);
                for (int m = 0; m < M; m++) {
                    acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], xl[m], wl);
                    acc[r][m][H - 1] = _mm512_dpbf16_ps(acc[r][m][H - 1], xh[m], wh);
                }
            }
        }
        for (int r = 0; r < 2; r++) {
            if (r >= n) break;
            const float *sr = s + (o0 + r) * G;
            if (gs >= 64) {
                const __m512 sg = _mm512_set1_ps(128.f * sr[i0 / gs]);
                for (int m = 0; m < M; m++)
                    tot[r][m] = _mm512_fmadd_ps(H == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0],
                                                sg, tot[r][m]);
            } else { /* the caller passes M <= 2 here, so the halves were kept apart (H == 2) */
                const __m512 s0 = _mm512_set1_ps(128.f * sr[i0 / 32]), s1 = _mm512_set1_ps(128.f * sr[i0 / 32 + 1]);
                for (int m = 0; m < M; m++) {
                    tot[r][m] = _mm512_fmadd_ps(acc[r][m][0], s0, tot[r][m]);
                    tot[r][m] = _mm512_fmadd_ps(acc[r][m][H - 1], s1, tot[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < n; r++) {
        const float *z = zs + (o0 + r) * G, *sr = s + (o0 + r) * G;
        for (int m = 0; m < M; m++) {
            float v = _mm512_reduce_add_ps(tot[r][m]);
            const float *xs = xsum + m * G;
            for (int64_t g = 0; g < G; g++) v -= (z[g] + 128.f * sr[g]) * xs[g];
            if (b) v += b[o0 + r];
            y[m * sy + o0 + r] = f32_to_bf16(v);
        }
    }
}

/* float32 activations: the weights widened to float32, exact */
static inline void linear_w4_f32_rows(const float *x, int64_t sx, const float *xsum, const uint8_t *q,
                                      const float *s, const float *zs, const float *b, float *y, int64_t sy,
                                      const int M, int64_t o0, int64_t n, int64_t I, int64_t gs) {
    const int64_t G = I / gs, row_bytes = I / 2;
    for (int r = 0; r < n; r++) {
        const uint8_t *row = q + (o0 + r) * row_bytes;
        __m512 tot[4];
        for (int m = 0; m < 4; m++) tot[m] = _mm512_setzero_ps();
        for (int64_t i = 0; i < I; i += 64) {
            __m512 w[4];
            w4_chunk_f32(row + i / 2, w);
            for (int h = 0; h < 2; h++) { /* each half of the chunk is in one group */
                const __m512 sg = _mm512_set1_ps(s[(o0 + r) * G + (i + 32 * h) / gs]);
                for (int m = 0; m < M; m++) {
                    __m512 d = _mm512_mul_ps(w[2 * h], _mm512_loadu_ps(x + m * sx + i + 32 * h));
                    d = _mm512_fmadd_ps(w[2 * h + 1], _mm512_loadu_ps(x + m * sx + i + 32 * h + 16), d);
                    tot[m] = _mm512_fmadd_ps(d, sg, tot[m]);
                }
            }
        }
        const float *z = zs + (o0 + r) * G;
        for (int m = 0; m < M; m++) {
            float v = _mm512_reduce_add_ps(tot[m]);
            for (int64_t g = 0; g < G; g++) v -= z[g] * xsum[m * G + g];
            y[m * sy + o0 + r] = b ? v + b[o0 + r] : v;
        }
    }
}

/* y[m][o] = sum_i x[m][i] w[o][i] (+ b[o]) for the rows of a decode step: two weight rows at a time, read
 * from memory once for every row of x (four at a time), output rows split over the threads; x and y bfloat16
 * (x_bf16) or float32. The sums of x over each group come first (xsum, [M, G], the caller's buffer). */
void linear_w4(const void *x, int64_t sx, int x_bf16, float *xsum, const uint8_t *q, const float *s,
               const float *zs, const float *b, void *y, int64_t sy, int64_t M, int64_t O, int64_t I, int64_t gs,
               int nthreads) {
    const int64_t G = I / gs;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float a = 0.f;
            for (int64_t i = g * gs; i < (g + 1) * gs; i++)
                a += x_bf16 ? bf16_to_f32(((const uint16_t *)x)[m * sx + i]) : ((const float *)x)[m * sx + i];
            xsum[m * G + g] = a;
        }
    const int64_t blocks = (O + 1) / 2;
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t o0 = blk * 2, n = O - o0 < 2 ? O - o0 : 2;
        /* every row of x against this block of weight rows (in L1 after the first four), four at a time */
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mc = M - m0 < 4 ? M - m0 : 4;
            const float *xs = xsum + m0 * G;
            if (x_bf16) {
                const uint16_t *xb = (const uint16_t *)x + m0 * sx;
                uint16_t *yb = (uint16_t *)y + m0 * sy;
                if (gs < 64) { /* groups of 32: two rows at a time (each chunk's halves kept apart) */
                    for (int64_t m1 = 0; m1 < mc; m1 += 2) {
                        if (mc - m1 >= 2)
                            linear_w4_bf16_rows(xb + m1 * sx, sx, xs + m1 * G, q, s, zs, b, yb + m1 * sy, sy, 2, o0, n, I, gs);
                        else
                            linear_w4_bf16_rows(xb + m1 * sx, sx, xs + m1 * G, q, s, zs, b, yb + m1 * sy, sy, 1, o0, n, I, gs);
                    }
                    continue;
                }
                switch (mc) {
                case 1: linear_w4_bf16_rows(xb, sx, xs, q, s, zs, b, yb, sy, 1, o0, n, I, gs); break;
                case 2: linear_w4_bf16_rows(xb, sx, xs, q, s, zs, b, yb, sy, 2, o0, n, I, gs); break;
                case 3: linear_w4_bf16_rows(xb, sx, xs, q, s, zs, b, yb, sy, 3, o0, n, I, gs); break;
                default: linear_w4_bf16_rows(xb, sx, xs, q, s, zs, b, yb, sy, 4, o0, n, I, gs); break;
                }
            } else {
                const float *xf = (const float *)x + m0 * sx;
                float *yf = (float *)y + m0 * sy;
                switch (mc) {
                case 1: linear_w4_f32_rows(xf, sx, xs, q, s, zs, b, yf, sy, 1, o0, n, I, gs); break;
                case 2: linear_w4_f32_rows(xf, sx, xs, q, s, zs, b, yf, sy, 2, o0, n, I, gs); break;
                case 3: linear_w4_f32_rows(xf, sx, xs, q, s, zs, b, yf, sy, 3, o0, n, I, gs); break;
                default: linear_w4_f32_rows(xf, sx, xs, q, s, zs, b, yf, sy, 4, o0, n, I, gs); break;
                }
            }
        }
    }
}

/* The whole weight, dequantized into out ([O, I], float32 or bfloat16): for a step of many rows, which
 * then runs as one GEMM. */
void dequant_w4(const uint8_t *q, const float *s, const float *zs, void *out, int out_bf16, int64_t O, int64_t I,
                int64_t gs, int nthreads) {
    const int64_t G = I / gs;
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *row = q + o * (I / 2);
        for (int64_t i = 0; i < I; i += 64) {
            __m512 w[4];
            w4_chunk_f32(row + i / 2, w);
            for (int h = 0; h < 2; h++) {
                const int64_t g = o * G + (i + 32 * h) / gs;
                const __m512 sg = _mm512_set1_ps(s[g]), zg = _mm512_set1_ps(zs[g]);
                const __m512 a = _mm512_fmsub_ps(w[2 * h], sg, zg), c = _mm512_fmsub_ps(w[2 * h + 1], sg, zg);
                if (out_bf16)
                    _mm512_storeu_si512((uint16_t *)out + o * I + i + 32 * h, (__m512i)_mm512_cvtne2ps_pbh(c, a));
                else {
                    _mm512_storeu_ps((float *)out + o * I + i + 32 * h, a);
                    _mm512_storeu_ps((float *)out + o * I + i + 32 * h + 16, c);
                }
            }
        }
    }
}
#else
int linear_w4_vectorized(void) { return 0; }

void linear_w4(const void *x, int64_t sx, int x_bf16, float *xsum, const uint8_t *q, const float *s,
               const float *zs, const float *b, void *y, int64_t sy, int64_t M, int64_t O, int64_t I, int64_t gs,
               int nthreads) {
    (void)x; (void)sx; (void)x_bf16; (void)xsum; (void)q; (void)s; (void)zs; (void)b; (void)y; (void)sy; (void)M;
    (void)O; (void)I; (void)gs; (void)nthreads;
}

/* without AVX-512: plain C (the compiler vectorizes what it can) */
void dequant_w4(const uint8_t *q, const float *s, const float *zs, void *out, int out_bf16, int64_t O, int64_t I,
                int64_t gs, int nthreads) {
    const int64_t G = I / gs;
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *row = q + o * (I / 2);
        for (int64_t i = 0; i < I; i += 64)
            for (int64_t k = 0; k < 64; k++) {
                const uint8_t byte = row[i / 2 + (k & 31)];
                const float v = (float)(k < 32 ? (byte & 15) : (byte >> 4)) * s[o * G + (i + k) / gs] - zs[o * G + (i + k) / gs];
                if (out_bf16) ((uint16_t *)out)[o * I + i + k] = f32_to_bf16(v);
                else ((float *)out)[o * I + i + k] = v;
            }
    }
}
#endif
