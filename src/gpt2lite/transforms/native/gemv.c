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
  int4: see the int4 section below (4-bit codes with a bfloat16 scale and offset per group of inputs).
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

/* ---------------------------------------------------------------- int4 ------------------------------------- */

/* Weights: 4-bit codes q in 0..15, two a byte (input 2j in the low nibble of byte j, 2j + 1 in the high
   one: Int4Linear's plain rows), and per group of G inputs (G = 32, 64, ...) a bfloat16 scale s and
   offset z, w = (q - 8) * s + z. Row n's pairs (s, z) are stored row after row, sz[(n * groups + g) * 2]
   (Int4Linear keeps them so where this kernel reads them): a row's scales are one stream beside its
   codes; read (groups, rows, 2), as PyTorch's kernel wants them, they came from `groups` streams at once,
   1.3-1.6x slower.

   Activations are rounded to int8 in blocks of 32 inputs, one scale each (xs = max|x_block| / 127), as
   llama.cpp's q8_0 does for its q4_0 product: GPT-2's inputs to a layer have a few channels tens of
   times larger than the rest (the LayerNorms' gains), and one scale per row would leave the others
   with a handful of levels, an error added to the 4-bit weights' own; the float work per block costs
   little here, since each block has a weight scale to apply anyway. Within a block the int8 values
   are stored with the even inputs first, then the odd ones, the order the nibbles unpack in.

   y[m, n] = sum_b (s_g(b) * xs_b) * idot_b + sum_g (z_g * c_g + s_g * (-8 c_g)) (+ bias[n]), where idot_b
   is the exact integer dot of block b's codes with its int8 activations and c_g the activations' sum
   over group g, sum over its blocks of xs_b * sum(q_b) (float32 products and running sum). The second
   sum reads the (s, z) pairs as they lie against (-8 c_g, c_g) pairs made once per activation row. */
typedef struct {
    const int8_t *q; /* (M, K) activations rounded to int8, each block of 32 de-interleaved */
    const float *xs; /* (M, K / 32) their scales */
    const float *xs8; /* (M, K / 4): each scale 8 times, a vector's worth a block */
    const float *cc; /* (M, 2 K / G): per group -8 c_g, c_g */
    const uint8_t *w; /* (N, K / 2) */
    const uint16_t *sz; /* (N, K / G, 2) bfloat16 */
    const float *bias;
    float *y;
    int64_t M, N, K, G;
} i4_args;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Rounds row x (K floats) to int8 by blocks of 32 (q = round(x * (127 / amax_b)), ties to even), the
   evens of each block first; writes xs (K / 32) and cc (2 K / G). A row holding NaN or inf gets NaN scales. */
static void quantize_row_blocks(const float *x, int8_t *q, float *xs, float *cc, int64_t K, int64_t G) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); /* de-interleave within 8 lanes */
    float bad = 0.0f;
    int32_t sums[2048]; /* each block's sum of its int8 values; K / 32 <= 2048 (checked by the caller) */
    for (int64_t b = 0; b < K / 32; b++) {
        const float *v = x + b * 32;
        __m256 amax = _mm256_setzero_ps(), probe = amax;
        for (int i = 0; i < 32; i += 8) {
            __m256 t = _mm256_loadu_ps(v + i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, t));
            probe = _mm256_add_ps(probe, _mm256_mul_ps(t, _mm256_setzero_ps()));
        }
        float lanes[8], probes[8], m = 0.0f;
        _mm256_storeu_ps(lanes, amax);
        _mm256_storeu_ps(probes, probe);
        for (int i = 0; i < 8; i++) {
            m = lanes[i] > m ? lanes[i] : m;
            bad += probes[i];
        }
        int8_t *out = q + b * 32;
        if (m == 0.0f || isnan(m)) {
            memset(out, 0, 32);
            xs[b] = 0.0f, sums[b] = 0;
            continue;
        }
        __m256 inv = _mm256_set1_ps(127.0f / m);
        __m256i t[4];
        for (int i = 0; i < 4; i++) /* each: inputs 8i, 8i+2, 8i+4, 8i+6, then 8i+1, 8i+3, ... */
            t[i] = _mm256_permutevar8x32_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), inv)),
                                               evens);
        /* packs work within 128-bit halves: [t0 evens, t1 evens, t0 odds, t1 odds] as int16, then as bytes
           [t0..t3 evens, t0..t3 odds]: the block's evens in order, then its odds */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(t[0], t[1]), _mm256_packs_epi32(t[2], t[3]));
        _mm256_storeu_si256((__m256i *)out, packed);
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(t[0], t[1]), _mm256_add_epi32(t[2], t[3]));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
        sums[b] = _mm_cvtsi128_si32(h);
        xs[b] = m / 127.0f;
    }
    int64_t per = G / 32;
    for (int64_t g = 0; g < K / G; g++) {
        float c = 0.0f;
        for (int64_t b = g * per; b < (g + 1) * per; b++) c += xs[b] * (float)sums[b];
        cc[2 * g] = -8.0f * c, cc[2 * g + 1] = c;
    }
    if (isnan(bad))
        for (int64_t b = 0; b < K / 32; b++) xs[b] = NAN;
}

