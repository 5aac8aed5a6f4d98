/* kvgraph native kernels: the hot loops of a decode step, compiled on first use (see native/__init__.py).
 *
 * Why C: at batch size 1 a token is ~600 small ops. torch's int4 matvec dequantizes every weight to float
 * and its per-op dispatch costs microseconds, so a SmolLM2 token took ~28 ms where llama.cpp needs ~10.
 * These kernels do what ggml does on the CPU -- activations quantized to int8 in blocks of 32, weights
 * kept 4- or 8-bit, integer dot products (AVX2 maddubs) scaled once per block -- over a layout repacked
 * at load for streaming, and each op is one call with no allocation.
 *
 * Every kernel takes one argument, `const int64_t *a`: its parameters as 64-bit slots (pointers, sizes, and
 * floats stored as their float64 bit pattern), built once when a Program is compiled. A call from Python
 * then converts a single pointer. Matmuls split output rows across OpenMP threads with a static schedule,
 * so results do not depend on timing: a replayed Program is bit-identical to a freshly compiled one.
 *
 * Weight layouts (row-major, one contiguous record per output row; K is a multiple of 32, G = K / 32):
 *   Q4 (from Q4_0 / Q4_1 / Q4_K, exact):  w = q * d[g] + m[g],  q in [0, 15]
 *       K/2 bytes of nibbles: groups in pairs, 32 bytes per pair, byte j = q[2p][j] | q[2p+1][j] << 4;
 *       an odd last group takes 16 bytes, byte j = q[j] | q[j + 16] << 4;
 *       then d[G], then m[G]: float16 ("q4h", when every value is exactly a float16, as Q4_0 / Q4_1's
 *       are) or float32 ("q4"; Q4_K's d * sc products usually need it).
 *   Q5 ("q5h", from Q5_0 / Q5_1, exact):  w = q * d[g] + m[g],  q in [0, 31]: Q4's nibbles, then K/8 bytes of
 *       fifth bits (4 per group, bit j = element j), then float16 d[G] and m[G] (Q5_0: m = -16 d).
 *   Q8 (from Q8_0 exact, other types re-quantized per block):  w = q * d[g],  q in [-127, 127]
 *       K bytes of int8, then d[G] float16 -- Q8_0's own layout, split into planes.
 * Activations (quantize_q8): per block of 32, d = max|x| / 127, q = round(x / d), s = d * sum(q).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVG_AVX2 1
#else
#define KVG_AVX2 0
#endif

#define QK 32

static inline float f_arg(int64_t bits) {
    double d;
    memcpy(&d, &bits, sizeof d);
    return (float)d;
}

int kvg_simd(void) { return KVG_AVX2; }

#ifdef _OPENMP
#include <omp.h>
int kvg_threads(void) { return omp_get_max_threads(); }
void kvg_set_threads(int64_t n) { omp_set_num_threads((int)n); }
#else
int kvg_threads(void) { return 1; }
void kvg_set_threads(int64_t n) { (void)n; }
#endif

static inline float h2f(uint16_t h) {          /* IEEE half -> float, exact */
#if KVG_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 1024), (int)e - 25);
    return sign ? -v : v;
#endif
}

/* scale i of a row's scale array (float16 when H, else float32) */
static inline __attribute__((always_inline)) float ld_scale(const uint8_t *base, int64_t i, const int H) {
    return H ? h2f(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* ---- activations -------------------------------------------------------------------------------------- */
/* a: x, M, K, ldx (floats), xq (int8 [M, K]), xd (float [M, G]), xs (float [M, G]) */
void kvg_quantize_q8(const int64_t *a) {
    const float *x = (const float *)a[0];
    const int64_t m_rows = a[1], k = a[2], ldx = a[3], g_n = k / QK;
    int8_t *xq = (int8_t *)a[4];
    float *xd = (float *)a[5], *xs = (float *)a[6];
    for (int64_t m = 0; m < m_rows; m++) {
        const float *xr = x + m * ldx;
        for (int64_t g = 0; g < g_n; g++) {
            const float *v = xr + g * QK;
            int8_t *q = xq + m * k + g * QK;
#if KVG_AVX2
            /* as ggml's quantize_row_q8_1: the same values as the scalar loop below (round half to even) */
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                   v3 = _mm256_loadu_ps(v + 24);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
            const __m256 vid = _mm256_set1_ps(id);
            const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rnd));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rnd));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rnd));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rnd));
            __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_hadd_epi32(s4, s4);
            s4 = _mm_hadd_epi32(s4, s4);
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)q, p);
            xd[m * g_n + g] = d;
            xs[m * g_n + g] = d * (float)_mm_cvtsi128_si32(s4);
