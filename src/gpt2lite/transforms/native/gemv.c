/* gpt2lite's CPU kernels: rows of activations times rows of weights, the weights read one row after another.

A decode step multiplies one activation row by every weight matrix: its speed is the memory
bandwidth reached, and reading each weight row start to end (not 4 rows interleaved) is what
reaches it. Output rows are split into blocks of about 128 KB of weights, shared out among
PyTorch's OpenMP threads one block at a time.

Built by gpt2lite at first use (transforms/native.py) with -O3 -mavx2 -mfma -mf16c -fopenmp
-ffp-contract=off; the AVX-512 functions carry their own target attribute and are called
only where the CPU has those features. No torch headers: tensors arrive as data pointers.

Products (y is (M, N); x is (M, K); weight rows are (N, K); K a multiple of 64):
  f32:  y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n])
  int8: x's rows rounded to int8, one scale each (xs = max|x| / 127, q = round(x * 127 / max|x|),
        ties to even); y[m, n] = (float)(sum_k q[m, k] * w[n, k]) * (xs[m] * scale[n]) (+ bias[n]),
        the integer dot exact, each float operation rounded once (no fused multiply-add).
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

uint64_t gl_key(void) { return GL_KEY; } /* the build's cache key: a stale or foreign file shows here */

/* ---------------------------------------------------------------- threads -------------------------------- */

typedef void (*task_fn)(const void *args, int64_t begin, int64_t end);

/* Blocks of rows handed out one at a time (dynamic schedule), so a thread that the OS deschedules
   holds up at most its own block: the others take the rest. OpenMP is PyTorch's own libgomp (the
   library is linked against the libgomp.so.1 already loaded), so the kernels share PyTorch's
   threads rather than adding a second pool that would fight them for the cores. */
static void parallel(task_fn fn, const void *args, int64_t rows, int64_t block, int threads) {
    int64_t n = (rows + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t i = 0; i < n; i++) {
        int64_t end = (i + 1) * block;
        fn(args, i * block, end < rows ? end : rows);
    }
}

/* ---------------------------------------------------------------- float32 ---------------------------------- */

typedef struct {
    const float *x, *w, *bias;
    float *y;
    int64_t M, N, K;
} f32_args;

static float dot_f32_avx2(const float *x, const float *w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(w + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_loadu_ps(w + k + 24), a3);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

AVX512 static float dot_f32_avx512(const float *x, const float *w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(w + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(w + k + 48), a3);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#define F32_TASK(name, dot)                                                                          \
    static void name(const void *p, int64_t begin, int64_t end) {                                    \
        const f32_args *a = p;                                                                       \
        for (int64_t n = begin; n < end; n++) {                                                      \
            const float *w = a->w + n * a->K;                                                        \
            for (int64_t m = 0; m < a->M; m++) {                                                     \
                float y = dot(a->x + m * a->K, w, a->K);                                             \
                a->y[m * a->N + n] = a->bias ? y + a->bias[n] : y;                                   \
            }                                                                                        \
        }                                                                                            \
    }
F32_TASK(f32_task_avx2, dot_f32_avx2)
AVX512 F32_TASK(f32_task_avx512, dot_f32_avx512)

#ifndef BLOCK_BYTES
#define BLOCK_BYTES 131072 /* larger blocks stream better; 8-32 KB ones ran 1.2-2x slower on 2 threads */
#endif
static int64_t block_rows(int64_t row_bytes) { /* about BLOCK_BYTES of weights a block */
    int64_t rows = BLOCK_BYTES / (row_bytes > 0 ? row_bytes : 1);
    return rows > 0 ? rows : 1;
}

static void linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K, int threads, task_fn task) {
    f32_args a = {x, w, bias, y, M, N, K};
    parallel(task, &a, N, block_rows(K * 4), threads);
}

void gl_linear_f32_avx2(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K, int threads) {
    linear_f32(x, w, bias, y, M, N, K, threads, f32_task_avx2);
}

void gl_linear_f32_avx512(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                          int64_t K, int threads) {
    linear_f32(x, w, bias, y, M, N, K, threads, f32_task_avx512);
}

/* ---------------------------------------------------------------- int8 ------------------------------------- */

typedef struct {
    const int8_t *q; /* (M, K) activations rounded to int8 */
    const float *xs; /* (M,) their scales */
    const int8_t *w;
    const float *scale, *bias;
    float *y;
    int64_t M, N, K;
} i8_args;

/* Rounds row x (K floats) to int8: q = round(x * (127 / amax)), ties to even; returns amax / 127
   (NaN when x holds NaN or inf, so that every output of the row is NaN, as a float product's). */
static float quantize_row(const float *x, int8_t *q, int64_t K) {
    __m256 amax = _mm256_setzero_ps(), probe = amax, sign = _mm256_set1_ps(-0.0f);
    for (int64_t k = 0; k < K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        probe = _mm256_add_ps(probe, _mm256_mul_ps(v, _mm256_setzero_ps())); /* NaN if any inf or NaN */
    }
    float lanes[8], probes[8], m = 0.0f, bad = 0.0f;
    _mm256_storeu_ps(lanes, amax);
    _mm256_storeu_ps(probes, probe);
    for (int i = 0; i < 8; i++) {
        m = lanes[i] > m ? lanes[i] : m;
        bad += probes[i];
    }
    if (isnan(bad)) {
        memset(q, 0, (size_t)K);
        return NAN;
    }
    if (m == 0.0f) {
        memset(q, 0, (size_t)K);
        return 0.0f;
    }
    __m256 inv = _mm256_set1_ps(127.0f / m);
    for (int64_t k = 0; k < K; k += 16) { /* cvtps rounds to nearest even; |x * inv| <= 127 */
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv));
        __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8); /* 16 int16, in order */
        __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
        _mm_storeu_si128((__m128i *)(q + k), b8);
    }
    return m / 127.0f;
}