/* sum_g s_g * cc[2g] + z_g * cc[2g + 1]: the offsets' share, 4 pairs a step. */
static inline float offsets(const uint16_t *sz, const float *cc, int64_t groups) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {
        __m256i pairs = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sz + 2 * g))), 16);
        acc = _mm256_fmadd_ps(_mm256_castsi256_ps(pairs), _mm256_loadu_ps(cc + 2 * g), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float off = _mm_cvtss_f32(h);
    for (; g < groups; g++) off += bf16_to_f32(sz[2 * g]) * cc[2 * g] + bf16_to_f32(sz[2 * g + 1]) * cc[2 * g + 1];
    return off;
}

static inline __m256i nibbles_avx2(const uint8_t *w) { /* 16 bytes -> 32: low nibbles, then high ones */
    __m128i raw = _mm_loadu_si128((const __m128i *)w);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static float dot_i4_avx2(const i4_args *a, const uint8_t *w, const uint16_t *sz, int64_t m) {
    const int8_t *q = a->q + m * a->K;
    const float *xs = a->xs + m * (a->K / 32);
    const __m256i ones = _mm256_set1_epi16(1);
    int shift = __builtin_ctzll((unsigned long long)(a->G / 32));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (int64_t b = 0; b < a->K / 32; b += 2) { /* K a multiple of 64: blocks come in pairs */
        __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles_avx2(w + b * 16),
                                                            _mm256_loadu_si256((const __m256i *)(q + b * 32))), ones);
        __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles_avx2(w + b * 16 + 16),
                                                            _mm256_loadu_si256((const __m256i *)(q + b * 32 + 32))), ones);
        float d0 = bf16_to_f32(sz[2 * (b >> shift)]) * xs[b], d1 = bf16_to_f32(sz[2 * ((b + 1) >> shift)]) * xs[b + 1];
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), _mm256_cvtepi32_ps(p1), acc1);
    }
    __m256 t = _mm256_add_ps(acc0, acc1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h) + offsets(sz, a->cc + m * (2 * a->K / a->G), a->K / a->G);
}

/* One pair of blocks (b, b + 1) of a weight row against one activation row, added to acc. */
AVX512 static inline __m512 pair_i4_avx512(const i4_args *a, const uint8_t *w, const uint16_t *sz, const int8_t *q,
                                           const float *xs, const float *xs8, int shift, int64_t b, __m512 acc) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), order = _mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7);
    __m256i raw = _mm256_loadu_si256((const __m256i *)(w + b * 16));
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    __m512i codes = _mm512_and_si512(_mm512_permutexvar_epi64(order, both), low4);
    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(q + b * 32));
    __m512 d;
    if (shift) /* groups of 64 or more: both blocks take one weight scale, the activations' from xs8 */
        d = _mm512_mul_ps(_mm512_set1_ps(bf16_to_f32(sz[2 * (b >> shift)])), _mm512_loadu_ps(xs8 + b * 8));
    else {
        float d0 = bf16_to_f32(sz[2 * b]) * xs[b], d1 = bf16_to_f32(sz[2 * b + 2]) * xs[b + 1];
        d = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(d0))),
                                                _mm256_castps_pd(_mm256_set1_ps(d1)), 1));
    }
    (void)a;
    return _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(dot), acc);
}

AVX512 static float dot_i4_avx512(const i4_args *a, const uint8_t *w, const uint16_t *sz, int64_t m) {
    /* Two blocks per step: 32 bytes of codes unpack to [low 0, high 0, low 1, high 1] (16 bytes each); one
       accumulator, in the order dot4_i4_avx512 sums each of its rows (a row's result is the same alone or
       batched). */
    const int8_t *q = a->q + m * a->K;
    const float *xs = a->xs + m * (a->K / 32), *xs8 = a->xs8 + m * (a->K / 4);
    int shift = __builtin_ctzll((unsigned long long)(a->G / 32));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->K / 32; b += 2) acc = pair_i4_avx512(a, w, sz, q, xs, xs8, shift, b, acc);
    return _mm512_reduce_add_ps(acc) + offsets(sz, a->cc + m * (2 * a->K / a->G), a->K / a->G);
}