#else
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                q[j] = (int8_t)nearbyintf(v[j] * id);
                sum += q[j];
            }
            xd[m * g_n + g] = d;
            xs[m * g_n + g] = d * (float)sum;
#endif
        }
    }
}

/* ---- matmul: y[m, n] = sum_k x[m, k] w[n, k] ------------------------------------------------------------ */
/* Output rows (weight rows) may be split into segments written to different buffers: a fused q/k/v matmul
 * writes each member's columns straight into that member's output. */
typedef struct {
    int64_t n_seg;
    const int64_t *seg_end;   /* cumulative row counts */
    float *const *seg_out;    /* [M, rows of the segment] row-major */
} segs_t;

static inline float *out_at(const segs_t *s, int64_t row, int64_t m) {
    int64_t i = 0, start = 0;
    while (row >= s->seg_end[i]) start = s->seg_end[i++];
    return s->seg_out[i] + m * (s->seg_end[i] - start) + (row - start);
}

#if KVG_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The block loops take eight blocks at a time: their eight float16 weight scales convert in one
 * instruction and multiply the activations' eight scales in one more (sc8). Blocks 2 pp and 2 pp + 1 of
 * those eight leave madd as 8 + 8 int32 partial sums (i0, i1), which hadd folds into one vector (lanes
 * 0,1,4,5 the first block; 2,3,6,7 the second), so one convert and one fma, with the two scales permuted
 * into the same lanes, finish both blocks. */
static inline __attribute__((always_inline)) __m256 fma_two_blocks(__m256i i0, __m256i i1, __m256 sc8, int pp,
                                                                   __m256 acc) {
    const int a = 2 * pp, b = 2 * pp + 1;
    const __m256i idx = _mm256_setr_epi32(a, a, b, b, a, a, b, b);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(i0, i1)), _mm256_permutevar8x32_ps(sc8, idx), acc);
}

/* Dot products of RB weight rows with MB activation rows, Q4 (or, H & 2, Q5) weights; H & 1: float16 scales.
 * always_inline so that each (RB, MB, H) instance is unrolled with its accumulators in registers. */
static inline __m256i high_bits(const uint8_t *row, int64_t k, int64_t g) {
    /* Q5's fifth bits of group g (bit j: element j) as bytes 0x10 / 0 (ggml's bytes_from_bits_32). */
    uint32_t bits;
    memcpy(&bits, row + k / 2 + 4 * g, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i b = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf),
                                      _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

static inline __attribute__((always_inline)) void q4_tile(
        const uint8_t *w, int64_t rb, int64_t k, const int8_t *xq, const float *xd, const float *xs,
        int64_t g_n, const int RB, const int MB, float *res /* [RB][MB] */, const int H) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int HS = H & 1, B5 = H & 2;
    const int64_t so = k / 2 + (B5 ? k / 8 : 0);      /* where a row's scales start */
    __m256 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < MB; j++) acc[r][j] = _mm256_setzero_ps();
    int64_t p = 0;
    if (HS) {                            /* eight groups at a time: see fma_two_blocks */
        for (; 2 * p + 8 <= g_n; p += 4) {
            const int64_t g = 2 * p;
            __m256 xd8[4];
#pragma GCC unroll 4
            for (int j = 0; j < MB; j++) xd8[j] = _mm256_loadu_ps(xd + j * g_n + g);
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++) {
                const uint8_t *row = w + r * rb;
                const __m256 wd8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + so + 2 * g)));
                __m256 sc[4];
#pragma GCC unroll 4
                for (int j = 0; j < MB; j++) sc[j] = _mm256_mul_ps(wd8, xd8[j]);