static int32_t dot_i8_avx2(const int8_t *q, const int8_t *w, int64_t K) {
    /* maddubs takes unsigned * signed: |q| times w with q's sign, pairs summed in int16 (at most
       2 * 127 * 127, no saturation), then madd to int32. */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    for (int64_t k = 0; k < K; k += 64) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + k)), x1 = _mm256_loadu_si256((const __m256i *)(q + k + 32));
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k)), w1 = _mm256_loadu_si256((const __m256i *)(w + k + 32));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)), ones));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(w1, x1)), ones));
    }
    __m256i s = _mm256_add_epi32(a0, a1);
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm_cvtsi128_si32(h);
}

AVX512 static int32_t dot_i8_avx512(const int8_t *q, const int8_t *w, int64_t K) {
    /* vpdpbusd takes unsigned * signed too, summed in int32: the same sign move, one instruction less. */
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 128) {
        __m512i x0 = _mm512_loadu_si512(q + k), w0 = _mm512_loadu_si512(w + k);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_abs_epi8(x0), _mm512_mask_sub_epi8(w0, _mm512_movepi8_mask(x0), zero, w0));
        if (k + 64 < K) {
            __m512i x1 = _mm512_loadu_si512(q + k + 64), w1 = _mm512_loadu_si512(w + k + 64);
            a1 = _mm512_dpbusd_epi32(a1, _mm512_abs_epi8(x1), _mm512_mask_sub_epi8(w1, _mm512_movepi8_mask(x1), zero, w1));
        }
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}

#define I8_TASK(name, dot)                                                                           \
    static void name(const void *p, int64_t begin, int64_t end) {                                    \
        const i8_args *a = p;                                                                        \
        for (int64_t n = begin; n < end; n++) {                                                      \
            const int8_t *w = a->w + n * a->K;                                                       \
            for (int64_t m = 0; m < a->M; m++) {                                                     \
                float y = (float)dot(a->q + m * a->K, w, a->K) * (a->xs[m] * a->scale[n]);           \
                a->y[m * a->N + n] = a->bias ? y + a->bias[n] : y;                                   \
            }                                                                                        \
        }                                                                                            \
    }
I8_TASK(i8_task_avx2, dot_i8_avx2)
AVX512 I8_TASK(i8_task_avx512, dot_i8_avx512)

static int linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                     int64_t N, int64_t K, int threads, task_fn task) {
    int8_t *q = aligned_alloc(64, (size_t)(M * K + 64) / 64 * 64);
    float *xs = malloc(sizeof(float) * (size_t)M);
    if (!q || !xs) {
        free(q), free(xs);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) xs[m] = quantize_row(x + m * K, q + m * K, K);
    i8_args a = {q, xs, w, scale, bias, y, M, N, K};
    parallel(task, &a, N, block_rows(K), threads);
    free(q), free(xs);
    return 0;
}

int gl_linear_i8_avx2(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K, int threads) {
    return linear_i8(x, w, scale, bias, y, M, N, K, threads, i8_task_avx2);
}