/* Up to 4 activation rows against one weight row (batches, prompts): each block's codes are unpacked and
   its weight scale read once for all of them (one row at a time, 8 rows took 1.4x the time of 4 at a time
   here). y[r] as dot_i4_* would give it, the same operations in the same order. */
static void dot4_i4_avx2(const i4_args *a, const uint8_t *w, const uint16_t *sz, int64_t m0, int R, float *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t row[4]; /* rows past the last repeat it: computed, not written */
    for (int r = 0; r < 4; r++) row[r] = m0 + (r < R ? r : R - 1);
    int shift = __builtin_ctzll((unsigned long long)(a->G / 32));
    /* even blocks into acc0, odd ones into acc1, as dot_i4_avx2 sums a row (the same result alone or batched);
       named arrays indexed only by the unrolled row, so that they stay in registers */
    __m256 acc0[4], acc1[4];
    for (int r = 0; r < 4; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a->K / 32; b += 2) {
        __m256i c0 = nibbles_avx2(w + b * 16), c1 = nibbles_avx2(w + b * 16 + 16);
        __m256 s0 = _mm256_set1_ps(bf16_to_f32(sz[2 * (b >> shift)])),
               s1 = _mm256_set1_ps(bf16_to_f32(sz[2 * ((b + 1) >> shift)]));
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) { /* always 4, so that the accumulators stay in registers */
            const int8_t *q = a->q + row[r] * a->K + b * 32;
            const float *x8 = a->xs8 + row[r] * (a->K / 4) + b * 8;
            __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)q)), ones);
            __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(q + 32))),
                                           ones);
            acc0[r] = _mm256_fmadd_ps(_mm256_mul_ps(s0, _mm256_loadu_ps(x8)), _mm256_cvtepi32_ps(p0), acc0[r]);
            acc1[r] = _mm256_fmadd_ps(_mm256_mul_ps(s1, _mm256_loadu_ps(x8 + 8)), _mm256_cvtepi32_ps(p1), acc1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 t = _mm256_add_ps(acc0[r], acc1[r]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        y[r] = _mm_cvtss_f32(h) + offsets(sz, a->cc + (m0 + r) * (2 * a->K / a->G), a->K / a->G);
    }
}

AVX512 static void dot4_i4_avx512(const i4_args *a, const uint8_t *w, const uint16_t *sz, int64_t m0, int R,
                                  float *y) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), order = _mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7);
    int64_t row[4]; /* rows past the last repeat it: computed, not written */
    for (int r = 0; r < 4; r++) row[r] = m0 + (r < R ? r : R - 1);
    int shift = __builtin_ctzll((unsigned long long)(a->G / 32));
    __m512 acc[4]; /* one a row: four chains already (an index by step kept them in memory) */
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->K / 32; b += 2) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(w + b * 16));
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
        __m512i codes = _mm512_and_si512(_mm512_permutexvar_epi64(order, both), low4);
        __m512 s = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(bf16_to_f32(sz[2 * (b >> shift)])))),
            _mm256_castps_pd(_mm256_set1_ps(bf16_to_f32(sz[2 * ((b + 1) >> shift)]))), 1));
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) { /* always 4, so that the accumulators stay in registers */
            const int8_t *q = a->q + row[r] * a->K + b * 32;
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(q));
            __m512 d = _mm512_mul_ps(s, _mm512_loadu_ps(a->xs8 + row[r] * (a->K / 4) + b * 8));
            acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(dot), acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[r] = _mm512_reduce_add_ps(acc[r]) +
               offsets(sz, a->cc + (m0 + r) * (2 * a->K / a->G), a->K / a->G);
}

#define I4_TASK(name, dot, dot4)                                                                     \
    static void name(const void *p, int64_t begin, int64_t end) {                                    \
        const i4_args *a = p;                                                                        \
        float four[4];                                                                               \
        for (int64_t n = begin; n < end; n++) {                                                      \
            const uint8_t *w = a->w + n * (a->K / 2);                                                \
            const uint16_t *sz = a->sz + n * (2 * a->K / a->G);                                      \
            for (int64_t m = 0; m < a->M; m += 4) {                                                  \
                int R = a->M - m < 4 ? (int)(a->M - m) : 4;                                          \
                if (a->M == 1)                                                                       \
                    four[0] = dot(a, w, sz, m);                                                      \
                else                                                                                 \
                    dot4(a, w, sz, m, R, four);                                                      \
                for (int r = 0; r < R; r++)                                                          \
                    a->y[(m + r) * a->N + n] = a->bias ? four[r] + a->bias[n] : four[r];             \
            }                                                                                        \
        }                                                                                            \
    }