#pragma GCC unroll 4
                for (int pp = 0; pp < 4; pp++) {
                    const __m256i qb = _mm256_loadu_si256((const __m256i *)(row + 32 * (p + pp)));
                    __m256i q0 = _mm256_and_si256(qb, m4);
                    __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
                    if (B5) {
                        q0 = _mm256_or_si256(q0, high_bits(row, k, 2 * (p + pp)));
                        q1 = _mm256_or_si256(q1, high_bits(row, k, 2 * (p + pp) + 1));
                    }
#pragma GCC unroll 4
                    for (int j = 0; j < MB; j++) {
                        const int8_t *xj = xq + j * k + 64 * (p + pp);
                        const __m256i i0 = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)xj)), ones);
                        const __m256i i1 = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(xj + 32))), ones);
                        acc[r][j] = fma_two_blocks(i0, i1, sc[j], pp, acc[r][j]);
                    }
                }
            }
        }
    }
    const int64_t pairs = g_n / 2;
    for (; p < pairs; p++) {
        __m256i x0[4], x1[4];
        float d0[4], d1[4];
#pragma GCC unroll 4
        for (int j = 0; j < MB; j++) {
            x0[j] = _mm256_loadu_si256((const __m256i *)(xq + j * k + 64 * p));
            x1[j] = _mm256_loadu_si256((const __m256i *)(xq + j * k + 64 * p + 32));
            d0[j] = xd[j * g_n + 2 * p];
            d1[j] = xd[j * g_n + 2 * p + 1];
        }
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            const uint8_t *row = w + r * rb;
            const uint8_t *wd = row + so;
            const __m256i qb = _mm256_loadu_si256((const __m256i *)(row + 32 * p));
            __m256i q0 = _mm256_and_si256(qb, m4);
            __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
            if (B5) {
                q0 = _mm256_or_si256(q0, high_bits(row, k, 2 * p));
                q1 = _mm256_or_si256(q1, high_bits(row, k, 2 * p + 1));
            }
            const float s0 = ld_scale(wd, 2 * p, HS), s1 = ld_scale(wd, 2 * p + 1, HS);
#pragma GCC unroll 4
            for (int j = 0; j < MB; j++) {
                const __m256i i0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q0, x0[j]), ones);
                const __m256i i1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q1, x1[j]), ones);
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(s0 * d0[j]), acc[r][j]);
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(s1 * d1[j]), acc[r][j]);
            }
        }
    }
    if (g_n & 1) {                       /* odd last group: 16 bytes, low nibbles first */
        const int64_t g = g_n - 1;
        for (int r = 0; r < RB; r++) {
            const uint8_t *row = w + r * rb;
            const uint8_t *wd = row + so;
            const __m128i b = _mm_loadu_si128((const __m128i *)(row + 16 * g));
            __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), m4);
            if (B5) q = _mm256_or_si256(q, high_bits(row, k, g));
            for (int j = 0; j < MB; j++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + j * k + QK * g));
                const __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
                const __m256 sc = _mm256_set1_ps(ld_scale(wd, g, HS) * xd[j * g_n + g]);
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sc, acc[r][j]);
            }
        }
    }
    for (int r = 0; r < RB; r++) {
        const uint8_t *wm = w + r * rb + so + g_n * (HS ? 2 : 4);
        for (int j = 0; j < MB; j++) {
            __m256 mt = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 8 <= g_n; g += 8) {
                const __m256 mv = HS ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + 2 * g)))
                                    : _mm256_loadu_ps((const float *)wm + g);
                mt = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xs + j * g_n + g), mt);
            }
            float s = hsum(acc[r][j]) + hsum(mt);
            for (; g < g_n; g++) s += ld_scale(wm, g, HS) * xs[j * g_n + g];
            res[r * MB + j] = s;
        }
    }
}

static inline __attribute__((always_inline)) void q8_tile(
        const uint8_t *w, int64_t rb, int64_t k, const int8_t *xq, const float *xd, const float *xs,
        int64_t g_n, const int RB, const int MB, float *res, const int H) {
    (void)H;
    (void)xs;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < MB; j++) acc[r][j] = _mm256_setzero_ps();
    int64_t g = 0;
    /* Eight groups at a time: see fma_two_blocks. */
    for (; g + 8 <= g_n; g += 8) {
        __m256 xd8[4];
#pragma GCC unroll 4
        for (int j = 0; j < MB; j++) xd8[j] = _mm256_loadu_ps(xd + j * g_n + g);
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            const uint8_t *row = w + r * rb;
            const __m256 wd8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k + 2 * g)));
            __m256 sc[4];