int gl_linear_i8_avx512(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    return linear_i8(x, w, scale, bias, y, M, N, K, threads, i8_task_avx512);
}

/* ---------------------------------------------------------------- one-row attention ------------------------ */

/* One query row per (batch row, head) against S cached keys and values: softmax(q.k * scale) . v, in
   float32, the scores' maximum subtracted before exp. q and y are (B, H, D) contiguous; k and v
   are read through their strides (a view of the cache's slots), each slot's D values contiguous. */
typedef struct {
    const float *q, *k, *v;
    float *y;
    int64_t H, S, D, k_b, k_h, k_s, v_b, v_h, v_s;
    float scale;
} attn_args;

static float dot_f32_short(const float *a, const float *b, int64_t D) { /* D a multiple of 8 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static void attn_task(const void *p, int64_t begin, int64_t end) {
    const attn_args *a = p;
    float *scores = malloc(sizeof(float) * (size_t)a->S), acc[256];
    if (!scores) return; /* the caller checks for this: y keeps its NaN fill */
    for (int64_t row = begin; row < end; row++) {
        int64_t b = row / a->H, h = row % a->H;
        const float *q = a->q + row * a->D, *k = a->k + b * a->k_b + h * a->k_h, *v = a->v + b * a->v_b + h * a->v_h;
        float top = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s < a->S; s++) {
            scores[s] = dot_f32_short(q, k + s * a->k_s, a->D) * a->scale;
            top = scores[s] > top ? scores[s] : top;
        }
        for (int64_t s = 0; s < a->S; s++) total += scores[s] = expf(scores[s] - top);
        for (int64_t d = 0; d < a->D; d++) acc[d] = 0.0f;
        for (int64_t s = 0; s < a->S; s++) {
            const float *vs = v + s * a->v_s;
            __m256 w = _mm256_set1_ps(scores[s]);
            for (int64_t d = 0; d < a->D; d += 8)
                _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + d), _mm256_loadu_ps(acc + d)));
        }
        float *y = a->y + row * a->D;
        for (int64_t d = 0; d < a->D; d++) y[d] = acc[d] / total;
    }
    free(scores);
}

void gl_attend_one_row(const float *q, const float *k, const float *v, float *y, int64_t B, int64_t H, int64_t S,
                       int64_t D, int64_t k_b, int64_t k_h, int64_t k_s, int64_t v_b, int64_t v_h, int64_t v_s,
                       float scale, int threads) {
    attn_args a = {q, k, v, y, H, S, D, k_b, k_h, k_s, v_b, v_h, v_s, scale};
    parallel(attn_task, &a, B * H, 1, threads);
}

/* ---------------------------------------------------------------- float16 weights -------------------------- */

/* y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) with w stored as IEEE half floats, widened exactly to
   float32 (F16C) as they are read: half the bytes of float32 weights, float32 arithmetic. */
typedef struct {
    const float *x;
    const uint16_t *w;
    const float *bias;
    float *y;
    int64_t M, N, K;
} f16_args;

static float dot_f16_avx2(const float *x, const uint16_t *w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k))), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 8))), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 16))), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 24))), a3);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

AVX512 static float dot_f16_avx512(const float *x, const uint16_t *w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k))), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k + 16))), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k + 32))), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k + 48))), a3);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#define F16_TASK(name, dot)                                                                          \
    static void name(const void *p, int64_t begin, int64_t end) {                                    \
        const f16_args *a = p;                                                                       \
        for (int64_t n = begin; n < end; n++) {                                                      \
            const uint16_t *w = a->w + n * a->K;                                                     \
            for (int64_t m = 0; m < a->M; m++) {                                                     \
                float y = dot(a->x + m * a->K, w, a->K);                                             \
                a->y[m * a->N + n] = a->bias ? y + a->bias[n] : y;                                   \
            }                                                                                        \
        }                                                                                            \
    }
F16_TASK(f16_task_avx2, dot_f16_avx2)
AVX512 F16_TASK(f16_task_avx512, dot_f16_avx512)

void gl_linear_f16_avx2(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K, int threads) {
    f16_args a = {x, w, bias, y, M, N, K};
    parallel(f16_task_avx2, &a, N, block_rows(K * 2), threads);
}

void gl_linear_f16_avx512(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t N,
                          int64_t K, int threads) {
    f16_args a = {x, w, bias, y, M, N, K};
    parallel(f16_task_avx512, &a, N, block_rows(K * 2), threads);
}