I4_TASK(i4_task_avx2, dot_i4_avx2, dot4_i4_avx2)
AVX512 I4_TASK(i4_task_avx512, dot_i4_avx512, dot4_i4_avx512)

/* Returns -1 where the rounded activations could not be allocated, -2 for shapes it does not take. */
static int linear_i4(const float *x, const uint8_t *w, const uint16_t *sz, const float *bias, float *y, int64_t M,
                     int64_t N, int64_t K, int64_t G, int threads, task_fn task) {
    if (K % 64 || K > 65536 || G < 32 || (G & (G - 1)) || K % G) return -2;
    int8_t *q = aligned_alloc(64, (size_t)(M * K + 64) / 64 * 64);
    float *xs = malloc(sizeof(float) * (size_t)(M * (K / 32))), *cc = malloc(sizeof(float) * (size_t)(M * (2 * K / G)));
    float *xs8 = malloc(sizeof(float) * (size_t)(M * (K / 4)));
    if (!q || !xs || !cc || !xs8) {
        free(q), free(xs), free(cc), free(xs8);
        return -1;
    }
    for (int64_t m = 0; m < M; m++)
        quantize_row_blocks(x + m * K, q + m * K, xs + m * (K / 32), cc + m * (2 * K / G), K, G);
    for (int64_t i = 0; i < M * (K / 4); i++) xs8[i] = xs[i / 8];
    i4_args a = {q, xs, xs8, cc, w, sz, bias, y, M, N, K, G};
    parallel(task, &a, N, block_rows(K / 2), threads);
    free(q), free(xs), free(cc), free(xs8);
    return 0;
}

int gl_linear_i4_avx2(const float *x, const uint8_t *w, const uint16_t *sz, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K, int64_t G, int threads) {
    return linear_i4(x, w, sz, bias, y, M, N, K, G, threads, i4_task_avx2);
}

int gl_linear_i4_avx512(const float *x, const uint8_t *w, const uint16_t *sz, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    return linear_i4(x, w, sz, bias, y, M, N, K, G, threads, i4_task_avx512);
}

/* ---------------------------------------------------------------- a block's decode step --------------------- */

/* One decode step of a GPT-2 block for one row, in one call: LayerNorm, the qkv product, the new key and
   value written into the cache at their slot, one-row attention over the slots, the projection and the
   residual, LayerNorm, fc, GELU (tanh form), the projection and the residual. Each piece is the kernel
   the layer-by-layer route calls (the products, the attention), or the plain float32 arithmetic that
   PyTorch's LayerNorm and GELU compute, so the two routes agree to float32 rounding; what this saves
   is the ~15 Python calls and tensor allocations of a block (~0.2 ms a block at batch 1). */
typedef struct {
    int32_t kind; /* 0: float32 weight rows, 1: float16, 2: int8 rows with a scale each, 3: int4 groups */
    int32_t unused;
    const void *w;
    const float *scale; /* int8: (N,) */
    const uint16_t *sz; /* int4: (N, K / G, 2) bfloat16 */
    const float *bias;  /* (N,) or NULL */
    int64_t N, K, G;
} gl_linear;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float eps1, eps2, scale;
    int32_t unused;
    gl_linear qkv, proj, fc, out;
    int64_t C, H, D;
} gl_block;

static int run_linear(const gl_linear *l, const float *x, float *y, int threads, int avx512) {
    switch (l->kind) {
    case 0:
        (avx512 ? gl_linear_f32_avx512 : gl_linear_f32_avx2)(x, l->w, l->bias, y, 1, l->N, l->K, threads);
        return 0;
    case 1:
        (avx512 ? gl_linear_f16_avx512 : gl_linear_f16_avx2)(x, l->w, l->bias, y, 1, l->N, l->K, threads);
        return 0;
    case 2:
        return (avx512 ? gl_linear_i8_avx512 : gl_linear_i8_avx2)(x, l->w, l->scale, l->bias, y, 1, l->N, l->K, threads);
    case 3:
        return (avx512 ? gl_linear_i4_avx512 : gl_linear_i4_avx2)(x, l->w, l->sz, l->bias, y, 1, l->N, l->K, l->G,
                                                                  threads);
    }
    return -2;
}