#pragma GCC unroll 4
            for (int j = 0; j < MB; j++) sc[j] = _mm256_mul_ps(wd8, xd8[j]);
#pragma GCC unroll 4
            for (int pp = 0; pp < 4; pp++) {
                const __m256i q0 = _mm256_loadu_si256((const __m256i *)(row + QK * (g + 2 * pp)));
                const __m256i q1 = _mm256_loadu_si256((const __m256i *)(row + QK * (g + 2 * pp + 1)));
                const __m256i a0 = _mm256_sign_epi8(q0, q0), a1 = _mm256_sign_epi8(q1, q1);
#pragma GCC unroll 4
                for (int j = 0; j < MB; j++) {
                    const int8_t *xj = xq + j * k + QK * (g + 2 * pp);
                    const __m256i i0 = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(a0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xj), q0)), ones);
                    const __m256i i1 = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(a1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xj + QK)), q1)),
                        ones);
                    acc[r][j] = fma_two_blocks(i0, i1, sc[j], pp, acc[r][j]);
                }
            }
        }
    }
    for (; g < g_n; g++) {
        __m256i x[4];
        float dx[4];
#pragma GCC unroll 4
        for (int j = 0; j < MB; j++) {
            x[j] = _mm256_loadu_si256((const __m256i *)(xq + j * k + QK * g));
            dx[j] = xd[j * g_n + g];
        }
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            const uint8_t *row = w + r * rb;
            const __m256i q = _mm256_loadu_si256((const __m256i *)(row + QK * g));
            const __m256i aq = _mm256_sign_epi8(q, q);
            const float s = ld_scale(row + k, g, 1);
#pragma GCC unroll 4
            for (int j = 0; j < MB; j++) {
                const __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(x[j], q)), ones);
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s * dx[j]), acc[r][j]);
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < MB; j++) res[r * MB + j] = hsum(acc[r][j]);
}
#else
/* Portable versions: the same sums, block by block, in plain C. */
static inline void q4_tile(const uint8_t *w, int64_t rb, int64_t k, const int8_t *xq, const float *xd,
                           const float *xs, int64_t g_n, const int RB, const int MB, float *res, const int H) {
    const int HS = H & 1, B5 = H & 2;
    for (int r = 0; r < RB; r++) {
        const uint8_t *row = w + r * rb;
        const uint8_t *wd = row + k / 2 + (B5 ? k / 8 : 0), *wm = wd + g_n * (HS ? 2 : 4);
        for (int j = 0; j < MB; j++) {
            float s = 0.0f;
            for (int64_t g = 0; g < g_n; g++) {
                const int8_t *x = xq + j * k + QK * g;
                int sum = 0;
                for (int e = 0; e < QK; e++) {
                    int q;
                    if (g_n % 2 == 1 && g == g_n - 1)
                        q = e < 16 ? row[16 * g + e] & 15 : row[16 * g + e - 16] >> 4;
                    else
                        q = g % 2 == 0 ? row[32 * (g / 2) + e] & 15 : row[32 * (g / 2) + e] >> 4;
                    if (B5) q |= ((row[k / 2 + 4 * g + e / 8] >> (e % 8)) & 1) << 4;
                    sum += q * x[e];
                }
                s += (float)sum * (ld_scale(wd, g, HS) * xd[j * g_n + g]) + ld_scale(wm, g, HS) * xs[j * g_n + g];
            }
            res[r * MB + j] = s;
        }
    }
}

static inline void q8_tile(const uint8_t *w, int64_t rb, int64_t k, const int8_t *xq, const float *xd,
                           const float *xs, int64_t g_n, const int RB, const int MB, float *res, const int H) {
    (void)xs;
    (void)H;
    for (int r = 0; r < RB; r++) {
        const uint8_t *row = w + r * rb;
        const int8_t *q = (const int8_t *)row;
        const uint8_t *wd = row + k;
        for (int j = 0; j < MB; j++) {
            float s = 0.0f;
            for (int64_t g = 0; g < g_n; g++) {
                int sum = 0;
                for (int e = 0; e < QK; e++) sum += q[QK * g + e] * xq[j * k + QK * g + e];
                s += (float)sum * (ld_scale(wd, g, 1) * xd[j * g_n + g]);
            }
            res[r * MB + j] = s;
        }
    }
}
#endif