/* (x - mean) / sqrt(var + eps) * w + b, the mean and variance (biased) of x's C values summed in float32. */
static void layer_norm(const float *x, const float *w, const float *b, float eps, float *y, int64_t C) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < C; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
    float lanes[8], mean = 0.0f, var = 0.0f;
    _mm256_storeu_ps(lanes, s);
    for (int i = 0; i < 8; i++) mean += lanes[i];
    mean /= (float)C;
    __m256 m = _mm256_set1_ps(mean), q = _mm256_setzero_ps();
    for (int64_t i = 0; i < C; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
        q = _mm256_fmadd_ps(d, d, q);
    }
    _mm256_storeu_ps(lanes, q);
    for (int i = 0; i < 8; i++) var += lanes[i];
    __m256 r = _mm256_set1_ps(1.0f / sqrtf(var / (float)C + eps));
    for (int64_t i = 0; i < C; i += 8) {
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
    }
}

/* e^x for 8 floats (Cephes' expf: 2^n times a degree-5 polynomial on [-ln2/2, ln2/2], within 2 ulp);
   0 below -87.3, inf above 88.7. */
static inline __m256 exp_avx2(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.7f), lo = _mm256_set1_ps(-87.3f);
    __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n: n in [-127, 128] after the clamp; n = 128 (x near 88.7) is split in two factors of 2^64 */
    __m256i e = _mm256_cvtps_epi32(n);
    __m256i half = _mm256_srai_epi32(e, 1);
    __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(e, half),
                                                                      _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, a), b);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
}

/* GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + e^(-2u))
   (the same function: 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u))), within a few float32 ulp of PyTorch's. */
static void gelu_tanh(float *x, int64_t n) {
    const __m256 c = _mm256_set1_ps(-2.0f * 0.7978845608028654f), k = _mm256_set1_ps(0.044715f),
                 one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp_avx2(u))));
    }
}

/* x (C,) becomes the block's output. k, v: the layer's cache for this row, head h's slot s at
   h * k_h + s * k_s; the new key and value go to slot `slot`, and attention reads slots 0..slot.
   Returns 0, -1 where a buffer could not be allocated, -2 for shapes it does not take. */
static int block_step(const gl_block *b, float *x, float *k, float *v, int64_t k_h, int64_t k_s, int64_t v_h,
                      int64_t v_s, int64_t slot, int threads, int avx512) {
    int64_t C = b->C, H = b->H, D = b->D, F = b->fc.N;
    if (C % 64 || F % 64 || H * D != C || D % 8 || D > 256 || b->qkv.N != 3 * C || b->proj.N != C || b->out.N != C)
        return -2;
    float *h = malloc(sizeof(float) * (size_t)(6 * C + F));
    if (!h) return -1;
    float *qkv = h + C, *att = qkv + 3 * C, *o = att + C, *f = o + C;
    int err = 0;
    layer_norm(x, b->ln1_w, b->ln1_b, b->eps1, h, C);
    if ((err = run_linear(&b->qkv, h, qkv, threads, avx512))) goto done;
    for (int64_t i = 0; i < H; i++) {
        memcpy(k + i * k_h + slot * k_s, qkv + C + i * D, sizeof(float) * (size_t)D);
        memcpy(v + i * v_h + slot * v_s, qkv + 2 * C + i * D, sizeof(float) * (size_t)D);
    }
    for (int64_t i = 0; i < C; i++) att[i] = NAN; /* stays NaN only if the attention could not allocate */
    gl_attend_one_row(qkv, k, v, att, 1, H, slot + 1, D, 0, k_h, k_s, 0, v_h, v_s, b->scale, threads);
    if ((err = run_linear(&b->proj, att, o, threads, avx512))) goto done;
    for (int64_t i = 0; i < C; i++) x[i] += o[i];
    layer_norm(x, b->ln2_w, b->ln2_b, b->eps2, h, C);
    if ((err = run_linear(&b->fc, h, f, threads, avx512))) goto done;
    gelu_tanh(f, F);
    if ((err = run_linear(&b->out, f, o, threads, avx512))) goto done;
    for (int64_t i = 0; i < C; i++) x[i] += o[i];
done:
    free(h);
    return err;
}

int gl_block_step_avx2(const gl_block *b, float *x, float *k, float *v, int64_t k_h, int64_t k_s, int64_t v_h,
                       int64_t v_s, int64_t slot, int threads) {
    return block_step(b, x, k, v, k_h, k_s, v_h, v_s, slot, threads, 0);
}

int gl_block_step_avx512(const gl_block *b, float *x, float *k, float *v, int64_t k_h, int64_t k_s, int64_t v_h,
                         int64_t v_s, int64_t slot, int threads) {
    return block_step(b, x, k, v, k_h, k_s, v_h, v_s, slot, threads, 1);
}