#define RB 4   /* weight rows per tile: one activation block load serves four rows */
#ifndef M_TILE /* activation rows per tile (prefill / batched decode), <= 4: one weight unpack serves them */
#define M_TILE 4
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

/* Which tile shapes exist (each a fully unrolled instance), for scale storage H. */
#define TILE_CASES(NAME, FN, H)                                                               \
    static void NAME(int rb_n, int mb_n, const uint8_t *w, int64_t rb, int64_t k,             \
                     const int8_t *xq, const float *xd, const float *xs, int64_t g_n,         \
                     float *res) {                                                            \
        switch (rb_n * 8 + mb_n) {                                                            \
        case 4 * 8 + 1: FN(w, rb, k, xq, xd, xs, g_n, 4, 1, res, H); break;                   \
        case 4 * 8 + 2: FN(w, rb, k, xq, xd, xs, g_n, 4, 2, res, H); break;                   \
        case 4 * 8 + 3: FN(w, rb, k, xq, xd, xs, g_n, 4, 3, res, H); break;                   \
        case 4 * 8 + 4: FN(w, rb, k, xq, xd, xs, g_n, 4, 4, res, H); break;                   \
        case 1 * 8 + 1: FN(w, rb, k, xq, xd, xs, g_n, 1, 1, res, H); break;                   \
        case 1 * 8 + 2: FN(w, rb, k, xq, xd, xs, g_n, 1, 2, res, H); break;                   \
        case 1 * 8 + 3: FN(w, rb, k, xq, xd, xs, g_n, 1, 3, res, H); break;                   \
        default: FN(w, rb, k, xq, xd, xs, g_n, 1, 4, res, H); break;                          \
        }                                                                                     \
    }
TILE_CASES(q4f_dispatch, q4_tile, 0)
TILE_CASES(q4h_dispatch, q4_tile, 1)
TILE_CASES(q5h_dispatch, q4_tile, 3)
TILE_CASES(q8_dispatch, q8_tile, 1)

typedef void (*dispatch_fn)(int, int, const uint8_t *, int64_t, int64_t, const int8_t *, const float *,
                            const float *, int64_t, float *);

/* a: w, N, K, xq, xd, xs, M, n_seg, seg_end*, seg_out*, row stride of w in bytes (the packed array's own,
 * so the layout's size lives in one place: the Python packer) */
static void matmul(const int64_t *a, dispatch_fn tile) {
    const uint8_t *w = (const uint8_t *)a[0];
    const int64_t rb = a[10];
    const int64_t n = a[1], k = a[2], m_rows = a[6], g_n = k / QK;
    const int8_t *xq = (const int8_t *)a[3];
    const float *xd = (const float *)a[4], *xs = (const float *)a[5];
    const segs_t segs = {a[7], (const int64_t *)a[8], (float *const *)a[9]};
    const int64_t n_tiles = (n + RB - 1) / RB;
    const int64_t ahead = PREFETCH_BYTES / (RB * rb) + 1;
    (void)ahead;                       /* used by the SIMD build's prefetch */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n_tiles; t++) {
        const int64_t r0 = t * RB, rows = n - r0 < RB ? n - r0 : RB;
        float res[RB * M_TILE];
#if KVG_AVX2
        /* Weights stream from memory once per token: ask for the tile ~PREFETCH_BYTES ahead now (a single
         * core's hardware prefetcher alone reaches ~6 GB/s here; with this, 2 threads reach ~18 GB/s). */
        if (t + ahead < n_tiles) {
            const char *next = (const char *)(w + (r0 + ahead * RB) * rb);
            for (int64_t off = 0; off < RB * rb; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
#endif
        for (int64_t m0 = 0; m0 < m_rows; m0 += M_TILE) {
            const int mb_n = (int)(m_rows - m0 < M_TILE ? m_rows - m0 : M_TILE);
            const int8_t *xqm = xq + m0 * k;
            const float *xdm = xd + m0 * g_n, *xsm = xs + m0 * g_n;
            if (rows == RB) {
                tile(RB, mb_n, w + r0 * rb, rb, k, xqm, xdm, xsm, g_n, res);
                for (int r = 0; r < RB; r++)
                    for (int j = 0; j < mb_n; j++) *out_at(&segs, r0 + r, m0 + j) = res[r * mb_n + j];
            } else {
                for (int64_t r = 0; r < rows; r++) {
                    tile(1, mb_n, w + (r0 + r) * rb, rb, k, xqm, xdm, xsm, g_n, res);
                    for (int j = 0; j < mb_n; j++) *out_at(&segs, r0 + r, m0 + j) = res[j];
                }
            }
        }
    }
}

void kvg_matmul_q4(const int64_t *a) { matmul(a, q4f_dispatch); }
void kvg_matmul_q4h(const int64_t *a) { matmul(a, q4h_dispatch); }
void kvg_matmul_q5h(const int64_t *a) { matmul(a, q5h_dispatch); }
void kvg_matmul_q8(const int64_t *a) { matmul(a, q8_dispatch); }

/* ---- elementwise and attention kernels (single-threaded unless noted: their work is microseconds) --------- */
static inline float dotf(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* a: x, M, K, ldx, w (0: none), eps (f64 bits), out, ldo:  out = x / sqrt(mean(x^2) + eps) * w */
void kvg_rms_norm(const int64_t *a) {
    const float *x = (const float *)a[0], *w = (const float *)a[4];
    const int64_t m_rows = a[1], k = a[2], ldx = a[3], ldo = a[7];
    const float eps = f_arg(a[5]);
    float *out = (float *)a[6];
    for (int64_t m = 0; m < m_rows; m++) {
        const float *xr = x + m * ldx;
        float *o = out + m * ldo;
        const float r = 1.0f / sqrtf(dotf(xr, xr, k) / (float)k + eps);
        if (w) {
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[i] = xr[i] * r * w[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[i] = xr[i] * r;
        }
    }
}

#if KVG_AVX2
/* exp(x) for 8 floats (Cephes' polynomial, relative error ~2e-7; inputs clamped to +-88). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* a: gate, up, out, n, kind (0: silu, 1: gelu tanh):  out = act(gate) * up, all contiguous */
void kvg_gated(const int64_t *a) {
    const float *g = (const float *)a[0], *u = (const float *)a[1];
    float *o = (float *)a[2];
    const int64_t n = a[3], kind = a[4];
    int64_t i = 0;
#if KVG_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        __m256 act;
        if (kind == 0) {       /* x / (1 + e^-x) */
            act = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        } else {               /* 0.5 x (1 + tanh(z)) = x / (1 + e^-2z), z = sqrt(2/pi) (x + 0.044715 x^3) */
            const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f),
                                           _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x),
                                                           _mm256_mul_ps(x, x), x));
            act = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), z))));
        }
        _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) {
        const float x = g[i];
        const float act = kind == 0 ? x / (1.0f + expf(-x))
                                    : 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
        o[i] = act * u[i];
    }
}

/* a: x, n, H, d, xs0, xs1, out, os0, os1, n_dims, pos (int32 [n]), inv_freq (float [n_dims/2]), neox
 * Rotary embedding per token and head; dims past n_dims are copied. */
void kvg_rope(const int64_t *a) {
    const float *x = (const float *)a[0], *inv = (const float *)a[11];
    const int64_t n = a[1], nh = a[2], d = a[3], xs0 = a[4], xs1 = a[5], os0 = a[7], os1 = a[8], nd = a[9];
    const int32_t *pos = (const int32_t *)a[10];
    const int neox = (int)a[12];
    float *out = (float *)a[6];
    float cs[512], sn[512];                  /* n_dims / 2 <= 512: checked when the kernel is bound */
    for (int64_t t = 0; t < n; t++) {
        for (int64_t i = 0; i < nd / 2; i++) {
            const float th = (float)pos[t] * inv[i];
            cs[i] = cosf(th);
            sn[i] = sinf(th);
        }
        for (int64_t h = 0; h < nh; h++) {
            const float *xi = x + t * xs0 + h * xs1;
            float *o = out + t * os0 + h * os1;
            for (int64_t i = 0; i < nd / 2; i++) {
                const int64_t i0 = neox ? i : 2 * i, i1 = neox ? i + nd / 2 : 2 * i + 1;
                const float x0 = xi[i0], x1 = xi[i1];
                o[i0] = x0 * cs[i] - x1 * sn[i];
                o[i1] = x0 * sn[i] + x1 * cs[i];
            }
            for (int64_t i = nd; i < d; i++) o[i] = xi[i];
        }
    }
}

/* Indexing kernels never touch memory outside their table: an index out of range skips its row (a
 * gathered row reads as zeros) and is counted here; kvg_run returns the count and the Python binding turns
 * it into an error, so a bad id is refused, never read. The engine checks every id before a step, so this
 * is the second line of defence, not the first. */
static __thread int64_t bad_indices;   /* per calling thread: the indexing kernels run on the caller's */

int64_t kvg_take_bad_indices(void) {
    const int64_t n = bad_indices;
    bad_indices = 0;
    return n;
}

static inline int in_range(int32_t i, int64_t n) {
    if (i >= 0 && (int64_t)i < n) return 1;
    bad_indices++;
    return 0;
}

/* a: dst, dst_s0, dst_s1, src, n, width, src_s0, idx (int32 [n]), n_dst (rows idx may name):
 * dst[idx[i] * dst_s0 + j * dst_s1] = src[i * src_s0 + j]  (dst_s1 = 1: rows; dst_s0 = 1: columns) */
void kvg_set_rows(const int64_t *a) {
    float *dst = (float *)a[0];
    const float *src = (const float *)a[3];
    const int64_t s0 = a[1], s1 = a[2], n = a[4], width = a[5], ss0 = a[6], n_dst = a[8];
    const int32_t *idx = (const int32_t *)a[7];
    for (int64_t i = 0; i < n; i++) {
        if (!in_range(idx[i], n_dst)) continue;
        float *o = dst + (int64_t)idx[i] * s0;
        const float *v = src + i * ss0;
        if (s1 == 1)
            memcpy(o, v, (size_t)width * sizeof(float));
        else
            for (int64_t j = 0; j < width; j++) o[j * s1] = v[j];
    }
}

/* a: q, n, H, d, qs0, qs1,  k, n_kv, Hkv, ks0, ks1,  v, dv, vs0, vs1, vs2,  mask, ms0,  scale (f64 bits),
 *    out, os0, os1
 * out[t, h] = softmax(q[t, h] . k[:, h / (H / Hkv)] * scale + mask[t]) @ v[:, h / (H / Hkv)]
 * Cells are taken in chunks: a chunk's scores, its maximum, their exponentials (vectorized) and its share
 * of the weighted V sum, with the running sum rescaled when the maximum grows (online softmax), so no
 * buffer grows with the context. Cells whose mask is -inf are skipped, so a padded KV window costs only
 * its valid cells. v element (cell c, head j, dim e) is at c*vs0 + j*vs1 + e*vs2. (token, head) pairs are
 * split across threads. */
#define ATTN_CHUNK 128
#ifndef ATTN_PARALLEL_MIN
#define ATTN_PARALLEL_MIN 100000000
#endif
void kvg_attention(const int64_t *a) {
    const float *q = (const float *)a[0], *k = (const float *)a[6], *v = (const float *)a[11];
    const float *mask = (const float *)a[16];
    const int64_t n = a[1], nh = a[2], d = a[3], qs0 = a[4], qs1 = a[5];
    const int64_t n_kv = a[7], nhkv = a[8], ks0 = a[9], ks1 = a[10];
    const int64_t dv = a[12], vs0 = a[13], vs1 = a[14], vs2 = a[15], ms0 = a[17];
    const float scale = f_arg(a[18]);
    float *out = (float *)a[19];
    const int64_t os0 = a[20], os1 = a[21], group = nh / nhkv;
#pragma omp parallel for schedule(static) if (n * nh > 1 && n * n_kv * nh * d >= ATTN_PARALLEL_MIN)
    for (int64_t th = 0; th < n * nh; th++) {
        const int64_t t = th / nh, h = th % nh, j = h / group;
        const float *qi = q + t * qs0 + h * qs1, *mrow = mask + t * ms0;
        float acc[1024];                      /* dv <= 1024: checked when the kernel is bound */
        float s[ATTN_CHUNK];
        int32_t cell[ATTN_CHUNK];
        for (int64_t e = 0; e < dv; e++) acc[e] = 0.0f;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t c0 = 0; c0 < n_kv; c0 += ATTN_CHUNK) {
            const int64_t c1 = c0 + ATTN_CHUNK < n_kv ? c0 + ATTN_CHUNK : n_kv;
            int nc = 0;
            float cmx = -INFINITY;
            for (int64_t c = c0; c < c1; c++) {
                if (mrow[c] == -INFINITY) continue;
                const float sc = dotf(qi, k + c * ks0 + j * ks1, d) * scale + mrow[c];
                cmx = sc > cmx ? sc : cmx;
                s[nc] = sc;
                cell[nc++] = (int32_t)(c - c0);
            }
            if (nc == 0) continue;
            if (cmx > mx) {                   /* rescale what is summed so far to the new maximum */
                const float r = expf(mx - cmx);     /* 0 on the first valid chunk */
                sum *= r;
                for (int64_t e = 0; e < dv; e++) acc[e] *= r;
                mx = cmx;
            }
            int i = 0;
#if KVG_AVX2
            const __m256 vmx = _mm256_set1_ps(mx);
            for (; i + 8 <= nc; i += 8) _mm256_storeu_ps(s + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmx)));
#endif
            for (; i < nc; i++) s[i] = expf(s[i] - mx);
            for (i = 0; i < nc; i++) {
                const float p = s[i];
                const float *vc = v + (c0 + cell[i]) * vs0 + j * vs1;
                sum += p;
                if (vs2 == 1) {
#pragma omp simd
                    for (int64_t e = 0; e < dv; e++) acc[e] += p * vc[e];
                } else {
                    for (int64_t e = 0; e < dv; e++) acc[e] += p * vc[e * vs2];
                }
            }
        }
        float *o = out + t * os0 + h * os1;
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t e = 0; e < dv; e++) o[e] = acc[e] * inv;
    }
}

/* a: x, y, out, n:  out = x + y (contiguous, same length) */
void kvg_add(const int64_t *a) {
    const float *x = (const float *)a[0], *y = (const float *)a[1];
    float *o = (float *)a[2];
    const int64_t n = a[3];
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = x[i] + y[i];
}

/* a: raw Q8_0 rows (uint8, row_bytes apart), row_bytes, ids (int32 [n]), n, K, out (float [n, K]), n_rows:
 * the embedding rows of this ubatch's tokens, dequantized exactly as gguf does (float(d) * q). */
void kvg_get_rows_q8_0(const int64_t *a) {
    const uint8_t *raw = (const uint8_t *)a[0];
    const int64_t rb = a[1], n = a[3], k = a[4], n_rows = a[6];
    const int32_t *ids = (const int32_t *)a[2];
    float *out = (float *)a[5];
    for (int64_t i = 0; i < n; i++) {
        if (!in_range(ids[i], n_rows)) {
            memset(out + i * k, 0, (size_t)k * sizeof(float));
            continue;
        }
        const uint8_t *row = raw + (int64_t)ids[i] * rb;
        for (int64_t g = 0; g < k / QK; g++) {
            const uint8_t *blk = row + g * 34;
            const float d = h2f((uint16_t)(blk[0] | blk[1] << 8));
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int e = 0; e < QK; e++) out[i * k + g * QK + e] = d * (float)q[e];
        }
    }
}

/* A whole run of kernels in one call: list holds (function, argument slots) pairs. A compiled Program's
 * consecutive native kernels become one such call, so replaying a cached decode step crosses from Python
 * into C a handful of times instead of once per op. */
typedef void (*kernel_fn)(const int64_t *);
int64_t kvg_run(const int64_t *list, int64_t n) {
    for (int64_t i = 0; i < n; i++) ((kernel_fn)list[2 * i])((const int64_t *)list[2 * i + 1]);
    return kvg_take_bad_indices();   /* out-of-range indices met on the way (see in_range) */
}

/* a: x, w, out, M, K:  out[m, k] = x[m, k] * w[k]  (w 0: out = x * s, with s in a[5] as f64 bits) */
void kvg_mul_rows(const int64_t *a) {
    const float *x = (const float *)a[0], *w = (const float *)a[1];
    float *o = (float *)a[2];
    const int64_t m_rows = a[3], k = a[4];
    const float s = f_arg(a[5]);
    for (int64_t m = 0; m < m_rows; m++) {
        if (w) {
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[m * k + i] = x[m * k + i] * w[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[m * k + i] = x[m * k + i] * s;
        }
    }
}
