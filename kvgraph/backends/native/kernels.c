/* kvgraph native kernels: the hot loops of a decode step, compiled on first use (see native/__init__.py).
 *
 * Why C: at batch size 1 a token is ~600 small ops. torch's int4 matvec dequantizes every weight to float
 * and its per-op dispatch costs microseconds, so a SmolLM2 token took ~28 ms where llama.cpp needs ~10.
 * These kernels do what ggml does on the CPU -- activations quantized to int8 in blocks of 32, weights
 * kept 4- or 8-bit, integer dot products (AVX-512 VNNI dpbusd, AVX2 maddubs) scaled once per block -- over a layout repacked
 * at load for streaming, and each op is one call with no allocation.
 *
 * Every kernel takes one argument, `const int64_t *a`: its parameters as 64-bit slots (pointers, sizes, and
 * floats stored as their float64 bit pattern), built once when a Program is compiled. A call from Python
 * then converts a single pointer. Matmuls and attention split their work into items (tiles, attention
 * tasks) that the threads of kvgraph's own pool claim (see parallel_for); each item is computed whole by
 * one thread, so results do not depend on timing or on which thread ran what: a replayed Program is
 * bit-identical to a freshly compiled one, on any number of threads.
 *
 * Instruction sets: the same source is built three times -- AVX-512 (F/BW/VL/VNNI), AVX2 (+FMA, F16C) and
 * portable C -- and native/__init__.py loads the best one the CPU runs (KVGRAPH_ISA forces one). kvg_simd()
 * says which this build is.
 *
 * Weight layouts: tiles of 16 output rows (N is padded to a multiple of 16 with zero rows). A tile holds,
 * group by group (G = K / 32 groups of 32 weights per row), one record: eight "chunk vectors" of 64 bytes,
 * chunk vector c holding weights 4c..4c+3 of each row i at bytes 4i..4i+3, then the group's scales for the
 * 16 rows. Per record:
 *   Q4 ("q4h" / "q4", from Q4_0 / Q4_1 / Q4_K, exact):  w = q * d + m,  q in [0, 15]
 *       256 bytes: block c (c < 4) = chunk vector c in the low nibbles, chunk vector c + 4 in the high;
 *       then d[16], m[16] as float16 ("q4h": when every value is exactly a float16, as Q4_0 / Q4_1's are;
 *       320 bytes, the file's size) or float32 ("q4": Q4_K's d * sc products; 384 bytes).
 *   Q5 ("q5h", from Q5_0 / Q5_1, exact):  Q4's 256 bytes of low four bits, then 8 words of 64 bits (word c:
 *       bit b = fifth bit of byte b of chunk vector c), then float16 d[16] and m[16] (384 bytes).
 *   Q8 (from Q8_0 exact, other types re-quantized per block):  w = q * d, the eight chunk vectors as int8
 *       (512 bytes), then float16 d[16] (544 bytes).
 *   K-quants, the file's own numbers: super-blocks of 8 groups, each a header of float16 scales for the 16
 *   rows, then its 8 records.
 *     "q4k" (Q4_K):  w = (d sc) q - dmin mn.  Header d[16], dmin[16]; record: Q4's 256 bytes of nibbles, then
 *       uint8 sc[16] and mn[16] (288 bytes).
 *     "q5k" (Q5_K):  the same with Q5's fifth-bit plane after the nibbles (352 bytes).
 *     "q6k" (Q6_K):  w = (d sc) (q - 32), q in [0, 63], sc int8 per 16 weights.  Header d[16]; record: the
 *       low four bits as Q4's nibbles, then two 64-byte planes of the two high bits (plane p, bits 2i..2i+1 of
 *       byte b: chunk vector 4p + i), then int8 sc[16] of weights 0-15 and sc[16] of 16-31 (416 bytes).
 * Activations (quantize_q8): per block of 32, d = max|x| / 127, q = round(x / d), s = d * sum(q), and the
 * integer sums of q over each half block (h).
 */
#define _GNU_SOURCE               /* syscall, clock_gettime */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVG_AVX2 1
#else
#define KVG_AVX2 0
#endif
#if KVG_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define KVG_AVX512 1
#else
#define KVG_AVX512 0
#endif

#define QK 32

static inline float f_arg(int64_t bits) {
    double d;
    memcpy(&d, &bits, sizeof d);
    return (float)d;
}

int kvg_simd(void) { return KVG_AVX512 ? 2 : KVG_AVX2; }   /* 2: AVX-512, 1: AVX2, 0: portable */

/* ---- the thread pool -----------------------------------------------------------------------------------
 * parallel_for(n, min_chunk, fn, ctx) runs fn(ctx, i0, i1) over [0, n) on the calling thread and the pool's
 * workers, and returns when all of it is done. The work is cut into chunks and each thread owns an equal
 * run of them, which it takes front to back: every call gives a thread the same rows, so a thread's weight
 * tiles stay in its core's caches from one token to the next, as with a static schedule. A thread that has
 * finished its own run takes the others' chunks from their back ends. So a thread that is not running (the
 * machine is busy: another process, the server's own threads) holds up nothing but the chunk it is in, and
 * a worker that wakes after the work is gone goes back to wait without being waited for (an OpenMP team
 * waits for every thread at every barrier). Idle workers spin for SPIN_NS, then sleep on a futex, so a busy
 * machine's other work gets their cores; the caller waits for the last chunks the same way. One job at a
 * time: a second caller (another Python thread) runs its job on its own thread, with the same results. A job
 * never needs a worker to finish (the caller alone can take every chunk), so missing workers (a forked child
 * has none) only make it slower. */
#define MAX_THREADS 256
#define SPIN_NS 100000            /* 0.1 ms: the gaps between a decode step's kernels are far shorter */
#define CHUNKS_PER_THREAD 4        /* each thread's run: finer chunks share out a slow thread's rest more finely
                                     but cost claims (2-4 measured best, quiet and beside a busy process per core;
                                     16-64 lost 10-25% there) */

typedef void (*range_fn)(void *ctx, int64_t i0, int64_t i1);
typedef struct { range_fn fn; void *ctx; int64_t n, chunk, n_chunks; _Atomic uint32_t done; } job_t;

/* A thread's run of chunks, one word: job id (24 bits) | front (20) | back (20); the owner takes the front
 * chunk, others the back one, while front < back. The id makes a late thread's claim on an old job fail. */
#define RUN(id, f, b) ((uint64_t)(id) << 40 | (uint64_t)(f) << 20 | (uint64_t)(b))
#define RUN_ID(r) ((r) >> 40)
#define RUN_FRONT(r) (((r) >> 20) & 0xFFFFF)
#define RUN_BACK(r) ((r) & 0xFFFFF)
typedef struct { _Alignas(64) _Atomic uint64_t w; } run_t;

static struct {
    run_t run[MAX_THREADS];         /* thread t's run: t = 0 the caller, t = i + 1 worker i */
    _Alignas(64) _Atomic uint32_t seq;   /* futex word: bumped for every job */
    _Atomic uint32_t park;          /* futex word of the workers a smaller thread count leaves out */
    _Atomic int sleepers;           /* workers asleep on seq */
    _Atomic int caller_sleeping;
    _Atomic uint64_t job;           /* the current job's id */
    _Atomic int n_threads;          /* threads a job uses, the caller included */
    int n_started;
    job_t jobs[2];                  /* job id's fields in jobs[id & 1]: stable until it is done */
    pthread_mutex_t busy;           /* held by the one caller whose job the pool runs */
} pool = {.n_threads = 1, .busy = PTHREAD_MUTEX_INITIALIZER};

static inline void cpu_relax(void) {
#if KVG_AVX2
    _mm_pause();
#endif
}

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void wait_while(_Atomic uint32_t *w, uint32_t v) {     /* sleep until *w != v (may wake early) */
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
#else
    (void)w, (void)v;
    usleep(50);
#endif
}

static void wake_all(_Atomic uint32_t *w) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)w;
#endif
}

/* Spin up to SPIN_NS while *w == v; 1 if it changed. */
static int spin_while(_Atomic uint32_t *w, uint32_t v) {
    int64_t t0 = 0;
    for (int i = 1;; i++) {
        if (atomic_load(w) != v) return 1;
        cpu_relax();
        if (i % 64 == 0) {
            const int64_t t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 > SPIN_NS) return 0;
        }
    }
}

/* One chunk of run r of job id, its front one for the owner, else its back one; -1 when none is left. */
static int64_t take(int r, uint64_t id, int owner) {
    uint64_t w = atomic_load(&pool.run[r].w);
    for (;;) {
        const uint64_t f = RUN_FRONT(w), b = RUN_BACK(w);
        if (RUN_ID(w) != (id & 0xFFFFFF) || f >= b) return -1;
        if (atomic_compare_exchange_weak(&pool.run[r].w, &w, owner ? RUN(id & 0xFFFFFF, f + 1, b)
                                                                   : RUN(id & 0xFFFFFF, f, b - 1)))
            return (int64_t)(owner ? f : b - 1);
    }
}

/* Thread t's share of job id: its own run, then what is left of the others'. */
static void work(uint64_t id, int t) {
    const int nt = atomic_load(&pool.n_threads);
    job_t *j = &pool.jobs[id & 1];
    uint32_t mine = 0;
    for (int k = 0; k < nt; k++) {
        const int r = (t + k) % nt;
        for (int64_t c; (c = take(r, id, k == 0)) >= 0; mine++) {
            const int64_t i0 = c * j->chunk, i1 = i0 + j->chunk < j->n ? i0 + j->chunk : j->n;
            j->fn(j->ctx, i0, i1);        /* a chunk of job id is ours: its fields stay until we are done */
        }
    }
    if (!mine)
        return;
    const uint32_t total = (uint32_t)j->n_chunks;         /* read while the job cannot be done: ours are not */
    if (atomic_fetch_add(&j->done, mine) + mine == total && atomic_load(&pool.caller_sleeping)) wake_all(&j->done);
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;            /* workers 0 .. n_threads - 2 take part */
    uint32_t seen = atomic_load(&pool.seq);
    for (;;) {
        const uint32_t parked = atomic_load(&pool.park);
        if (index >= atomic_load(&pool.n_threads) - 1) {     /* left out: sleep until the count changes */
            wait_while(&pool.park, parked);
            seen = atomic_load(&pool.seq);
            continue;
        }
        if (!spin_while(&pool.seq, seen)) {
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.seq) == seen) wait_while(&pool.seq, seen);
            atomic_fetch_sub(&pool.sleepers, 1);
        }
        seen = atomic_load(&pool.seq);
        work(atomic_load(&pool.job), index + 1);
    }
    return NULL;
}

int kvg_threads(void) { return atomic_load(&pool.n_threads); }

void kvg_set_threads(int64_t n) {
    n = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
    pthread_mutex_lock(&pool.busy);
    for (; pool.n_started < n - 1; pool.n_started++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&t, &attr, worker, (void *)(intptr_t)pool.n_started) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;                              /* fewer threads: the same results, slower */
    }
    atomic_store(&pool.n_threads, (int)(n < pool.n_started + 1 ? n : pool.n_started + 1));
    atomic_fetch_add(&pool.park, 1);
    wake_all(&pool.park);
    pthread_mutex_unlock(&pool.busy);
}

static void parallel_for(int64_t n, int64_t min_chunk, range_fn fn, void *ctx) {
    const int nt = atomic_load(&pool.n_threads);
    int64_t chunk = n / ((int64_t)CHUNKS_PER_THREAD * nt);
    chunk = chunk < min_chunk ? min_chunk : chunk < 1 ? 1 : chunk;
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    if (nt <= 1 || n_chunks <= 1 || n_chunks > 0xFFFFF || pthread_mutex_trylock(&pool.busy) != 0) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
    const uint64_t id = atomic_load(&pool.job) + 1;
    job_t *j = &pool.jobs[id & 1];
    j->fn = fn, j->ctx = ctx, j->n = n, j->chunk = chunk, j->n_chunks = n_chunks;
    atomic_store(&j->done, 0);
    for (int t = 0; t < nt; t++)                     /* thread t owns chunks [n_chunks t / nt, n_chunks (t+1) / nt) */
        atomic_store(&pool.run[t].w, RUN(id & 0xFFFFFF, n_chunks * t / nt, n_chunks * (t + 1) / nt));
    atomic_store(&pool.job, id);
    atomic_fetch_add(&pool.seq, 1);
    if (atomic_load(&pool.sleepers)) wake_all(&pool.seq);
    work(id, 0);
    uint32_t d;
    while ((d = atomic_load(&j->done)) != (uint32_t)n_chunks) {
        if (spin_while(&j->done, d)) continue;
        atomic_store(&pool.caller_sleeping, 1);
        if (atomic_load(&j->done) == d) wait_while(&j->done, d);
        atomic_store(&pool.caller_sleeping, 0);
    }
    pthread_mutex_unlock(&pool.busy);
}

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

static inline uint16_t f2h(float f) {          /* float -> IEEE half, round to nearest even (as numpy, F16C) */
#if KVG_AVX2
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);   /* inf, nan */
    if (ax >= 0x477ff000u) return sign | 0x7c00;                                    /* rounds past 65504 */
    if (ax < 0x38800000u) {                                                         /* a half subnormal */
        float a;
        memcpy(&a, &ax, 4);
        return sign | (uint16_t)nearbyintf(a * 16777216.0f);
    }
    uint32_t m = ax - 0x38000000u;                                                  /* rebias 127 -> 15 */
    m += 0xfffu + ((m >> 13) & 1u);
    return sign | (uint16_t)(m >> 13);
#endif
}

/* ---- activations -------------------------------------------------------------------------------------- */
/* a: x, M, K, ldx (floats), xq (int8 [M, K]), xd (float [M, G]), xs (float [M, G]), xh (int32 [M, 2G]) */
void kvg_quantize_q8(const int64_t *a) {
    const float *x = (const float *)a[0];
    const int64_t m_rows = a[1], k = a[2], ldx = a[3], g_n = k / QK;
    int8_t *xq = (int8_t *)a[4];
    float *xd = (float *)a[5], *xs = (float *)a[6];
    int32_t *xh = (int32_t *)a[7];
    for (int64_t m = 0; m < m_rows; m++) {
        const float *xr = x + m * ldx;
        for (int64_t g = 0; g < g_n; g++) {
            const float *v = xr + g * QK;
            int8_t *q = xq + m * k + g * QK;
#if KVG_AVX512
            /* the same values as the scalar loop below: |x| max, x * (127 / max) rounded half to even */
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
            const __m512 vid = _mm512_set1_ps(id);
            const __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(i0));          /* |q| <= 127: exact */
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(i1));
            const int32_t h0 = _mm512_reduce_add_epi32(i0), h1 = _mm512_reduce_add_epi32(i1);
            xd[m * g_n + g] = d;
            xh[m * 2 * g_n + 2 * g] = h0;
            xh[m * 2 * g_n + 2 * g + 1] = h1;
            xs[m * g_n + g] = d * (float)(h0 + h1);
#elif KVG_AVX2
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
            /* the two half sums (elements 0-15, 16-31): lanes 0-3 and 4-7 of lo + hi */
            __m256i sum = _mm256_hadd_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            sum = _mm256_hadd_epi32(sum, sum);
            const int32_t h0 = _mm256_extract_epi32(sum, 0) + _mm256_extract_epi32(sum, 4);
            const int32_t h1 = _mm256_extract_epi32(sum, 1) + _mm256_extract_epi32(sum, 5);
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)q, p);
            xd[m * g_n + g] = d;
            xh[m * 2 * g_n + 2 * g] = h0;
            xh[m * 2 * g_n + 2 * g + 1] = h1;
            xs[m * g_n + g] = d * (float)(h0 + h1);
#else
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
            int sum[2] = {0, 0};
            for (int j = 0; j < QK; j++) {
                q[j] = (int8_t)nearbyintf(v[j] * id);
                sum[j / 16] += q[j];
            }
            xd[m * g_n + g] = d;
            xh[m * 2 * g_n + 2 * g] = sum[0];
            xh[m * 2 * g_n + 2 * g + 1] = sum[1];
            xs[m * g_n + g] = d * (float)(sum[0] + sum[1]);
#endif
        }
    }
}

/* ---- matmul: y[m, n] = sum_k x[m, k] w[n, k] ------------------------------------------------------------ */
/* Weights are stored in tiles of TR = 16 output rows (layout in the header comment): a 64-byte "chunk
 * vector" holds four consecutive weights of each of the 16 rows, so one integer dot instruction
 * (AVX-512 VNNI dpbusd, or AVX2 maddubs + madd) against four activation bytes broadcast to every lane
 * advances all 16 rows at once, with no horizontal sums and one scale multiply per block for all rows.
 * Output rows may be split into segments written to different buffers (a fused q/k/v matmul writes each
 * member's columns straight into that member's output); segments hold whole tiles. */
#define TR 16
enum { F_Q4H, F_Q4F, F_Q5H, F_Q8, F_Q4K, F_Q5K, F_Q6K };
/* Bytes per group record (32 weights of each of the tile's 16 rows). K-quant records come eight to a
 * super-block, after a header holding the super-block's float16 scales for the 16 rows. */
#define REC(F) ((F) == F_Q4H ? 320 : (F) == F_Q4F ? 384 : (F) == F_Q5H ? 384 : (F) == F_Q8 ? 544 \
                : (F) == F_Q4K ? 288 : (F) == F_Q5K ? 352 : 416)
#define HDR(F) ((F) == F_Q4K || (F) == F_Q5K ? 64 : (F) == F_Q6K ? 32 : 0)
#define FIFTH(F) ((F) == F_Q5H || (F) == F_Q5K)         /* a plane of fifth bits at byte 256 */
#define KQ(F) (HDR(F) != 0)
#define DOFF(F) ((F) == F_Q5H ? 320 : (F) == F_Q8 ? 512 : 256)   /* d[16] (Q4K / Q5K: sc[16], then mn[16]) */
#define MOFF(F) (DOFF(F) + ((F) == F_Q4F ? 64 : 32))
#define KSC(F) ((F) == F_Q5K ? 320 : 256)                /* Q4K / Q5K: where sc[16] (u8) starts; mn[16] follows */

static inline const uint8_t *hdr_at(const uint8_t *t, int64_t g, const int F) {
    return t + (g >> 3) * (HDR(F) + 8 * REC(F));
}

static inline const uint8_t *rec_at(const uint8_t *t, int64_t g, const int F) {
    return KQ(F) ? hdr_at(t, g, F) + HDR(F) + (g & 7) * REC(F) : t + g * REC(F);
}

#ifndef M_TILE /* activation rows per pass over a tile (prefill / batched decode), <= 4 */
#define M_TILE 4
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

static inline float ld_f16(const uint8_t *p, int i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return h2f(h);
}

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* tile_dot: one tile against MB activation rows, res[j * 16 + r] = dot(row r, activation j). xh: each
 * activation block's half sums (int32 [M, 2G]: elements 0-15, 16-31), for the offsets that integer dots
 * with unsigned weights leave (Q8's +128, Q6_K's -32). */
#if KVG_AVX512
static inline __m512 cvt_u8(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline __m512 cvt_i8(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline __m512 cvt_h16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* Q6_K's two high bits of chunk vector c (c < 4 in H0, the rest in H1, two bits each) at bits 4-5 */
static inline __m512i q6_high(__m512i h, int c) {
    const __m512i m = _mm512_set1_epi8(0x30);
    switch (c & 3) {
    case 0: return _mm512_and_si512(_mm512_slli_epi16(h, 4), m);
    case 1: return _mm512_and_si512(_mm512_slli_epi16(h, 2), m);
    case 2: return _mm512_and_si512(h, m);
    default: return _mm512_and_si512(_mm512_srli_epi16(h, 2), m);
    }
}

static inline __attribute__((always_inline)) void tile_dot(
        const uint8_t *t, int64_t g_n, const int8_t *xq, int64_t k, const float *xd, const float *xs,
        const int32_t *xh, const int F, const int MB, float *res) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80), b16 = _mm512_set1_epi8(16);
    __m512 acc[4], sd = _mm512_setzero_ps(), smin = _mm512_setzero_ps();
    for (int j = 0; j < MB; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < g_n; g++) {
        const uint8_t *r = rec_at(t, g, F);
        for (int off = 0; off < REC(F); off += 64) _mm_prefetch((const char *)(r + PREFETCH_BYTES + off), _MM_HINT_T0);
        if (KQ(F) && (g & 7) == 0) {     /* a new super-block: its scales for the 16 rows */
            sd = cvt_h16(hdr_at(t, g, F));
            if (F != F_Q6K) smin = cvt_h16(hdr_at(t, g, F) + 32);
        }
        __m512i v[8];
        if (F == F_Q8) {          /* int8 weights made unsigned (+128); the 128 * sum(x) this adds is taken back */
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) v[c] = _mm512_xor_si512(_mm512_loadu_si512(r + 64 * c), flip);
        } else {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m512i l = _mm512_loadu_si512(r + 64 * c);
                v[c] = _mm512_and_si512(l, m4);
                v[c + 4] = _mm512_and_si512(_mm512_srli_epi16(l, 4), m4);
            }
            if (FIFTH(F)) {
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++) {
                    uint64_t bits;
                    memcpy(&bits, r + 256 + 8 * c, 8);
                    v[c] = _mm512_mask_add_epi8(v[c], _cvtu64_mask64(bits), v[c], b16);
                }
            }
            if (F == F_Q6K) {
                const __m512i h0 = _mm512_loadu_si512(r + 256), h1 = _mm512_loadu_si512(r + 320);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    v[c] = _mm512_or_si512(v[c], q6_high(h0, c));
                    v[c + 4] = _mm512_or_si512(v[c + 4], q6_high(h1, c));
                }
            }
        }
        __m512 d16, m16 = _mm512_setzero_ps(), e16 = _mm512_setzero_ps();
        if (F == F_Q4F) {
            d16 = _mm512_loadu_ps(r + DOFF(F));
            m16 = _mm512_loadu_ps(r + MOFF(F));
        } else if (F == F_Q4K || F == F_Q5K) {        /* d * sc and -(dmin * mn), as gguf computes them */
            d16 = _mm512_mul_ps(sd, cvt_u8(r + KSC(F)));
            m16 = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(smin, cvt_u8(r + KSC(F) + 16)));
        } else if (F == F_Q6K) {                      /* d * sc of the group's two sub-blocks of 16 */
            d16 = _mm512_mul_ps(sd, cvt_i8(r + 384));
            e16 = _mm512_mul_ps(sd, cvt_i8(r + 400));
        } else {
            d16 = cvt_h16(r + DOFF(F));
            if (F != F_Q8) m16 = cvt_h16(r + MOFF(F));
        }
#pragma GCC unroll 4
        for (int j = 0; j < MB; j++) {
            const int8_t *x = xq + j * k + QK * g;
            const int32_t h0 = xh[j * 2 * g_n + 2 * g], h1 = xh[j * 2 * g_n + 2 * g + 1];
            const __m512 xdj = _mm512_set1_ps(xd[j * g_n + g]);
            if (F == F_Q6K) {     /* q in [0, 63], w = d sc (q - 32): each half's 32 * sum(x) taken back */
                __m512i s0 = _mm512_set1_epi32(-32 * h0), s1 = _mm512_set1_epi32(-32 * h1);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    s0 = _mm512_dpbusd_epi32(s0, v[c], _mm512_set1_epi32(ld32(x + 4 * c)));
                    s1 = _mm512_dpbusd_epi32(s1, v[c + 4], _mm512_set1_epi32(ld32(x + 16 + 4 * c)));
                }
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d16, xdj), acc[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(e16, xdj), acc[j]);
                continue;
            }
            __m512i s0 = F == F_Q8 ? _mm512_set1_epi32(-128 * (h0 + h1)) : _mm512_setzero_si512();
            __m512i s1 = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int c = 0; c < 8; c += 2) {
                s0 = _mm512_dpbusd_epi32(s0, v[c], _mm512_set1_epi32(ld32(x + 4 * c)));
                s1 = _mm512_dpbusd_epi32(s1, v[c + 1], _mm512_set1_epi32(ld32(x + 4 * c + 4)));
            }
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(d16, xdj), acc[j]);
            if (F != F_Q8) acc[j] = _mm512_fmadd_ps(m16, _mm512_set1_ps(xs[j * g_n + g]), acc[j]);
        }
    }
    for (int j = 0; j < MB; j++) _mm512_storeu_ps(res + TR * j, acc[j]);
}
#elif KVG_AVX2
static inline __m256i fifth_bits(const uint8_t *p) {
    /* 32 bits (bit b: byte b) as bytes 0x10 / 0 (ggml's bytes_from_bits_32) */
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i b = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(ld32(p)), shuf),
                                      _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

static inline __m256i q6_high(__m256i h, int c) {
    const __m256i m = _mm256_set1_epi8(0x30);
    switch (c & 3) {
    case 0: return _mm256_and_si256(_mm256_slli_epi16(h, 4), m);
    case 1: return _mm256_and_si256(_mm256_slli_epi16(h, 2), m);
    case 2: return _mm256_and_si256(h, m);
    default: return _mm256_and_si256(_mm256_srli_epi16(h, 2), m);
    }
}

static inline __m256 cvt_u8x8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline __m256 cvt_i8x8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline __m256 cvt_h8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* maddubs of n consecutive chunk vectors from c0 against their activation bytes, summed as int16 (the
 * caller keeps n within int16: Q4 eight deep, Q5 four, Q6 two) and widened to int32 */
static inline __attribute__((always_inline)) __m256i dot_chunks(const __m256i *v, const int8_t *x, int c0, int n) {
    __m256i p = _mm256_maddubs_epi16(v[c0], _mm256_set1_epi32(ld32(x + 4 * c0)));
    for (int c = c0 + 1; c < c0 + n; c++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(v[c], _mm256_set1_epi32(ld32(x + 4 * c))));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* The same layout eight rows at a time (the two 32-byte halves of every chunk vector). maddubs leaves
 * int16 pairs, summed as deep as their range allows before widening; Q8 uses the sign trick. */
static inline __attribute__((always_inline)) void tile_dot(
        const uint8_t *t, int64_t g_n, const int8_t *xq, int64_t k, const float *xd, const float *xs,
        const int32_t *xh, const int F, const int MB, float *res) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[2][4], sd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, smin[2] = {sd[0], sd[0]};
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < MB; j++) acc[h][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < g_n; g++) {
        const uint8_t *r = rec_at(t, g, F);
        for (int off = 0; off < REC(F); off += 64) _mm_prefetch((const char *)(r + PREFETCH_BYTES + off), _MM_HINT_T0);
        if (KQ(F) && (g & 7) == 0) {
            for (int h = 0; h < 2; h++) {
                sd[h] = cvt_h8(hdr_at(t, g, F) + 16 * h);
                if (F != F_Q6K) smin[h] = cvt_h8(hdr_at(t, g, F) + 32 + 16 * h);
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i v[8];
            if (F == F_Q8) {
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++) v[c] = _mm256_loadu_si256((const __m256i *)(r + 64 * c + 32 * h));
            } else {
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    const __m256i l = _mm256_loadu_si256((const __m256i *)(r + 64 * c + 32 * h));
                    v[c] = _mm256_and_si256(l, m4);
                    v[c + 4] = _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
                }
                if (FIFTH(F)) {
#pragma GCC unroll 8
                    for (int c = 0; c < 8; c++) v[c] = _mm256_or_si256(v[c], fifth_bits(r + 256 + 8 * c + 4 * h));
                }
                if (F == F_Q6K) {
                    const __m256i h0 = _mm256_loadu_si256((const __m256i *)(r + 256 + 32 * h));
                    const __m256i h1 = _mm256_loadu_si256((const __m256i *)(r + 320 + 32 * h));
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) {
                        v[c] = _mm256_or_si256(v[c], q6_high(h0, c));
                        v[c + 4] = _mm256_or_si256(v[c + 4], q6_high(h1, c));
                    }
                }
            }
            __m256 d8, m8 = _mm256_setzero_ps(), e8 = _mm256_setzero_ps();
            if (F == F_Q4F) {
                d8 = _mm256_loadu_ps((const float *)(r + DOFF(F)) + 8 * h);
                m8 = _mm256_loadu_ps((const float *)(r + MOFF(F)) + 8 * h);
            } else if (F == F_Q4K || F == F_Q5K) {
                d8 = _mm256_mul_ps(sd[h], cvt_u8x8(r + KSC(F) + 8 * h));
                m8 = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(smin[h], cvt_u8x8(r + KSC(F) + 16 + 8 * h)));
            } else if (F == F_Q6K) {
                d8 = _mm256_mul_ps(sd[h], cvt_i8x8(r + 384 + 8 * h));
                e8 = _mm256_mul_ps(sd[h], cvt_i8x8(r + 400 + 8 * h));
            } else {
                d8 = cvt_h8(r + DOFF(F) + 16 * h);
                if (F != F_Q8) m8 = cvt_h8(r + MOFF(F) + 16 * h);
            }
#pragma GCC unroll 4
            for (int j = 0; j < MB; j++) {
                const int8_t *x = xq + j * k + QK * g;
                const int32_t h0 = xh[j * 2 * g_n + 2 * g], h1 = xh[j * 2 * g_n + 2 * g + 1];
                const __m256 xdj = _mm256_set1_ps(xd[j * g_n + g]);
                if (F == F_Q6K) {
                    const __m256i s0 = _mm256_add_epi32(_mm256_add_epi32(dot_chunks(v, x, 0, 2), dot_chunks(v, x, 2, 2)),
                                                        _mm256_set1_epi32(-32 * h0));
                    const __m256i s1 = _mm256_add_epi32(_mm256_add_epi32(dot_chunks(v, x, 4, 2), dot_chunks(v, x, 6, 2)),
                                                        _mm256_set1_epi32(-32 * h1));
                    acc[h][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d8, xdj), acc[h][j]);
                    acc[h][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(e8, xdj), acc[h][j]);
                    continue;
                }
                __m256i s;
                if (F == F_Q8) {
                    s = _mm256_setzero_si256();
#pragma GCC unroll 8
                    for (int c = 0; c < 8; c++) {
                        const __m256i xb = _mm256_set1_epi32(ld32(x + 4 * c));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(v[c], v[c]),
                                                                                      _mm256_sign_epi8(xb, v[c])), ones));
                    }
                } else if (FIFTH(F)) {
                    s = _mm256_add_epi32(dot_chunks(v, x, 0, 4), dot_chunks(v, x, 4, 4));
                } else {
                    s = dot_chunks(v, x, 0, 8);
                }
                acc[h][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d8, xdj), acc[h][j]);
                if (F != F_Q8) acc[h][j] = _mm256_fmadd_ps(m8, _mm256_set1_ps(xs[j * g_n + g]), acc[h][j]);
            }
        }
    }
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < MB; j++) _mm256_storeu_ps(res + TR * j + 8 * h, acc[h][j]);
}
#else
/* Portable: the same sums in plain C. Weight e of row i in group g sits in chunk vector c = e / 4 at byte
 * b = 4 i + e % 4 (chunk vectors 0-3 in the low nibbles of the four 64-byte blocks, 4-7 in the high ones;
 * a fifth bit is bit b of the c-th 8-byte word after them; Q6_K's two high bits sit at bits 2 (c % 4) of
 * byte b of the (c / 4)-th 64-byte block after them). */
static inline void tile_dot(const uint8_t *t, int64_t g_n, const int8_t *xq, int64_t k, const float *xd,
                            const float *xs, const int32_t *xh, const int F, const int MB, float *res) {
    for (int j = 0; j < MB; j++)
        for (int i = 0; i < TR; i++) res[TR * j + i] = 0.0f;
    for (int64_t g = 0; g < g_n; g++) {
        const uint8_t *r = rec_at(t, g, F), *hd = hdr_at(t, g, F);
        for (int i = 0; i < TR; i++) {
            int w[QK];
            for (int e = 0; e < QK; e++) {
                const int c = e / 4, b = 4 * i + e % 4;
                if (F == F_Q8) {
                    w[e] = (int8_t)r[64 * c + b];
                } else {
                    w[e] = (r[64 * (c % 4) + b] >> (c >= 4 ? 4 : 0)) & 15;
                    if (FIFTH(F)) w[e] |= ((r[256 + 8 * c + b / 8] >> (b % 8)) & 1) << 4;
                    if (F == F_Q6K) w[e] = (w[e] | ((r[256 + 64 * (c / 4) + b] >> (2 * (c % 4))) & 3) << 4) - 32;
                }
            }
            float d, m = 0.0f, d2 = 0.0f;
            if (F == F_Q4F) {
                memcpy(&d, r + DOFF(F) + 4 * i, 4);
                memcpy(&m, r + MOFF(F) + 4 * i, 4);
            } else if (F == F_Q4K || F == F_Q5K) {
                d = ld_f16(hd, i) * (float)r[KSC(F) + i];
                m = -(ld_f16(hd + 32, i) * (float)r[KSC(F) + 16 + i]);
            } else if (F == F_Q6K) {
                d = ld_f16(hd, i) * (float)(int8_t)r[384 + i];
                d2 = ld_f16(hd, i) * (float)(int8_t)r[400 + i];
            } else {
                d = ld_f16(r + DOFF(F), i);
                if (F != F_Q8) m = ld_f16(r + MOFF(F), i);
            }
            for (int j = 0; j < MB; j++) {
                const int8_t *x = xq + j * k + QK * g;
                int sum = 0, sum2 = 0;
                for (int e = 0; e < QK; e++) {
                    if (F == F_Q6K && e >= 16) sum2 += w[e] * x[e];
                    else sum += w[e] * x[e];
                }
                const float dx = xd[j * g_n + g];
                res[TR * j + i] += (float)sum * (d * dx) + (F == F_Q6K ? (float)sum2 * (d2 * dx) : m * xs[j * g_n + g]);
            }
        }
    }
    (void)xh;
}
#endif

/* Each (format, rows) instance fully unrolled, accumulators in registers. */
#define TILE_CASES(NAME, F)                                                                                 \
    static void NAME(int mb, const uint8_t *t, int64_t g_n, const int8_t *xq, int64_t k, const float *xd,     \
                     const float *xs, const int32_t *xh, float *res) {                                        \
        switch (mb) {                                                                                         \
        case 1: tile_dot(t, g_n, xq, k, xd, xs, xh, F, 1, res); break;                                        \
        case 2: tile_dot(t, g_n, xq, k, xd, xs, xh, F, 2, res); break;                                        \
        case 3: tile_dot(t, g_n, xq, k, xd, xs, xh, F, 3, res); break;                                        \
        default: tile_dot(t, g_n, xq, k, xd, xs, xh, F, 4, res); break;                                       \
        }                                                                                                     \
    }
TILE_CASES(q4h_tiles, F_Q4H)
TILE_CASES(q4f_tiles, F_Q4F)
TILE_CASES(q5h_tiles, F_Q5H)
TILE_CASES(q8_tiles, F_Q8)
TILE_CASES(q4k_tiles, F_Q4K)
TILE_CASES(q5k_tiles, F_Q5K)
TILE_CASES(q6k_tiles, F_Q6K)

typedef void (*tiles_fn)(int, const uint8_t *, int64_t, const int8_t *, int64_t, const float *, const float *,
                         const int32_t *, float *);

/* a: w (tiles), N, K, xq, xd, xs, M, n_seg, seg_end*, seg_out*, bytes per tile (the packed array's own
 * stride, so the layout's size lives in one place: the Python packer), xh (int32 [M, 2G]) */
typedef struct { const int64_t *a; tiles_fn tiles; } matmul_job;

static void matmul_tiles(void *job, int64_t t0, int64_t t1) {
    const int64_t *a = ((matmul_job *)job)->a;
    const tiles_fn tiles = ((matmul_job *)job)->tiles;
    const uint8_t *w = (const uint8_t *)a[0];
    const int64_t n = a[1], k = a[2], m_rows = a[6], n_seg = a[7], tb = a[10], g_n = k / QK;
    const int8_t *xq = (const int8_t *)a[3];
    const float *xd = (const float *)a[4], *xs = (const float *)a[5];
    const int64_t *seg_end = (const int64_t *)a[8];
    float *const *seg_out = (float *const *)a[9];
    const int32_t *xh = (const int32_t *)a[11];
    for (int64_t ti = t0; ti < t1; ti++) {
        const int64_t r0 = ti * TR, rows = n - r0 < TR ? n - r0 : TR;
        int64_t s = 0, start = 0;
        while (s + 1 < n_seg && r0 >= seg_end[s]) start = seg_end[s++];
        float *out = seg_out[s] + (r0 - start);
        const int64_t ldo = seg_end[s] - start;
        float res[TR * M_TILE];
        for (int64_t m0 = 0; m0 < m_rows; m0 += M_TILE) {
            const int mb = (int)(m_rows - m0 < M_TILE ? m_rows - m0 : M_TILE);
            tiles(mb, w + ti * tb, g_n, xq + m0 * k, k, xd + m0 * g_n, xs + m0 * g_n, xh + 2 * m0 * g_n, res);
            for (int j = 0; j < mb; j++) memcpy(out + (m0 + j) * ldo, res + TR * j, (size_t)rows * sizeof(float));
        }
    }
}

static void matmul(const int64_t *a, tiles_fn tiles) {
    matmul_job job = {a, tiles};
    parallel_for((a[1] + TR - 1) / TR, 1, matmul_tiles, &job);
}

void kvg_matmul_q4h(const int64_t *a) { matmul(a, q4h_tiles); }
void kvg_matmul_q4(const int64_t *a) { matmul(a, q4f_tiles); }
void kvg_matmul_q5h(const int64_t *a) { matmul(a, q5h_tiles); }
void kvg_matmul_q8(const int64_t *a) { matmul(a, q8_tiles); }
void kvg_matmul_q4k(const int64_t *a) { matmul(a, q4k_tiles); }
void kvg_matmul_q5k(const int64_t *a) { matmul(a, q5k_tiles); }
void kvg_matmul_q6k(const int64_t *a) { matmul(a, q6k_tiles); }

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

/* The widest float vector the build has (16 lanes with AVX-512, 8 with AVX2), for the elementwise loops
 * that are written once: exp, the gated activations, the attention softmax and weighted-V sums. */
#if KVG_AVX512
typedef __m512 vf;
#define VF_W 16
#define vf_set1 _mm512_set1_ps
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_add _mm512_add_ps
#define vf_sub _mm512_sub_ps
#define vf_mul _mm512_mul_ps
#define vf_div _mm512_div_ps
#define vf_min _mm512_min_ps
#define vf_max _mm512_max_ps
#define vf_fmadd _mm512_fmadd_ps
#define vf_fnmadd _mm512_fnmadd_ps
#define vf_round(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vf_pow2(fx) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), \
                                                                         _mm512_set1_epi32(127)), 23))
#define vf_load_h(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))   /* 16 float16 */
#define vf_load_bf(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(   /* 16 bfloat16 */ \
                          _mm256_loadu_si256((const __m256i *)(p))), 16))
#define vf_keep_live(x, e) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask((x), vf_set1(-INFINITY), _CMP_NEQ_UQ), (e))
#define vf_unless_masked(m, e) _mm512_mask_mov_ps(vf_set1(-INFINITY), _mm512_cmp_ps_mask((m), vf_set1(-INFINITY), \
                                                                                        _CMP_NEQ_UQ), (e))
#define vf_hmax _mm512_reduce_max_ps
/* x cmp t ? a : b, lane by lane */
#define vf_if(x, cmp, t, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((x), (t), (cmp)), (b), (a))
#define vf_exponent(x) _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(x), 23), \
                                                           _mm512_set1_epi32(126)))         /* x > 0 normal */
#define vf_mantissa(x) _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(x), \
                           _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)))  /* in [0.5, 1) */
#elif KVG_AVX2
typedef __m256 vf;
#define VF_W 8
#define vf_set1 _mm256_set1_ps
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_add _mm256_add_ps
#define vf_sub _mm256_sub_ps
#define vf_mul _mm256_mul_ps
#define vf_div _mm256_div_ps
#define vf_min _mm256_min_ps
#define vf_max _mm256_max_ps
#define vf_fmadd _mm256_fmadd_ps
#define vf_fnmadd _mm256_fnmadd_ps
#define vf_round(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vf_pow2(fx) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), \
                                                                         _mm256_set1_epi32(127)), 23))
#define vf_load_h(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))     /* 8 float16 */
#define vf_load_bf(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(   /* 8 bfloat16 */ \
                          _mm_loadu_si128((const __m128i *)(p))), 16))
#define vf_keep_live(x, e) _mm256_andnot_ps(_mm256_cmp_ps((x), vf_set1(-INFINITY), _CMP_EQ_OQ), (e))
#define vf_unless_masked(m, e) _mm256_blendv_ps(vf_set1(-INFINITY), (e), _mm256_cmp_ps((m), vf_set1(-INFINITY), \
                                                                                     _CMP_NEQ_UQ))
#define vf_if(x, cmp, t, a, b) _mm256_blendv_ps((b), (a), _mm256_cmp_ps((x), (t), (cmp)))
#define vf_exponent(x) _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 23), \
                                                           _mm256_set1_epi32(126)))
#define vf_mantissa(x) _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(x), \
                           _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)))
static inline float vf_hmax(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

#ifdef VF_W
/* exp(x) lane by lane (Cephes' polynomial, relative error ~2e-7; inputs clamped to +-88). */
static inline vf vf_exp(vf x) {
    x = vf_min(vf_max(x, vf_set1(-87.3f)), vf_set1(88.3f));
    const vf fx = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    x = vf_fnmadd(fx, vf_set1(0.693359375f), x);
    x = vf_fnmadd(fx, vf_set1(-2.12194440e-4f), x);
    vf y = vf_set1(1.9875691500e-4f);
    y = vf_fmadd(y, x, vf_set1(1.3981999507e-3f));
    y = vf_fmadd(y, x, vf_set1(8.3334519073e-3f));
    y = vf_fmadd(y, x, vf_set1(4.1665795894e-2f));
    y = vf_fmadd(y, x, vf_set1(1.6666665459e-1f));
    y = vf_fmadd(y, x, vf_set1(5.0000001201e-1f));
    y = vf_fmadd(y, vf_mul(x, x), vf_add(x, vf_set1(1.0f)));
    return vf_mul(y, vf_pow2(fx));
}

/* log(1 + y) lane by lane for y >= 0 (Cephes' logf polynomial on 1 + y = m 2^e, then Goldberg's
 * log(u) y / (u - 1), exact where 1 + y rounds: a few ulp, as log1pf). */
static inline vf vf_log1p(vf y) {
    const vf one = vf_set1(1.0f), u = vf_add(one, y), um1 = vf_sub(u, one);
    vf e = vf_exponent(u), m = vf_mantissa(u);
    e = vf_if(m, _CMP_LT_OQ, vf_set1(0.707106781186547524f), vf_sub(e, one), e);
    m = vf_if(m, _CMP_LT_OQ, vf_set1(0.707106781186547524f), vf_add(m, m), m);
    const vf x = vf_sub(m, one), z = vf_mul(x, x);
    vf p = vf_set1(7.0376836292e-2f);
    p = vf_fmadd(p, x, vf_set1(-1.1514610310e-1f));
    p = vf_fmadd(p, x, vf_set1(1.1676998740e-1f));
    p = vf_fmadd(p, x, vf_set1(-1.2420140846e-1f));
    p = vf_fmadd(p, x, vf_set1(1.4249322787e-1f));
    p = vf_fmadd(p, x, vf_set1(-1.6668057665e-1f));
    p = vf_fmadd(p, x, vf_set1(2.0000714765e-1f));
    p = vf_fmadd(p, x, vf_set1(-2.4999993993e-1f));
    p = vf_fmadd(p, x, vf_set1(3.3333331174e-1f));
    p = vf_mul(vf_mul(p, x), z);
    p = vf_fmadd(e, vf_set1(-2.12194440e-4f), p);
    p = vf_fnmadd(vf_set1(0.5f), z, p);
    const vf r = vf_fmadd(e, vf_set1(0.693359375f), vf_add(x, p));
    return vf_if(um1, _CMP_EQ_OQ, vf_set1(0.0f), y, vf_mul(r, vf_div(y, um1)));
}

/* softplus(x) = log(1 + exp(x)), x itself above 20 (as ggml), lane by lane. */
static inline vf vf_softplus(vf x) { return vf_if(x, _CMP_GT_OQ, vf_set1(20.0f), x, vf_log1p(vf_exp(x))); }
#endif

/* o[i] = act(g[i]) * u[i] (u 0: act(g[i])), kind 0: silu, 1: gelu tanh, 2: sigmoid, 3: softplus (those two
 * alone, never gated). Element i is read before it is written (o may be g or u), and each element's bits depend
 * only on its value and on whether it falls in a whole vector. */
static inline void gated_span(const float *g, const float *u, float *o, const int64_t n, const int64_t kind) {
    int64_t i = 0;
#ifdef VF_W
    const vf one = vf_set1(1.0f);
    for (; i + VF_W <= n; i += VF_W) {
        const vf x = vf_load(g + i);
        vf act;
        if (kind == 0) {       /* x / (1 + e^-x) */
            act = vf_div(x, vf_add(one, vf_exp(vf_sub(vf_set1(0.0f), x))));
        } else if (kind == 2) {
            act = vf_div(one, vf_add(one, vf_exp(vf_sub(vf_set1(0.0f), x))));
        } else if (kind == 3) {
            act = vf_softplus(x);
        } else {               /* 0.5 x (1 + tanh(z)) = x / (1 + e^-2z), z = sqrt(2/pi) (x + 0.044715 x^3) */
            const vf z = vf_mul(vf_set1(0.7978845608f), vf_fmadd(vf_mul(vf_set1(0.044715f), x), vf_mul(x, x), x));
            act = vf_div(x, vf_add(one, vf_exp(vf_mul(vf_set1(-2.0f), z))));
        }
        vf_store(o + i, u ? vf_mul(act, vf_load(u + i)) : act);
    }
#endif
    for (; i < n; i++) {
        const float x = g[i];
        const float act = kind == 0 ? x / (1.0f + expf(-x))
                          : kind == 2 ? 1.0f / (1.0f + expf(-x))
                          : kind == 3 ? (x > 20.0f ? x : log1pf(expf(x)))
                                      : 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
        o[i] = u ? act * u[i] : act;
    }
}

/* a: gate, up, out, n, kind:  out = act(gate) * up, all contiguous */
void kvg_gated(const int64_t *a) {
    gated_span((const float *)a[0], (const float *)a[1], (float *)a[2], a[3], a[4]);
}

/* a: x, out, rows, k, kind, x row stride, out row stride (floats):  out = act(x) (kvg_gated's), row by row
 * (rows of k contiguous floats): an element's bits depend on its place in its row, never on how many rows
 * there are or where they lie. */
static void act_rows(void *ctx, int64_t r0, int64_t r1) {
    const int64_t *a = (const int64_t *)ctx;
    for (int64_t r = r0; r < r1; r++)
        gated_span((const float *)a[0] + r * a[5], NULL, (float *)a[1] + r * a[6], a[3], a[4]);
}

void kvg_act(const int64_t *a) { parallel_for(a[2], (16384 + a[3] - 1) / a[3], act_rows, (void *)a); }

#define GLU_RUN 4    /* gate tiles, then as many up tiles, read in runs: each weight stream stays sequential */
static const tiles_fn TILES[] = {q4h_tiles, q4f_tiles, q5h_tiles, q8_tiles, q4k_tiles, q5k_tiles, q6k_tiles};

/* a: w (gate's F/TR tiles, then up's), F (a multiple of TR), K, xq, xd, xs, M, out (float [M, F]), bytes per
 * tile, xh, format (F_*), kind (as kvg_gated), up's tiles where they are elsewhere (0: after gate's).
 * out = act(x gate^T) * (x up^T) with each output tile's gate and up products kept in registers: the two
 * [M, F] intermediates never exist. The same sums and the same activation as kvg_matmul_* then kvg_gated,
 * so the same bits. */
static void glu_tiles(void *job, int64_t r0, int64_t r1) {     /* runs r0 .. r1 - 1 of GLU_RUN tiles */
    const int64_t *a = (const int64_t *)job;
    const uint8_t *w = (const uint8_t *)a[0];
    const int64_t f = a[1], k = a[2], m_rows = a[6], tb = a[8], kind = a[11], g_n = k / QK, n_tiles = f / TR;
    const int8_t *xq = (const int8_t *)a[3];
    const float *xd = (const float *)a[4], *xs = (const float *)a[5];
    float *out = (float *)a[7];
    const int32_t *xh = (const int32_t *)a[9];
    const tiles_fn tiles = TILES[a[10]];
    const uint8_t *wu = a[12] ? (const uint8_t *)a[12] : w + n_tiles * tb;
    for (int64_t t0 = r0 * GLU_RUN; t0 < n_tiles && t0 < r1 * GLU_RUN; t0 += GLU_RUN) {
        const int nr = (int)(n_tiles - t0 < GLU_RUN ? n_tiles - t0 : GLU_RUN);
        float rg[GLU_RUN][TR * M_TILE], ru[GLU_RUN][TR * M_TILE];
        for (int64_t m0 = 0; m0 < m_rows; m0 += M_TILE) {
            const int mb = (int)(m_rows - m0 < M_TILE ? m_rows - m0 : M_TILE);
            const int64_t x0 = m0 * k, s0 = m0 * g_n;
            for (int r = 0; r < nr; r++)
                tiles(mb, w + (t0 + r) * tb, g_n, xq + x0, k, xd + s0, xs + s0, xh + 2 * s0, rg[r]);
            for (int r = 0; r < nr; r++)
                tiles(mb, wu + (t0 + r) * tb, g_n, xq + x0, k, xd + s0, xs + s0, xh + 2 * s0, ru[r]);
            for (int r = 0; r < nr; r++)
                for (int j = 0; j < mb; j++)
                    gated_span(rg[r] + TR * j, ru[r] + TR * j, out + (m0 + j) * f + (t0 + r) * TR, TR, kind);
        }
    }
}

void kvg_matmul_glu(const int64_t *a) {
    parallel_for((a[1] / TR + GLU_RUN - 1) / GLU_RUN, 1, glu_tiles, (void *)a);
}

#ifdef VF_W
/* The lanes of x added one after another (0 + x0 + x1 + ...): a sum whose order never depends on the caller. */
static inline float vf_sum_in_order(vf x) {
    float lanes[VF_W], s = 0.0f;
    vf_store(lanes, x);
    for (int i = 0; i < VF_W; i++) s += lanes[i];
    return s;
}
#endif

/* a: w ([N, K] of float32, float16 or bfloat16 (a[9]: 0, 1, 2), rows ws0 elements apart), N, K, x (float
 * [M, K], rows xs0 apart), M, out (float [M, N], rows os0 apart), ws0, xs0, os0, weight type.
 * out = x w^T for float weights as the file stores them (read in place: no repacking). Each out[m, n] is one
 * dot product summed lane by lane in the order of k, whatever M is or which rows share a pass, so a token's
 * row does not depend on its ubatch (a BLAS picks other kernels, and other sums, for one row than for many). */
enum { W_F32, W_F16, W_BF16 };

static inline float w_at(const void *w, int64_t i, const int WT) {
    if (WT == W_F32) return ((const float *)w)[i];
    const uint16_t h = ((const uint16_t *)w)[i];
    if (WT == W_F16) return h2f(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef VF_W
static inline vf w_load(const void *w, int64_t i, const int WT) {
    return WT == W_F32 ? vf_load((const float *)w + i)
         : WT == W_F16 ? vf_load_h((const uint16_t *)w + i) : vf_load_bf((const uint16_t *)w + i);
}
#endif

/* FR_N weight rows x FR_M tokens per pass: FR_N independent sums (and streams) even for one token, and each
 * token's x read once per FR_N rows. Every out[m, n] is still its own lane-wise chain in the order of k, so the
 * blocking changes no bit (rows and tokens past the end repeat the last one; their sums are dropped). */
#if KVG_AVX512
#define FR_N 4
#define FR_M 4
#else
#define FR_N 4
#define FR_M 2
#endif

/* out[m0 .. m0+MB) x rows [nb, nb+FR_N) (rows past n1 repeat the last; their sums are dropped) */
static inline void float_block(const int64_t *a, int64_t nb, int64_t n1, int64_t m0, const int MB, const int WT) {
    const float *x = (const float *)a[3];
    const int64_t k = a[2], ws0 = a[6], xs0 = a[7], os0 = a[8];
    const size_t esize = WT == W_F32 ? 4 : 2;
    float *out = (float *)a[5];
    const void *wr[FR_N];
    for (int r = 0; r < FR_N; r++) wr[r] = (const uint8_t *)a[0] + (nb + r < n1 ? nb + r : n1 - 1) * ws0 * esize;
    const float *xr[FR_M];
    for (int j = 0; j < MB; j++) xr[j] = x + (m0 + j) * xs0;
    float sum[FR_N][FR_M];
    int64_t e = 0;
#ifdef VF_W
    vf acc[FR_N][FR_M];
    for (int r = 0; r < FR_N; r++)
        for (int j = 0; j < MB; j++) acc[r][j] = vf_set1(0.0f);
    for (; e + VF_W <= k; e += VF_W) {
        vf wv[FR_N];
        for (int r = 0; r < FR_N; r++) wv[r] = w_load(wr[r], e, WT);
        for (int j = 0; j < MB; j++) {
            const vf xv = vf_load(xr[j] + e);
            for (int r = 0; r < FR_N; r++) acc[r][j] = vf_fmadd(xv, wv[r], acc[r][j]);
        }
    }
    for (int r = 0; r < FR_N; r++)
        for (int j = 0; j < MB; j++) sum[r][j] = vf_sum_in_order(acc[r][j]);
#else
    for (int r = 0; r < FR_N; r++)
        for (int j = 0; j < MB; j++) sum[r][j] = 0.0f;
#endif
    for (int r = 0; r < FR_N && nb + r < n1; r++)
        for (int j = 0; j < MB; j++) {
            for (int64_t t = e; t < k; t++) sum[r][j] += xr[j][t] * w_at(wr[r], t, WT);
            out[(m0 + j) * os0 + nb + r] = sum[r][j];
        }
}

static inline void float_rows(const int64_t *a, int64_t n0, int64_t n1, const int WT) {
    const int64_t m_rows = a[4];
    for (int64_t nb = n0; nb < n1; nb += FR_N) {
        int64_t m0 = 0;
        for (; m0 + FR_M <= m_rows; m0 += FR_M) float_block(a, nb, n1, m0, FR_M, WT);
        for (; m0 < m_rows; m0++) float_block(a, nb, n1, m0, 1, WT);
    }
}

static void f32_rows(void *job, int64_t n0, int64_t n1) { float_rows((const int64_t *)job, n0, n1, W_F32); }
static void f16_rows(void *job, int64_t n0, int64_t n1) { float_rows((const int64_t *)job, n0, n1, W_F16); }
static void bf16_rows(void *job, int64_t n0, int64_t n1) { float_rows((const int64_t *)job, n0, n1, W_BF16); }

void kvg_matmul_f32(const int64_t *a) {
    parallel_for(a[1], 8, a[9] == W_F16 ? f16_rows : a[9] == W_BF16 ? bf16_rows : f32_rows, (void *)a);
}

/* sum_i a[i] b[i], lane by lane in the order of i, then the lanes in order: the same sum wherever it runs */
static inline float dot_lanes(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    int64_t i = 0;
#ifdef VF_W
    vf acc = vf_set1(0.0f);
    for (; i + VF_W <= n; i += VF_W) acc = vf_fmadd(vf_load(a + i), vf_load(b + i), acc);
    s = vf_sum_in_order(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Token xt's routing: softmax(router xt) into p [X], its n_used most probable experts (the lower index on
 * ties) into chosen, their probabilities (renormalised to sum 1 when norm) into w. */
static void moe_route(const float *xt, const float *router, int64_t e, int64_t n_exp, int64_t n_used, int64_t norm,
                      float *p, int64_t *chosen, float *w) {
    float mx = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < n_exp; j++) {
        p[j] = dot_lanes(xt, router + j * e, e);
        mx = p[j] > mx ? p[j] : mx;
    }
    for (int64_t j = 0; j < n_exp; j++) total += (p[j] = expf(p[j] - mx));
    for (int64_t j = 0; j < n_exp; j++) p[j] /= total;
    float wsum = 0.0f;
    for (int64_t u = 0; u < n_used; u++) {
        int64_t best = -1;
        for (int64_t j = 0; j < n_exp; j++) {
            int taken = 0;
            for (int64_t v = 0; v < u; v++) taken |= chosen[v] == j;
            if (!taken && (best < 0 || p[j] > p[best])) best = j;
        }
        chosen[u] = best;
        wsum += p[best];
    }
    const float scale = norm ? 1.0f / (wsum > 6.103515625e-5f ? wsum : 6.103515625e-5f) : 1.0f;
    for (int64_t u = 0; u < n_used; u++) w[u] = p[chosen[u]] * scale;
}

/* a: x (float [n, E], rows xs0 apart), n, E, router (float [X, E]), X, up, gate (float [X, F, E]), down (float
 * [X, E, F]), F, out (float [n, E], rows os0 apart), n_used, norm, xs0, os0.
 * A mixture-of-experts SwiGLU FFN token by token (see GraphBuilder.moe_ffn): softmax(router x), the n_used
 * most probable experts (ties: the lower index), out = sum of p_e down_e(silu(gate_e x) * up_e x) with p
 * renormalised to sum 1 when norm. Every product is a dot_lanes: a token's row does not depend on which
 * other tokens share its ubatch or pick the same experts. */
static void moe_tokens(void *job, int64_t t0, int64_t t1) {
    const int64_t *a = (const int64_t *)job;
    const float *x = (const float *)a[0], *router = (const float *)a[3], *up = (const float *)a[5];
    const float *gate = (const float *)a[6], *down = (const float *)a[7];
    const int64_t e = a[2], n_exp = a[4], f = a[8], n_used = a[10], norm = a[11], xs0 = a[12], os0 = a[13];
    float *out = (float *)a[9];
    float *buf = malloc(sizeof(float) * (size_t)(n_exp + f + n_used));
    int64_t *chosen = malloc(sizeof(int64_t) * (size_t)n_used);
    float *p = buf, *h = buf + n_exp, *wt = buf + n_exp + f;
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * xs0;
        float *ot = out + t * os0;
        moe_route(xt, router, e, n_exp, n_used, norm, p, chosen, wt);
        for (int64_t i = 0; i < e; i++) ot[i] = 0.0f;
        for (int64_t u = 0; u < n_used; u++) {
            const int64_t j = chosen[u];
            for (int64_t r = 0; r < f; r++) {
                const float g = dot_lanes(xt, gate + (j * f + r) * e, e);
                h[r] = g / (1.0f + expf(-g)) * dot_lanes(xt, up + (j * f + r) * e, e);
            }
            for (int64_t i = 0; i < e; i++) ot[i] += wt[u] * dot_lanes(h, down + (j * e + i) * f, f);
        }
    }
    free(chosen);
    free(buf);
}

void kvg_moe_f32(const int64_t *a) { parallel_for(a[1], 1, moe_tokens, (void *)a); }

typedef struct { const int64_t *a; float *p; int64_t *chosen; float *w; } route_job;

static void route_tokens(void *job, int64_t t0, int64_t t1) {
    const route_job *r = (const route_job *)job;
    const int64_t *a = r->a;
    const int64_t e = a[2], xs0 = a[3], n_exp = a[5], n_used = a[16], norm = a[17];
    for (int64_t t = t0; t < t1; t++)
        moe_route((const float *)a[0] + t * xs0, (const float *)a[4], e, n_exp, n_used, norm, r->p + t * n_exp,
                  r->chosen + t * n_used, r->w + t * n_used);
}

/* A Q8 activation's four arrays (kvg_quantize_q8's layout: q [M, K], d and s [M, K/32], h [M, K/16]). */
typedef struct { int8_t *q; float *d, *s; int32_t *h; } q8_rows;

static q8_rows q8_at(const int64_t *a) {
    return (q8_rows){(int8_t *)a[0], (float *)a[1], (float *)a[2], (int32_t *)a[3]};
}

static void q8_copy_row(q8_rows dst, int64_t i, q8_rows src, int64_t t, int64_t k) {
    const int64_t g = k / QK;
    memcpy(dst.q + i * k, src.q + t * k, (size_t)k);
    memcpy(dst.d + i * g, src.d + t * g, sizeof(float) * (size_t)g);
    memcpy(dst.s + i * g, src.s + t * g, sizeof(float) * (size_t)g);
    memcpy(dst.h + i * 2 * g, src.h + t * 2 * g, sizeof(int32_t) * (size_t)(2 * g));
}

/* One expert matmul: rows [M, K] of act against the [N, K] matrix w (tiles of format fmt, tb bytes each)
 * into out [M, N]. */
static void tiles_product(const uint8_t *w, int64_t fmt, int64_t tb, int64_t n, int64_t k, q8_rows act, int64_t m,
                          float *out) {
    const int64_t end = n, outp = (int64_t)out;
    const int64_t a[12] = {(int64_t)w, n, k, (int64_t)act.q, (int64_t)act.d, (int64_t)act.s, m, 1, (int64_t)&end,
                           (int64_t)&outp, tb, (int64_t)act.h};
    matmul(a, TILES[fmt]);
}

/* a: x (float [n, E], rows xs0 apart), n, E, xs0, router (float [X, E]), X, gate, up, down (each the experts'
 * matrices stacked, [X F, E], [X F, E], [X E, F], in tiles), their formats (3), their bytes per tile (3), F,
 * n_used, norm, out (float [n, E], rows os0 apart), os0, x as Q8 (q, d, s, h: 4 slots), scratch: rows of x
 * as Q8 (4), h (float [n, F]), u (float [n, F]), h as Q8 (4), y (float [n, E]), p (float [n, X]), chosen
 * (int64 [n, n_used]), w (float [n, n_used]), token list (int64 [n]).
 * The mixture of experts of kvg_moe_f32 over the experts' tiles: routing per token as there; then expert by
 * expert, the rows of the tokens that chose it run its gate/up (fused when one format) and down products as
 * any matmul does, and each token adds p_e y_e in the order of the experts. A token's row depends only on
 * its own routing: the tile products' rows do not depend on which rows share their pass. */
void kvg_moe_tiles(const int64_t *a) {
    const int64_t n = a[1], e = a[2], n_exp = a[5], f = a[15], n_used = a[16], os0 = a[19];
    const uint8_t *gate = (const uint8_t *)a[6], *up = (const uint8_t *)a[7], *down = (const uint8_t *)a[8];
    const int64_t gf = a[9], uf = a[10], df = a[11], gtb = a[12], utb = a[13], dtb = a[14];
    float *out = (float *)a[18], *h = (float *)a[28], *u = (float *)a[29], *y = (float *)a[34];
    const q8_rows xq = q8_at(a + 20), rows = q8_at(a + 24), hq = q8_at(a + 30);
    int64_t *chosen = (int64_t *)a[36], *list = (int64_t *)a[38];
    float *w = (float *)a[37];
    route_job rj = {a, (float *)a[35], chosen, w};
    parallel_for(n, 1, route_tokens, &rj);
    for (int64_t t = 0; t < n; t++) memset(out + t * os0, 0, sizeof(float) * (size_t)e);
    for (int64_t j = 0; j < n_exp; j++) {
        int64_t m = 0;
        for (int64_t t = 0; t < n; t++)
            for (int64_t v = 0; v < n_used; v++)
                if (chosen[t * n_used + v] == j) {
                    list[m] = t * n_used + v;      /* token and which of its choices */
                    q8_copy_row(rows, m++, xq, t, e);
                }
        if (!m) continue;
        const uint8_t *gj = gate + j * (f / TR) * gtb, *uj = up + j * (f / TR) * utb;
        if (gf == uf) {
            const int64_t ga[13] = {(int64_t)gj, f, e, (int64_t)rows.q, (int64_t)rows.d, (int64_t)rows.s, m,
                                    (int64_t)h, gtb, (int64_t)rows.h, gf, 0, (int64_t)uj};
            kvg_matmul_glu(ga);
        } else {
            tiles_product(gj, gf, gtb, f, e, rows, m, h);
            tiles_product(uj, uf, utb, f, e, rows, m, u);
            for (int64_t i = 0; i < m; i++) gated_span(h + i * f, u + i * f, h + i * f, f, 0);
        }
        const int64_t qa[8] = {(int64_t)h, m, f, f, (int64_t)hq.q, (int64_t)hq.d, (int64_t)hq.s, (int64_t)hq.h};
        kvg_quantize_q8(qa);
        tiles_product(down + j * (e / TR) * dtb, df, dtb, e, f, hq, m, y);
        for (int64_t i = 0; i < m; i++) {
            float *ot = out + (list[i] / n_used) * os0;
            const float wt = w[list[i]], *yi = y + i * e;
            for (int64_t c = 0; c < e; c++) ot[c] += wt * yi[c];
        }
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

/* a: dst, dst_s0, dst_s1, src, n, width, src_s0, idx (int32 [n]), n_dst (rows idx may name), dst is float16:
 * dst[idx[i] * dst_s0 + j * dst_s1] = src[i * src_s0 + j]  (dst_s1 = 1: rows; dst_s0 = 1: columns) */
void kvg_set_rows(const int64_t *a) {
    const float *src = (const float *)a[3];
    const int64_t s0 = a[1], s1 = a[2], n = a[4], width = a[5], ss0 = a[6], n_dst = a[8], half = a[9];
    const int32_t *idx = (const int32_t *)a[7];
    for (int64_t i = 0; i < n; i++) {
        if (!in_range(idx[i], n_dst)) continue;
        const float *v = src + i * ss0;
        if (half) {
            uint16_t *o = (uint16_t *)a[0] + (int64_t)idx[i] * s0;
            int64_t j = 0;
#if KVG_AVX2
            if (s1 == 1)
                for (; j + 8 <= width; j += 8)
                    _mm_storeu_si128((__m128i *)(o + j), _mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT));
#endif
            for (; j < width; j++) o[j * s1] = f2h(v[j]);
            continue;
        }
        float *o = (float *)a[0] + (int64_t)idx[i] * s0;
        if (s1 == 1)
            memcpy(o, v, (size_t)width * sizeof(float));
        else
            for (int64_t j = 0; j < width; j++) o[j * s1] = v[j];
    }
}

/* a: dst (Q8_0 blocks), dst_s0 (bytes per row), src, n, width (floats, a multiple of 32), src_s0 (floats),
 * idx (int32 [n]), n_dst: row idx[i] of dst = src row i as ggml's Q8_0 blocks (34 bytes: float16 d, 32 int8
 * q), quantized as quantize_row_q8_0_ref does: d = max|x| / 127, q = roundf(x * (1 / d)) (a q8_0 KV cache) */
void kvg_set_rows_q8_0(const int64_t *a) {
    const float *src = (const float *)a[2];
    const int64_t s0 = a[1], n = a[3], width = a[4], ss0 = a[5], n_dst = a[7];
    const int32_t *idx = (const int32_t *)a[6];
    for (int64_t i = 0; i < n; i++) {
        if (!in_range(idx[i], n_dst)) continue;
        uint8_t *o = (uint8_t *)a[0] + (int64_t)idx[i] * s0;
        for (int64_t b = 0; b < width / QK; b++, o += 34) {
            const float *x = src + i * ss0 + b * QK;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            const uint16_t dh = f2h(d);
            memcpy(o, &dh, 2);
            for (int j = 0; j < QK; j++) o[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
        }
    }
}

/* a: q, n, H, d, qs0, qs1,  k, n_kv, Hkv, ks0, ks1,  v, dv, vs0, vs1, vs2,  mask, ms0,  scale (f64 bits),
 *    out, os0, os1, kv_f16 (K and V float16; strides count elements),  pages (int32 [n_kv / SEG] or 0)
 * out[t, h] = softmax(q[t, h] . k[:, h / (H / Hkv)] * scale + mask[t]) @ v[:, h / (H / Hkv)]
 * One algorithm for every ubatch size, so a token's result does not depend on how many tokens share its
 * ubatch (a prompt continued from cached cells equals the same prompt run cold). The window is cut into
 * segments of SEG cells; a task is (block of up to QB tokens, one KV head, one segment), so one token's
 * decode still spreads over every thread, and the segments' partial results are merged in order at the
 * end (the cut depends only on the window, never on the ubatch or the threads). A task takes its cells in
 * chunks of KC: the chunk of K is transposed once into kt[d][KC], so every query of the block gets its KC
 * scores from vector multiply-adds (no horizontal sums); then the chunk's maximum, its exponentials
 * (vectorized) and its share of the weighted V sum, with the running sum rescaled when the maximum grows
 * (online softmax). Chunks the mask hides from the whole block are skipped (a padded KV window costs only
 * its valid cells), cells masked -inf never reach the sums, and the next chunk's rows are prefetched.
 * v element (cell c, head j, dim e) is at c*vs0 + j*vs1 + e*vs2. Work items come in waves whose partial
 * results fit PART_BYTES. With pages (the KV cache's: segment s holds the positions [SEG pages[s], SEG
 * pages[s] + SEG) of one sequence at offsets pos % SEG) the segments are merged in the order of their
 * blocks, so a token's result does not depend on where its sequence's pages lie in the window either. */
#define QB 16
#define KC 64
#define SEG 256                 /* cells per segment (a multiple of KC) */
#define PART_BYTES (512 << 10)  /* partial results of one wave of work items, at most (resident for good) */
#define WAVE_TASKS 8            /* ... unless a wave would then have fewer tasks than this per thread */

#if KVG_AVX2
/* x[i]'s word j -> x[j]'s word i: an 8 x 8 transpose of 32-bit words, in place */
static inline __attribute__((always_inline)) void transpose8_ps(__m256 x[8]) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        x[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        x[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        x[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        x[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(x[i], x[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(x[i], x[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) x[i] = t[i];
}
#endif

/* element i of a K / V buffer of floats or, H, float16 */
static inline float ld_kv(const void *p, int64_t i, const int H) {
    return H ? h2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* kt[e * KC + c] = k[c * ks0 + e] for c < nc (rows past nc are zero), e < d; k float16 when H */
static inline __attribute__((always_inline)) void transpose_chunk(float *kt, const void *k, int64_t ks0, int64_t nc,
                                                                  int64_t d, const int H) {
    int64_t c = 0;
#if KVG_AVX2
    if (d % 8 == 0) {
        for (; c + 8 <= nc; c += 8)
            for (int64_t e = 0; e < d; e += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++)
                    r[i] = H ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)k + (c + i) * ks0 + e)))
                             : _mm256_loadu_ps((const float *)k + (c + i) * ks0 + e);
                transpose8_ps(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (e + i) * KC + c, r[i]);   /* r[i]: dim e + i */
            }
    }
#endif
    for (; c < nc; c++)
        for (int64_t e = 0; e < d; e++) kt[e * KC + c] = ld_kv(k, c * ks0 + e, H);
    for (; c < KC; c++)
        for (int64_t e = 0; e < d; e++) kt[e * KC + c] = 0.0f;
}

/* s[c] = exp(s[c] - mx) for cells not masked, 0 for masked ones (s[c] == -inf) */
static void exp_chunk(float *s, int64_t nc, float mx) {
    int64_t c = 0;
#ifdef VF_W
    for (; c + VF_W <= nc; c += VF_W) {
        const vf x = vf_load(s + c);
        vf_store(s + c, vf_keep_live(x, vf_exp(vf_sub(x, vf_set1(mx)))));
    }
#endif
    for (; c < nc; c++) s[c] = s[c] == -INFINITY ? 0.0f : expf(s[c] - mx);
}

/* s[c] = s[c] * scale + m[c] (two roundings, as the scalar tail: vector and scalar cells agree bit for bit),
 * or -inf where m[c] is (masked); returns the largest (-inf if all are masked) */
static inline float scale_mask_max(float *s, const float *m, int64_t nc, float scale) {
    int64_t c = 0;
    float mx = -INFINITY;
#ifdef VF_W
    vf vmx = vf_set1(-INFINITY);
    for (; c + VF_W <= nc; c += VF_W) {
        const vf mc = vf_load(m + c), x = vf_unless_masked(mc, vf_add(vf_mul(vf_load(s + c), vf_set1(scale)), mc));
        vf_store(s + c, x);
        vmx = vf_max(x, vmx);              /* a NaN score is passed over, as the comparison below does */
    }
    mx = vf_hmax(vmx);
#endif
    for (; c < nc; c++) {
        s[c] = m[c] == -INFINITY ? -INFINITY : s[c] * scale + m[c];
        mx = s[c] > mx ? s[c] : mx;
    }
    return mx;
}

/* One chunk of a query's online softmax: p (scores of nc cells) scaled, masked and exponentiated against the
 * running maximum *mx, *sum and acc (dv values summed so far) rescaled to a new maximum; 0 when every cell of
 * the chunk is masked (nothing to add). */
static inline int softmax_chunk(float *p, const float *mask, int64_t nc, float scale, float *mx, float *sum,
                                float *acc, int64_t dv) {
    const float cmx = scale_mask_max(p, mask, nc, scale);
    if (cmx == -INFINITY) return 0;
    if (cmx > *mx) {
        const float r = expf(*mx - cmx);     /* 0 on the first valid chunk */
        *sum *= r;
        for (int64_t e = 0; e < dv; e++) acc[e] *= r;
        *mx = cmx;
    }
    exp_chunk(p, nc, *mx);
    for (int64_t c = 0; c < nc; c++) *sum += p[c];
    return 1;
}

/* Ask for n rows of row_bytes, stride bytes apart, to be brought into cache (no-op where not available). */
static inline void prefetch_rows(const char *p, int64_t stride, int64_t n, int64_t row_bytes) {
#if KVG_AVX2
    for (int64_t r = 0; r < n; r++)
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(p + r * stride + off, _MM_HINT_T0);
#else
    (void)p, (void)stride, (void)n, (void)row_bytes;
#endif
}

/* sc[c] = sum_e q[e] kt[e * KC + c] for the KC cells of a transposed chunk: the accumulators stay in registers */
static inline void chunk_scores(float *sc, const float *q, const float *kt, int64_t d) {
#if KVG_AVX512
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t e = 0; e < d; e++) {
        const __m512 qe = _mm512_set1_ps(q[e]);
        for (int i = 0; i < 4; i++) a[i] = _mm512_fmadd_ps(qe, _mm512_loadu_ps(kt + e * KC + 16 * i), a[i]);
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(sc + 16 * i, a[i]);
#elif KVG_AVX2
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e++) {
        const __m256 qe = _mm256_set1_ps(q[e]);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(kt + e * KC + 8 * i), a[i]);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(sc + 8 * i, a[i]);
#else
    for (int c = 0; c < KC; c++) sc[c] = 0.0f;
    for (int64_t e = 0; e < d; e++)
        for (int c = 0; c < KC; c++) sc[c] += q[e] * kt[e * KC + c];
#endif
}

#ifdef VF_W
static inline vf pv_load(const void *v, int64_t i, const int H) {    /* VF_W elements from i, as floats */
    return H ? vf_load_h((const uint16_t *)v + i) : vf_load((const float *)v + i);
}
#endif

/* acc[e] += p[c] v[c][e] over the chunk's cells in order (cells with p[c] == 0 skipped), e0 <= e < dv; v[c][e] at
 * v + c * vs0 + e * vs2 elements (float16 when H). Four vector registers of acc at a time stay in registers
 * across all the cells. */
static inline __attribute__((always_inline)) void chunk_pv(float *acc, const float *p, int64_t nc, const void *v,
                                                           int64_t vs0, int64_t dv, int64_t vs2, int64_t e0,
                                                           const int H) {
    const int64_t es = H ? 2 : 4;
#ifdef VF_W
    if (vs2 == 1) {
        for (; e0 + 4 * VF_W <= dv; e0 += 4 * VF_W) {
            vf r[4];
            for (int i = 0; i < 4; i++) r[i] = vf_load(acc + e0 + VF_W * i);
            for (int64_t c = 0; c < nc; c++) {
                if (p[c] == 0.0f) continue;
                const char *vc = (const char *)v + es * c * vs0;
                for (int i = 0; i < 4; i++) r[i] = vf_fmadd(vf_set1(p[c]), pv_load(vc, e0 + VF_W * i, H), r[i]);
            }
            for (int i = 0; i < 4; i++) vf_store(acc + e0 + VF_W * i, r[i]);
        }
        for (; e0 + VF_W <= dv; e0 += VF_W) {
            vf r = vf_load(acc + e0);
            for (int64_t c = 0; c < nc; c++)
                if (p[c] != 0.0f) r = vf_fmadd(vf_set1(p[c]), pv_load((const char *)v + es * c * vs0, e0, H), r);
            vf_store(acc + e0, r);
        }
    }
#endif
    for (int64_t c = 0; c < nc; c++) {
        if (p[c] == 0.0f) continue;
        const char *vc = (const char *)v + es * c * vs0;
        for (int64_t e = e0; e < dv; e++) acc[e] += p[c] * ld_kv(vc, e * vs2, H);
    }
}

/* Queries of one work item that go through a chunk together (the GQA heads of a token, or the tokens of a
 * prompt block): the chunk's transposed K and its V rows are loaded once for all of them. Each query's sums
 * run in the same order as alone, so the results do not depend on the grouping. */
#if KVG_AVX512
#define QG 4
#elif KVG_AVX2
#define QG 2
#else
#define QG 1
#endif

static inline __attribute__((always_inline)) void chunk_scores_multi(float sc[][KC], const float *const *qv, int ng,
                                                                     const float *kt, int64_t d) {
#if KVG_AVX512
    __m512 a[QG][4];
    const float *qq[QG];
    for (int g = 0; g < QG; g++) {
        qq[g] = qv[g < ng ? g : 0];
        for (int i = 0; i < 4; i++) a[g][i] = _mm512_setzero_ps();
    }
    for (int64_t e = 0; e < d; e++) {
        __m512 k[4];
        for (int i = 0; i < 4; i++) k[i] = _mm512_loadu_ps(kt + e * KC + 16 * i);
        for (int g = 0; g < QG; g++) {
            const __m512 qe = _mm512_set1_ps(qq[g][e]);
            for (int i = 0; i < 4; i++) a[g][i] = _mm512_fmadd_ps(qe, k[i], a[g][i]);
        }
    }
    for (int g = 0; g < ng; g++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(sc[g] + 16 * i, a[g][i]);
#else
    for (int g = 0; g < ng; g++) chunk_scores(sc[g], qv[g], kt, d);
#endif
}

/* chunk_pv for ng queries at once (acc[g] += p[g][c] v[c] over the cells in order; a query's cell with
 * p == 0 skipped, as alone): the vector slices of V are loaded once, the rest goes query by query. */
static inline __attribute__((always_inline)) void chunk_pv_multi(float *const *acc, const float *const *p, int ng,
                                                                 int64_t nc, const void *v, int64_t vs0, int64_t dv,
                                                                 int64_t vs2, const int H) {
    int64_t e0 = 0;
#ifdef VF_W
    const int64_t es = H ? 2 : 4;
    if (vs2 == 1 && ng > 1) {
        for (; e0 + 4 * VF_W <= dv; e0 += 4 * VF_W) {
            vf r[QG][4];
            for (int g = 0; g < ng; g++)
                for (int i = 0; i < 4; i++) r[g][i] = vf_load(acc[g] + e0 + VF_W * i);
            for (int64_t c = 0; c < nc; c++) {
                const char *vc = (const char *)v + es * c * vs0;
                vf x[4];
                for (int i = 0; i < 4; i++) x[i] = pv_load(vc, e0 + VF_W * i, H);
                for (int g = 0; g < ng; g++) {
                    if (p[g][c] == 0.0f) continue;
                    for (int i = 0; i < 4; i++) r[g][i] = vf_fmadd(vf_set1(p[g][c]), x[i], r[g][i]);
                }
            }
            for (int g = 0; g < ng; g++)
                for (int i = 0; i < 4; i++) vf_store(acc[g] + e0 + VF_W * i, r[g][i]);
        }
    }
#endif
    for (int g = 0; g < ng; g++) chunk_pv(acc[g], p[g], nc, v, vs0, dv, vs2, e0, H);
}

/* The calling thread's scratch, grown as needed and kept: attention's partial results (a wave's: at most
 * PART_BYTES unless that leaves too few tasks for the threads or one work item needs more); a fresh
 * allocation per call is a fresh mapping whose pages fault in and are zeroed every decode step. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
typedef struct { size_t n; float f[]; } scratch_t;

static void scratch_key_init(void) { pthread_key_create(&scratch_key, free); }

static float *scratch_floats(size_t n) {
    pthread_once(&scratch_once, scratch_key_init);
    scratch_t *s = pthread_getspecific(scratch_key);
    if (s == NULL || s->n < n) {
        free(s);
        s = malloc(sizeof(scratch_t) + n * sizeof(float));
        if (s == NULL) return NULL;
        s->n = n;
        pthread_setspecific(scratch_key, s);
    }
    return s->f;
}

/* The parameters of one attention call (a) as locals: K and V float16 when H (a[22] 1), q8_0 blocks (a[22] 2). */
#define ATTN_ARGS(a)                                                                                          \
    const float *q = (const float *)a[0];                                                                     \
    const void *k = (const void *)a[6], *v = (const void *)a[11];                                             \
    const float *mask = (const float *)a[16];                                                                 \
    const int64_t es = a[22] == 2 ? 1 : a[22] ? 2 : 4;   /* bytes per K / V element (q8_0: strides in bytes) */ \
    const int64_t n = a[1], nh = a[2], d = a[3], qs0 = a[4], qs1 = a[5];                                      \
    const int64_t n_kv = a[7], nhkv = a[8], ks0 = a[9], ks1 = a[10];                                          \
    const int64_t dv = a[12], vs0 = a[13], vs1 = a[14], vs2 = a[15], ms0 = a[17];                             \
    const float scale = f_arg(a[18]);                                                                         \
    float *out = (float *)a[19];                                                                              \
    const int64_t os0 = a[20], os1 = a[21], group = nh / nhkv, n_tb = (n + QB - 1) / QB;                      \
    const int64_t items = n_tb * nhkv, n_sg = (n_kv + SEG - 1) / SEG, nq_max = QB * group;                    \
    const int64_t part_floats = nq_max * (dv + 2);             /* acc, max, sum of one (item, segment) */     \
    (void)q, (void)k, (void)v, (void)mask, (void)es, (void)d, (void)qs0, (void)qs1, (void)ks0, (void)ks1, (void)vs0,   \
        (void)vs1, (void)vs2, (void)ms0, (void)scale, (void)out, (void)os0, (void)os1, (void)items

/* one wave of work items: its first item, its partial results, the segments' merge order */
typedef struct {
    const int64_t *a; int64_t w0; float *part; const int64_t *order;
    const int8_t *qq; const float *qd; const int32_t *qh;   /* q8_0: the queries quantized (kvg_quantize_q8) */
    int64_t nw;                                             /* q8_0: the wave's items */
} attn_wave;

/* tasks task0 .. task1 - 1 of a wave: (item, segment) pairs, each item's segments side by side */
static inline __attribute__((always_inline)) void attn_tasks(const attn_wave *wv, int64_t task0, int64_t task1,
                                                             const int H) {
    ATTN_ARGS(wv->a);
    const int64_t w0 = wv->w0;
    float *part = wv->part;
    float *kt = malloc(sizeof(float) * (size_t)(d * KC));
    int64_t lq[nq_max];
    for (int64_t task = task0; task < task1; task++) {
        const int64_t it = w0 + task / n_sg, sg = task % n_sg;
        const int64_t tb = n_tb - 1 - it / nhkv, j = it % nhkv;   /* the longest (latest) blocks first */
        const int64_t t0 = tb * QB, nt = n - t0 < QB ? n - t0 : QB, nq = nt * group;
        float *acc = part + task * part_floats, *mx = acc + nq_max * dv, *sum = mx + nq_max;
        for (int64_t i = 0; i < nq * dv; i++) acc[i] = 0.0f;
        for (int64_t i = 0; i < nq; i++) mx[i] = -INFINITY, sum[i] = 0.0f;
        const int64_t c_end = (sg + 1) * SEG < n_kv ? (sg + 1) * SEG : n_kv;
        for (int64_t c0 = sg * SEG; c0 < c_end; c0 += KC) {
            const int64_t nc = c_end - c0 < KC ? c_end - c0 : KC;
            int64_t nlq = 0;           /* the queries whose token sees a cell of the chunk (a batch's tokens each
                                          see their own sequence's pages): only they are scored */
            for (int64_t tt = 0; tt < nt; tt++) {
                const float *m = mask + (t0 + tt) * ms0 + c0;
                int64_t c = 0;
                while (c < nc && m[c] == -INFINITY) c++;
                for (int64_t g = 0; c < nc && g < group; g++) lq[nlq++] = tt * group + g;
            }
            if (!nlq) continue;
            if (c0 + KC < c_end) {   /* the next chunk's K and V rows stream in while this one is computed */
                const int64_t nn = c_end - c0 - KC < KC ? c_end - c0 - KC : KC;
                prefetch_rows((const char *)k + es * ((c0 + KC) * ks0 + j * ks1), es * ks0, nn, es * d);
                prefetch_rows((const char *)v + es * ((c0 + KC) * vs0 + j * vs1), es * vs0, nn, es * dv);
            }
            transpose_chunk(kt, (const char *)k + es * (c0 * ks0 + j * ks1), ks0, nc, d, H);
            for (int64_t qg = 0; qg < nlq; qg += QG) {
                const int ng = nlq - qg < QG ? (int)(nlq - qg) : QG;
                float sc[QG][KC], *live_acc[QG];
                const float *qv[QG], *live_p[QG];
                int nl = 0;
                for (int g = 0; g < ng; g++) {
                    const int64_t qi = lq[qg + g], t = t0 + qi / group, h = j * group + qi % group;
                    qv[g] = q + t * qs0 + h * qs1;
                }
                chunk_scores_multi(sc, qv, ng, kt, d);
                for (int g = 0; g < ng; g++) {
                    const int64_t qi = lq[qg + g], t = t0 + qi / group;
                    float *acq = acc + qi * dv;
                    if (!softmax_chunk(sc[g], mask + t * ms0 + c0, nc, scale, &mx[qi], &sum[qi], acq, dv)) continue;
                    live_acc[nl] = acq;
                    live_p[nl++] = sc[g];
                }
                chunk_pv_multi(live_acc, live_p, nl, nc, (const char *)v + es * (c0 * vs0 + j * vs1), vs0, dv,
                               vs2, H);
            }
        }
    }
    free(kt);
}

static void attn_tasks_f32(void *wv, int64_t t0, int64_t t1) { attn_tasks(wv, t0, t1, 0); }
static void attn_tasks_f16(void *wv, int64_t t0, int64_t t1) { attn_tasks(wv, t0, t1, 1); }

/* merge each query's segments in their order: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M) */
static void attn_merge(void *wave, int64_t iw0, int64_t iw1) {
    const attn_wave *wv = wave;
    ATTN_ARGS(wv->a);
    const int64_t w0 = wv->w0, *order = wv->order;
    const float *part = wv->part;
    for (int64_t iw = iw0; iw < iw1; iw++) {
        const int64_t it = w0 + iw, tb = n_tb - 1 - it / nhkv, j = it % nhkv;
        const int64_t t0 = tb * QB, nt = n - t0 < QB ? n - t0 : QB, nq = nt * group;
        const float *p0 = part + iw * n_sg * part_floats;
        for (int64_t qi = 0; qi < nq; qi++) {
            const int64_t t = t0 + qi / group, h = j * group + qi % group;
            float *o = out + t * os0 + h * os1;
            float m = -INFINITY, l = 0.0f;
            for (int64_t sg = 0; sg < n_sg; sg++) {
                const float ms = p0[sg * part_floats + nq_max * dv + qi];
                m = ms > m ? ms : m;
            }
            for (int64_t e = 0; e < dv; e++) o[e] = 0.0f;
            if (m == -INFINITY) continue;                  /* no cell visible: zeros */
            for (int64_t i = 0; i < n_sg; i++) {
                const float *ps = p0 + order[i] * part_floats;
                const float ms = ps[nq_max * dv + qi];
                if (ms == -INFINITY) continue;
                const float r = expf(ms - m);
                l += ps[nq_max * dv + nq_max + qi] * r;
                for (int64_t e = 0; e < dv; e++) o[e] += ps[qi * dv + e] * r;
            }
            const float inv = 1.0f / l;
            for (int64_t e = 0; e < dv; e++) o[e] *= inv;
        }
    }
}

/* ---- attention over a q8_0 KV cache (ggml's Q8_0 blocks: float16 d, 32 int8 q, along each head's dims) ----
 * The same tasks, segments and online softmax as attn_tasks, with the query quantized to int8 blocks once
 * per call (kvg_quantize_q8) and its scores taken with the Q8 matmul's integer dot products: each chunk's
 * keys are repacked, 16 cells at a time, into the Q8 tile layout (chunk vector c: bytes 4c..4c+3 of each
 * cell's block, then the cells' float16 scales) that tile_dot multiplies by up to four queries at once. V
 * rows are read block by block: acc += (p d) q, the int8 values converted to float. A query's sums run in
 * the same order whatever queries share its group, so results do not depend on the ubatch or batch mates. */
#define Q8B 34                  /* bytes per Q8_0 block */
#define QG8 4                   /* queries per tile_dot */
#define KT_TILES (KC / TR)      /* tiles of a chunk */
#define Q8_MAX_BLOCKS 32        /* head dims up to 1024 */
static const uint8_t zero_block_row[Q8B * Q8_MAX_BLOCKS];

/* tiles of the cells [0, nc) of a chunk of a q8_0 K (cell c's blocks at k + c * ks0 bytes), g_n blocks per head */
static void pack_k_tiles(uint8_t *kt, const uint8_t *k, int64_t ks0, int64_t nc, int64_t g_n) {
    for (int64_t r0 = 0; r0 < nc; r0 += TR) {
        const uint8_t *row[TR];
        for (int r = 0; r < TR; r++) row[r] = r0 + r < nc ? k + (r0 + r) * ks0 : zero_block_row;
        for (int64_t g = 0; g < g_n; g++) {
            uint8_t *rec = kt + ((r0 / TR) * g_n + g) * REC(F_Q8);
            for (int r = 0; r < TR; r++) memcpy(rec + DOFF(F_Q8) + 2 * r, row[r] + Q8B * g, 2);
#if KVG_AVX2
            for (int h = 0; h < 2; h++) {      /* 8 cells' 8 words -> word i of the 8 cells: an 8 x 8 transpose */
                __m256 x[8];
                for (int i = 0; i < 8; i++)
                    x[i] = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(row[8 * h + i] + Q8B * g + 2)));
                transpose8_ps(x);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps((float *)(rec + 64 * i + 32 * h), x[i]);
            }
#else
            for (int c = 0; c < 8; c++)
                for (int r = 0; r < TR; r++) memcpy(rec + 64 * c + 4 * r, row[r] + Q8B * g + 2 + 4 * c, 4);
#endif
        }
    }
}

/* res[16 j + r] = score of tile row r against query j < mb (tile_dot specialized per count) */
static void q8_tile_scores(const uint8_t *t, int64_t g_n, const int8_t *xq, int64_t d, const float *xd,
                           const int32_t *xh, int mb, float *res) {
    switch (mb) {
    case 1: tile_dot(t, g_n, xq, d, xd, xd, xh, F_Q8, 1, res); break;
    case 2: tile_dot(t, g_n, xq, d, xd, xd, xh, F_Q8, 2, res); break;
    case 3: tile_dot(t, g_n, xq, d, xd, xd, xh, F_Q8, 3, res); break;
    default: tile_dot(t, g_n, xq, d, xd, xd, xh, F_Q8, 4, res); break;
    }
}

/* acc[g][e] += p[g][c] d_c,b q_c[e] over the chunk's cells in order (a query's cells with p == 0 skipped),
 * block b by block; V rows vs0 bytes apart, blocks contiguous */
static inline __attribute__((always_inline)) void chunk_pv_q8(float *const *acc, const float *const *p, int ng,
                                                              int64_t nc, const uint8_t *v, int64_t vs0, int64_t dv) {
    for (int64_t b = 0; b < dv / QK; b++) {
#if KVG_AVX512
        __m512 r[QG8][2];
        for (int g = 0; g < ng; g++)
            for (int i = 0; i < 2; i++) r[g][i] = _mm512_loadu_ps(acc[g] + QK * b + 16 * i);
        for (int64_t c = 0; c < nc; c++) {
            const uint8_t *blk = v + c * vs0 + Q8B * b;
            const float dsc = ld_f16(blk, 0);
            const __m512 x0 = cvt_i8(blk + 2), x1 = cvt_i8(blk + 18);
            for (int g = 0; g < ng; g++) {
                if (p[g][c] == 0.0f) continue;
                const __m512 w = _mm512_set1_ps(p[g][c] * dsc);
                r[g][0] = _mm512_fmadd_ps(w, x0, r[g][0]);
                r[g][1] = _mm512_fmadd_ps(w, x1, r[g][1]);
            }
        }
        for (int g = 0; g < ng; g++)
            for (int i = 0; i < 2; i++) _mm512_storeu_ps(acc[g] + QK * b + 16 * i, r[g][i]);
#elif KVG_AVX2
        for (int g0 = 0; g0 < ng; g0 += 2) {     /* two queries' 4 registers each at a time */
            const int gn = ng - g0 < 2 ? ng - g0 : 2;
            __m256 r[2][4];
            for (int g = 0; g < gn; g++)
                for (int i = 0; i < 4; i++) r[g][i] = _mm256_loadu_ps(acc[g0 + g] + QK * b + 8 * i);
            for (int64_t c = 0; c < nc; c++) {
                const uint8_t *blk = v + c * vs0 + Q8B * b;
                const float dsc = ld_f16(blk, 0);
                __m256 x[4];
                for (int i = 0; i < 4; i++) x[i] = cvt_i8x8(blk + 2 + 8 * i);
                for (int g = 0; g < gn; g++) {
                    if (p[g0 + g][c] == 0.0f) continue;
                    const __m256 w = _mm256_set1_ps(p[g0 + g][c] * dsc);
                    for (int i = 0; i < 4; i++) r[g][i] = _mm256_fmadd_ps(w, x[i], r[g][i]);
                }
            }
            for (int g = 0; g < gn; g++)
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(acc[g0 + g] + QK * b + 8 * i, r[g][i]);
        }
#else
        for (int64_t c = 0; c < nc; c++) {
            const uint8_t *blk = v + c * vs0 + Q8B * b;
            const float dsc = ld_f16(blk, 0);
            for (int g = 0; g < ng; g++) {
                if (p[g][c] == 0.0f) continue;
                const float w = p[g][c] * dsc;
                float *o = acc[g] + QK * b;
                for (int e = 0; e < QK; e++) o[e] += w * (float)(int8_t)blk[2 + e];
            }
        }
#endif
    }
}

/* Tasks go segment by segment, each segment's items (KV heads) one after another: the rows of 34-byte blocks
 * of neighbouring heads share cache lines, which the next head then finds in cache (item by item, as
 * attn_tasks goes, every line would come from memory twice). nw: the wave's items. */
static void attn_tasks_q8(void *wave, int64_t task0, int64_t task1) {
    const attn_wave *wv = wave;
    ATTN_ARGS(wv->a);
    const int64_t w0 = wv->w0, g_n = d / QK, nw = items - w0 < wv->nw ? items - w0 : wv->nw;
    float *part = wv->part;
    uint8_t *kt = malloc((size_t)(KT_TILES * g_n * REC(F_Q8)));
    int64_t lq[nq_max];
    int8_t xq[QG8 * QK * Q8_MAX_BLOCKS];
    float xd[QG8 * Q8_MAX_BLOCKS];
    int32_t xh[QG8 * 2 * Q8_MAX_BLOCKS];
    for (int64_t task = task0; task < task1; task++) {
        const int64_t iw = task % nw, it = w0 + iw, sg = task / nw;
        const int64_t tb = n_tb - 1 - it / nhkv, j = it % nhkv;   /* the longest (latest) blocks first */
        const int64_t t0 = tb * QB, nt = n - t0 < QB ? n - t0 : QB, nq = nt * group;
        float *acc = part + (iw * n_sg + sg) * part_floats, *mx = acc + nq_max * dv, *sum = mx + nq_max;
        for (int64_t i = 0; i < nq * dv; i++) acc[i] = 0.0f;
        for (int64_t i = 0; i < nq; i++) mx[i] = -INFINITY, sum[i] = 0.0f;
        const int64_t c_end = (sg + 1) * SEG < n_kv ? (sg + 1) * SEG : n_kv;
        for (int64_t c0 = sg * SEG; c0 < c_end; c0 += KC) {
            const int64_t nc = c_end - c0 < KC ? c_end - c0 : KC;
            int64_t nlq = 0;
            for (int64_t tt = 0; tt < nt; tt++) {
                const float *m = mask + (t0 + tt) * ms0 + c0;
                int64_t c = 0;
                while (c < nc && m[c] == -INFINITY) c++;
                for (int64_t g = 0; c < nc && g < group; g++) lq[nlq++] = tt * group + g;
            }
            if (!nlq) continue;
            if (c0 + KC < c_end) {
                const int64_t nn = c_end - c0 - KC < KC ? c_end - c0 - KC : KC;
                prefetch_rows((const char *)k + (c0 + KC) * ks0 + j * ks1, ks0, nn, Q8B * g_n);
                prefetch_rows((const char *)v + (c0 + KC) * vs0 + j * vs1, vs0, nn, Q8B * (dv / QK));
            }
            pack_k_tiles(kt, (const uint8_t *)k + c0 * ks0 + j * ks1, ks0, nc, g_n);
            for (int64_t qg = 0; qg < nlq; qg += QG8) {
                const int ng = nlq - qg < QG8 ? (int)(nlq - qg) : QG8;
                float sc[QG8][KC], res[QG8 * TR], *live_acc[QG8];
                const float *live_p[QG8];
                int nl = 0;
                for (int g = 0; g < ng; g++) {      /* the group's quantized queries, side by side */
                    const int64_t qi = lq[qg + g], t = t0 + qi / group, h = j * group + qi % group, row = t * nh + h;
                    memcpy(xq + g * d, wv->qq + row * d, (size_t)d);
                    memcpy(xd + g * g_n, wv->qd + row * g_n, sizeof(float) * (size_t)g_n);
                    memcpy(xh + g * 2 * g_n, wv->qh + row * 2 * g_n, sizeof(int32_t) * (size_t)(2 * g_n));
                }
                for (int64_t r0 = 0; r0 < nc; r0 += TR) {
                    q8_tile_scores(kt + (r0 / TR) * g_n * REC(F_Q8), g_n, xq, d, xd, xh, ng, res);
                    for (int g = 0; g < ng; g++) memcpy(sc[g] + r0, res + TR * g, sizeof(float) * TR);
                }
                for (int g = 0; g < ng; g++) {
                    const int64_t qi = lq[qg + g], t = t0 + qi / group;
                    float *acq = acc + qi * dv;
                    if (!softmax_chunk(sc[g], mask + t * ms0 + c0, nc, scale, &mx[qi], &sum[qi], acq, dv)) continue;
                    live_acc[nl] = acq;
                    live_p[nl++] = sc[g];
                }
                if (nl) chunk_pv_q8(live_acc, live_p, nl, nc, (const uint8_t *)v + c0 * vs0 + j * vs1, vs0, dv);
            }
        }
    }
    free(kt);
}

static void attention(const int64_t *a) {
    ATTN_ARGS(a);
    int64_t wave = (int64_t)(PART_BYTES / sizeof(float)) / (part_floats * n_sg);
    const int64_t min_wave = (WAVE_TASKS * kvg_threads() + n_sg - 1) / n_sg;   /* enough tasks to share out */
    wave = wave < min_wave ? min_wave : wave;
    wave = wave < 1 ? 1 : wave > items ? items : wave;
    float *part = scratch_floats((size_t)(wave * n_sg * part_floats));
    const int32_t *pages = (const int32_t *)a[23];
    int64_t order[n_sg];                        /* segments in merge order: by block, else window order */
    for (int64_t i = 0; i < n_sg; i++) {
        int64_t j = i;
        for (; pages && j > 0 && pages[order[j - 1]] > pages[i]; j--) order[j] = order[j - 1];
        order[j] = i;
    }
    int8_t *qq = NULL;      /* q8_0: each (token, head) query as int8 blocks, d / QK scales, half-block sums */
    float *qd = NULL, *qsum = NULL;
    int32_t *qh = NULL;
    if (a[22] == 2) {
        const int64_t g_n = d / QK;
        qq = malloc((size_t)(n * nh * d));
        qd = malloc(sizeof(float) * (size_t)(n * nh * g_n));
        qsum = malloc(sizeof(float) * (size_t)(n * nh * g_n));
        qh = malloc(sizeof(int32_t) * (size_t)(n * nh * 2 * g_n));
        for (int64_t t = 0; t < n; t++) {
            const int64_t r = t * nh, qa[8] = {(int64_t)(q + t * qs0), nh, d, qs1, (int64_t)(qq + r * d),
                                               (int64_t)(qd + r * g_n), (int64_t)(qsum + r * g_n), (int64_t)(qh + r * 2 * g_n)};
            kvg_quantize_q8(qa);
        }
    }
    for (int64_t w0 = 0; w0 < items; w0 += wave) {
        const int64_t nw = items - w0 < wave ? items - w0 : wave;
        attn_wave wv = {a, w0, part, order, qq, qd, qh, nw};
        parallel_for(nw * n_sg, 1, a[22] == 2 ? attn_tasks_q8 : a[22] ? attn_tasks_f16 : attn_tasks_f32, &wv);
        parallel_for(nw, 1, attn_merge, &wv);
    }
    free(qq), free(qd), free(qsum), free(qh);
}

/* a[22]: K and V are float16 (1) or q8_0 blocks (2: strides in bytes, d and dv multiples of 32, at most 1024) */
void kvg_attention(const int64_t *a) { attention(a); }

/* a: x, y, out, n, k:  out = x + y (contiguous; k 0: y as long as x, else y one row of k added to each of
 * x's n / k rows, a bias) */
void kvg_add(const int64_t *a) {
    const float *x = (const float *)a[0], *y = (const float *)a[1];
    float *o = (float *)a[2];
    const int64_t n = a[3], k = a[4];
    if (!k) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = x[i] + y[i];
        return;
    }
    for (int64_t r = 0; r < n; r += k) {
#pragma omp simd
        for (int64_t i = 0; i < k; i++) o[r + i] = x[r + i] + y[i];
    }
}

/* a: n_parts, then per part src, dst, A, B, C, src_s0, src_s1, dst_s0, dst_s1 (floats): dst[i, j, :C] =
 * src[i, j, :C], rows C floats long (a view made contiguous, the two halves of a concatenation). */
void kvg_copy(const int64_t *a) {
    for (int64_t p = 0; p < a[0]; p++) {
        const int64_t *q = a + 1 + 9 * p;
        const float *src = (const float *)q[0];
        float *dst = (float *)q[1];
        for (int64_t i = 0; i < q[2]; i++)
            for (int64_t j = 0; j < q[3]; j++)
                memcpy(dst + i * q[7] + j * q[8], src + i * q[5] + j * q[6], sizeof(float) * (size_t)q[4]);
    }
}

/* A row lookup's row r of out [n, k]: 0 (row zeroed, the id counted as bad; see in_range) when ids[r] is out
 * of range, else 1 */
static inline int row_wanted(const int32_t *ids, int64_t r, int64_t n_rows, float *out, int64_t k) {
    if (in_range(ids[r], n_rows)) return 1;
    memset(out + r * k, 0, (size_t)k * sizeof(float));
    return 0;
}

/* a: raw Q8_0 rows (uint8, row_bytes apart), row_bytes, ids (int32 [n]), n, K, out (float [n, K]), n_rows:
 * the embedding rows of this ubatch's tokens, dequantized exactly as gguf does (float(d) * q). */
void kvg_get_rows_q8_0(const int64_t *a) {
    const uint8_t *raw = (const uint8_t *)a[0];
    const int64_t rb = a[1], n = a[3], k = a[4], n_rows = a[6];
    const int32_t *ids = (const int32_t *)a[2];
    float *out = (float *)a[5];
    for (int64_t i = 0; i < n; i++) {
        if (!row_wanted(ids, i, n_rows, out, k)) continue;
        const uint8_t *row = raw + (int64_t)ids[i] * rb;
        for (int64_t g = 0; g < k / QK; g++) {
            const uint8_t *blk = row + g * 34;
            const float d = h2f((uint16_t)(blk[0] | blk[1] << 8));
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int e = 0; e < QK; e++) out[i * k + g * QK + e] = d * (float)q[e];
        }
    }
}

/* a: tiles (uint8), format (F_*), tile stride (bytes), K, ids (int32 [n]), n, out (float [n, K]), n_rows:
 * the embedding rows of this ubatch's tokens read back out of a weight's tiles (a tied embedding keeps no
 * second copy, and its file pages are never touched again). Only for formats that hold the file's values
 * exactly; each value is computed in gguf's order (-std=c11: no contraction into fma). */
static inline int tile_q(const uint8_t *rec, int c, int b, const int F) {
    if (F == F_Q8) return (int8_t)rec[c * 64 + b];
    int q = c < 4 ? rec[c * 64 + b] & 15 : rec[(c - 4) * 64 + b] >> 4;
    if (FIFTH(F)) q |= ((rec[256 + c * 8 + b / 8] >> (b % 8)) & 1) << 4;
    if (F == F_Q6K) q |= ((rec[256 + (c / 4) * 64 + b] >> (2 * (c % 4))) & 3) << 4;
    return q;
}

static inline void tile_row(const uint8_t *tile, int64_t k, int i, float *out, const int F) {
    for (int64_t g = 0; g < k / QK; g++) {
        const uint8_t *rec = rec_at(tile, g, F), *hdr = KQ(F) ? hdr_at(tile, g, F) : NULL;
        for (int e = 0; e < QK; e++) {
            const float q = (float)tile_q(rec, e / 4, 4 * i + e % 4, F);
            float w;
            if (F == F_Q6K) {
                const float d = ld_f16(hdr, i) * (float)(int8_t)rec[384 + (e / 16) * 16 + i];
                w = d * (q - 32.0f);
            } else if (KQ(F)) {
                const float d = ld_f16(hdr, i) * (float)rec[KSC(F) + i], m = ld_f16(hdr, 16 + i) * (float)rec[KSC(F) + 16 + i];
                w = d * q - m;
            } else if (F == F_Q8) {
                w = q * ld_f16(rec + DOFF(F), i);
            } else if (F == F_Q4F) {
                float d, m;
                memcpy(&d, rec + DOFF(F) + 4 * i, 4);
                memcpy(&m, rec + MOFF(F) + 4 * i, 4);
                w = q * d + m;
            } else {
                w = q * ld_f16(rec + DOFF(F), i) + ld_f16(rec + MOFF(F), i);
            }
            out[g * QK + e] = w;
        }
    }
}

static inline void tile_rows(const int64_t *a, const int F) {
    const uint8_t *tiles = (const uint8_t *)a[0];
    const int64_t stride = a[2], k = a[3], n = a[5], n_rows = a[7];
    const int32_t *ids = (const int32_t *)a[4];
    float *out = (float *)a[6];
    for (int64_t r = 0; r < n; r++) {
        if (!row_wanted(ids, r, n_rows, out, k)) continue;
        tile_row(tiles + (ids[r] / TR) * stride, k, ids[r] % TR, out + r * k, F);
    }
}

void kvg_tile_rows(const int64_t *a) {
    switch (a[1]) {
    case F_Q4H: tile_rows(a, F_Q4H); break;
    case F_Q4F: tile_rows(a, F_Q4F); break;
    case F_Q5H: tile_rows(a, F_Q5H); break;
    case F_Q8: tile_rows(a, F_Q8); break;
    case F_Q4K: tile_rows(a, F_Q4K); break;
    case F_Q5K: tile_rows(a, F_Q5K); break;
    default: tile_rows(a, F_Q6K); break;
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

/* a: x, w, out, M, K, s, P:  out[m, k] = x[m, k] * w[k]  (w 0: out = x * s, with s in a[5] as f64 bits; P > 0:
 * w holds one value per row, out[m, k] = x[m, k] * w[m % P], a scale per head) */
void kvg_mul_rows(const int64_t *a) {
    const float *x = (const float *)a[0], *w = (const float *)a[1];
    float *o = (float *)a[2];
    const int64_t m_rows = a[3], k = a[4], per_row = a[6];
    const float s = f_arg(a[5]);
    for (int64_t m = 0; m < m_rows; m++) {
        if (per_row) {
            const float wm = w[m % per_row];
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[m * k + i] = x[m * k + i] * wm;
        } else if (w) {
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[m * k + i] = x[m * k + i] * w[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < k; i++) o[m * k + i] = x[m * k + i] * s;
        }
    }
}

/* ---- checksums ---------------------------------------------------------------------------------------------
 * A 64-bit checksum of a byte range at memory speed (the repacked-weights cache verifies GBs with it at each
 * load): each CHECK_CHUNK bytes hashed in eight xxh64-style lanes by the pool's threads, then the chunks'
 * hashes in order. Plain integer code: the same value on every ISA build and thread count. Not
 * cryptographic: it tells a damaged file, not a forged one. */
#define CHECK_CHUNK (1 << 20)
#define P64_1 0x9E3779B185EBCA87ull
#define P64_2 0xC2B2AE3D27D4EB4Full

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint64_t mix64(uint64_t h) {
    h ^= h >> 33, h *= P64_2, h ^= h >> 29, h *= P64_1, h ^= h >> 32;
    return h;
}

static uint64_t checksum_bytes(const uint8_t *p, int64_t n, uint64_t seed) {
    uint64_t acc[8];
    for (int i = 0; i < 8; i++) acc[i] = seed + (uint64_t)i * P64_1;
    int64_t at = 0;
    for (; at + 64 <= n; at += 64) {
        uint64_t w[8];
        memcpy(w, p + at, 64);
#pragma omp simd
        for (int i = 0; i < 8; i++) acc[i] = rotl64(acc[i] + w[i] * P64_2, 31) * P64_1;
    }
    uint8_t tail[64] = {0};
    memcpy(tail, p + at, (size_t)(n - at));
    uint64_t w[8];
    memcpy(w, tail, 64);
    uint64_t h = (uint64_t)n * P64_1;
    for (int i = 0; i < 8; i++) h = mix64(h ^ rotl64(acc[i] + w[i] * P64_2, 31) * P64_1);
    return h;
}

typedef struct { const uint8_t *p; int64_t n; uint64_t *chunk_hash; } checksum_job;

static void checksum_chunks(void *ctx, int64_t c0, int64_t c1) {
    const checksum_job *j = (const checksum_job *)ctx;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t at = c * CHECK_CHUNK, len = j->n - at < CHECK_CHUNK ? j->n - at : CHECK_CHUNK;
        j->chunk_hash[c] = checksum_bytes(j->p + at, len, (uint64_t)c);
    }
}

/* a: data, n bytes, chunk hashes (uint64 [ceil(n / CHECK_CHUNK)], scratch), out (uint64 [1]) */
void kvg_checksum(const int64_t *a) {
    checksum_job j = {(const uint8_t *)a[0], a[1], (uint64_t *)a[2]};
    const int64_t n_chunks = (j.n + CHECK_CHUNK - 1) / CHECK_CHUNK;
    parallel_for(n_chunks, 1, checksum_chunks, &j);
    *(uint64_t *)a[3] = checksum_bytes((const uint8_t *)j.chunk_hash, n_chunks * 8, (uint64_t)j.n);
}

/* ---- weight packing ----------------------------------------------------------------------------------------
 * A GGUF matrix's rows (raw blocks) -> its tiles, the same bytes as the numpy packers in __init__.py make
 * (pack_blocks, pack_kquant; the layouts are described there and at the matmul kernels), at memory speed:
 * a 1B model's 800 MB were 9 s in numpy. Rows past the matrix's end are packed as zero blocks, as numpy pads
 * them. Q4_0 / Q5_0 keep m = -8 d / -16 d as float16: where that is not exact the kernel says so (out flag)
 * and the caller packs float32 scales instead. */
enum { P_Q4_0, P_Q4_1, P_Q5_0, P_Q5_1, P_Q8_0, P_Q4_K, P_Q5_K, P_Q6_K };

typedef struct {
    const uint8_t *raw; int64_t n, k, ld, type; uint8_t *out; int64_t out_ld; const uint8_t *zero;
    _Atomic int64_t inexact;
} pack_job;

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static void pack_block_row(const uint8_t *row, int i, int64_t g_count, int type, uint8_t *o, pack_job *j) {
    static const int size[] = {18, 20, 22, 24, 34}, qs_at[] = {2, 4, 6, 8, 2};
    const int bs = size[type], qa = qs_at[type];
    const int rec = type == P_Q8_0 ? 544 : type <= P_Q4_1 ? 320 : 384;
    const int n_words = type == P_Q8_0 ? 8 : 4, scales_at = n_words * 64 + (type >= P_Q5_0 && type <= P_Q5_1 ? 64 : 0);
    for (int64_t g = 0; g < g_count; g++) {
        const uint8_t *b = row + g * bs;
        uint8_t *r = o + g * rec;
        for (int w = 0; w < n_words; w++) memcpy(r + w * 64 + 4 * i, b + qa + 4 * w, 4);
        put16(r + scales_at + 2 * i, get16(b));
        if (type == P_Q8_0) continue;
        uint16_t m;
        if (type == P_Q4_1 || type == P_Q5_1) m = get16(b + 2);
        else {
            const float want = (type == P_Q4_0 ? -8.0f : -16.0f) * h2f(get16(b));
            m = f2h(want);
            if (!(h2f(m) == want)) atomic_store(&j->inexact, 1);
        }
        put16(r + scales_at + 32 + 2 * i, m);
        if (type == P_Q5_0 || type == P_Q5_1) {
            uint32_t qh;
            memcpy(&qh, b + (type == P_Q5_0 ? 2 : 4), 4);
            for (int c = 0; c < 8; c++) {        /* chunk vector c: bits 4i..4i+3 = fifth bits of weights 4c..4c+3 */
                uint64_t word;
                memcpy(&word, r + 256 + 8 * c, 8);
                word |= (uint64_t)((qh >> (4 * c)) & 15) << (4 * i);
                memcpy(r + 256 + 8 * c, &word, 8);
            }
        }
    }
}

/* A K-quant super-block's 256 values q (0..15 / 0..31 / 0..63) and its scales, from its raw block. */
static void kquant_values(const uint8_t *b, int type, uint8_t q[256], uint8_t sc[16], uint8_t mn[8]) {
    if (type == P_Q6_K) {
        for (int h = 0; h < 2; h++)               /* weight 128 h + 32 jq + l */
            for (int jq = 0; jq < 4; jq++) {
                const uint8_t *ql = b + h * 64 + 32 * (jq & 1), *qh = b + 128 + h * 32;
                const int lo_shift = 4 * (jq >> 1), hi_shift = 2 * jq;
                uint8_t *qq = q + 128 * h + 32 * jq;
#pragma omp simd
                for (int l = 0; l < 32; l++)
                    qq[l] = (uint8_t)(((ql[l] >> lo_shift) & 15) | (((qh[l] >> hi_shift) & 3) << 4));
            }
        memcpy(sc, b + 192, 16);
        return;
    }
    const uint8_t *s = b + 4, *qs = b + (type == P_Q4_K ? 16 : 48);
    for (int j = 0; j < 8; j++) {
        if (j < 4) sc[j] = s[j] & 63, mn[j] = s[j + 4] & 63;
        else sc[j] = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        for (int l = 0; l < 32; l++) {
            uint8_t v = (qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 15;
            if (type == P_Q5_K) v |= ((b[16 + l] >> j) & 1) << 4;
            q[32 * j + l] = v;
        }
    }
}

static void pack_kquant_row(const uint8_t *row, int i, int64_t nb, int type, uint8_t *o) {
    const int rec = type == P_Q4_K ? 288 : type == P_Q5_K ? 352 : 416, hdr = type == P_Q6_K ? 32 : 64;
    const int bs = type == P_Q4_K ? 144 : type == P_Q5_K ? 176 : 210;
    uint8_t q[256], sc[16], mn[8];
    for (int64_t sb = 0; sb < nb; sb++) {
        const uint8_t *b = row + sb * bs;
        uint8_t *h = o + sb * (hdr + 8 * rec);
        kquant_values(b, type, q, sc, mn);
        if (type == P_Q6_K) put16(h + 2 * i, get16(b + 208));
        else put16(h + 2 * i, get16(b)), put16(h + 32 + 2 * i, get16(b + 2));
        for (int j = 0; j < 8; j++) {
            uint8_t *r = h + hdr + j * rec;
            const uint8_t *qg = q + 32 * j;
            for (int jj = 0; jj < 4; jj++)
                for (int e = 0; e < 4; e++)
                    r[jj * 64 + 4 * i + e] = (uint8_t)((qg[4 * jj + e] & 15) | (qg[16 + 4 * jj + e] & 15) << 4);
            if (type == P_Q6_K) {
                for (int p = 0; p < 2; p++)
                    for (int e = 0; e < 4; e++) {
                        uint8_t v = 0;
                        for (int u = 0; u < 4; u++) v |= (uint8_t)((qg[4 * (4 * p + u) + e] >> 4) << (2 * u));
                        r[256 + p * 64 + 4 * i + e] = v;
                    }
                r[384 + i] = sc[2 * j], r[400 + i] = sc[2 * j + 1];
                continue;
            }
            int at = 256;
            if (type == P_Q5_K) {
                for (int c = 0; c < 8; c++) {
                    uint64_t word;
                    memcpy(&word, r + 256 + 8 * c, 8);
                    for (int e = 0; e < 4; e++) word |= (uint64_t)((qg[4 * c + e] >> 4) & 1) << (4 * i + e);
                    memcpy(r + 256 + 8 * c, &word, 8);
                }
                at = 320;
            }
            r[at + i] = sc[j], r[at + 16 + i] = mn[j];
        }
    }
}

static void pack_tiles(void *ctx, int64_t t0, int64_t t1) {
    pack_job *j = (pack_job *)ctx;
    const int type = (int)j->type;
    for (int64_t t = t0; t < t1; t++) {
        uint8_t *o = j->out + t * j->out_ld;
        memset(o, 0, (size_t)j->out_ld);               /* bit planes are OR-ed in */
        for (int i = 0; i < TR; i++) {
            const int64_t r = t * TR + i;
            const uint8_t *row = r < j->n ? j->raw + r * j->ld : j->zero;
            if (type <= P_Q8_0) pack_block_row(row, i, j->k / 32, type, o, j);
            else pack_kquant_row(row, i, j->k / 256, type, o);
        }
    }
}

/* a: raw rows (a GGUF K-quant table: Q4_K, Q5_K or Q6_K blocks), row stride (bytes), P_* type, K, ids (int32
 * [n]), n, out (float [n, K]), n_rows. The rows of this ubatch's tokens, each packed alone into a tile and read
 * back out of it: the tiles hold the file's own numbers, so the values are gguf's. An untied embedding's
 * lookup in C, with no copy of the table. */
void kvg_kquant_rows(const int64_t *a) {
    const uint8_t *raw = (const uint8_t *)a[0];
    const int64_t ld = a[1], type = a[2], k = a[3], n = a[5], n_rows = a[7];
    const int32_t *ids = (const int32_t *)a[4];
    float *out = (float *)a[6];
    const int F = type == P_Q4_K ? F_Q4K : type == P_Q5_K ? F_Q5K : F_Q6K;
    const size_t tb = (size_t)(k / 256) * (size_t)(HDR(F) + 8 * REC(F));
    uint8_t *tile = malloc(tb);
    for (int64_t r = 0; r < n; r++) {
        if (!row_wanted(ids, r, n_rows, out, k)) continue;
        if (!tile) {                         /* no memory for one tile: a row of NaNs rather than a wrong row */
            for (int64_t c = 0; c < k; c++) out[r * k + c] = NAN;
            continue;
        }
        memset(tile, 0, tb);                 /* bit planes are OR-ed in */
        pack_kquant_row(raw + (int64_t)ids[r] * ld, 0, k / 256, (int)type, tile);
        if (F == F_Q4K) tile_row(tile, k, 0, out + r * k, F_Q4K);
        else if (F == F_Q5K) tile_row(tile, k, 0, out + r * k, F_Q5K);
        else tile_row(tile, k, 0, out + r * k, F_Q6K);
    }
    free(tile);
}

/* a: raw rows, n, K, raw row stride (bytes), P_* type, out tiles, tile stride (bytes), inexact flag (int64[1]) */
void kvg_pack_tiles(const int64_t *a) {
    pack_job j = {(const uint8_t *)a[0], a[1], a[2], a[3], a[4], (uint8_t *)a[5], a[6], NULL, 0};
    uint8_t *zero = calloc(1, (size_t)j.ld);
    if (!zero) { *(int64_t *)a[7] = -1; return; }
    j.zero = zero;
    parallel_for((j.n + TR - 1) / TR, 1, pack_tiles, &j);
    free(zero);
    *(int64_t *)a[7] = atomic_load(&j.inexact);
}

/* ---- memory bandwidth ----------------------------------------------------------------------------------------
 * A streaming read of a buffer by the pool's threads (what a decode step does to the weights), for the
 * bench's roofline: the sum of its 64-bit words, so the reads cannot be optimised away. */
typedef struct { const uint64_t *p; int64_t n_words; _Atomic uint64_t sum; } stream_job;

static void stream_chunks(void *ctx, int64_t c0, int64_t c1) {
    stream_job *j = (stream_job *)ctx;
    const int64_t w0 = c0 * (CHECK_CHUNK / 8), w1 = c1 * (CHECK_CHUNK / 8) < j->n_words ? c1 * (CHECK_CHUNK / 8)
                                                                                       : j->n_words;
    uint64_t acc[8] = {0};
    int64_t i = w0;
    for (; i + 8 <= w1; i += 8)
#pragma omp simd
        for (int l = 0; l < 8; l++) acc[l] += j->p[i + l];
    for (; i < w1; i++) acc[0] += j->p[i];
    uint64_t s = 0;
    for (int l = 0; l < 8; l++) s += acc[l];
    atomic_fetch_add(&j->sum, s);
}

/* a: data (8-byte aligned), n bytes (a multiple of 8), out (uint64 [1]) */
void kvg_stream_read(const int64_t *a) {
    stream_job j = {(const uint64_t *)a[0], a[1] / 8, 0};
    parallel_for((a[1] + CHECK_CHUNK - 1) / CHECK_CHUNK, 1, stream_chunks, &j);
    *(uint64_t *)a[2] = atomic_load(&j.sum);
}

/* ---- recurrent layers ------------------------------------------------------------------------------------------
 * The ops of Mamba-1, Mamba-2 and the short convolutions (ir.py: ssm_conv, ssm_scan, ssm_scan2), sequence by
 * sequence and channel by channel: what a sequence's rows get never depends on the other sequences of the
 * ubatch or on how its tokens were split (each ubatch continues from the state the previous one wrote). */
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* Whether the n slots of an in-place update are all in range and distinct, checked on the calling thread
 * (in_range's counter is its own): a slot twice would be updated by two tasks at once, so it counts as bad
 * too, and the step (refused) computes nothing. No slots (0): nothing to check. */
static int slots_ok(const int32_t *ids, int64_t n, int64_t n_rows) {
    int ok = 1;
    for (int64_t q = 0; ids && q < n; q++) {
        ok &= in_range(ids[q], n_rows);
        for (int64_t p = 0; p < q; p++)
            if (ids[p] == ids[q]) bad_indices++, ok = 0;
    }
    return ok;
}

/* a: x, S, n (new tokens), d, x_s0 (sequence stride), x_s1 (row stride), w (float [d, k]), k, out, out_s0, out_s1,
 * ids (int32 [S] or 0), n_rows, window, window row stride.
 * out[q, t, c] = sum_j x[q, t + j, c] w[c, j] (x holds k - 1 earlier inputs, then the n new ones), summed in
 * the order of j from 0, so a channel's value does not depend on n. One task per (sequence, block of CONV_CB
 * channels) over all n tokens, with the block's taps transposed first ([j][c]: every load contiguous; even
 * for one token cheaper than taps k floats apart).
 * ids != 0: in place in a recurrent state table. x holds only the n new inputs; sequence q's k - 1 earlier
 * ones are the rows [k - 1, d] at window + ids[q] * (window row stride), and the last k - 1 inputs are
 * written back there (the next step's window) before the block is computed. Output rows go last to first,
 * so out may be the very buffer of x (same layout): the plan gives the new inputs' buffer, dead once a
 * concatenation would have read them, to the convolution's output. */
#define CONV_CB 256
#define CONV_MAX_K 16

/* input row r (of k - 1 + n) of sequence q from channel c0: x's, or in place the window copy's then x's */
static inline const float *conv_input(const int64_t *a, int64_t q, int64_t r, int64_t c0, const float *win) {
    const int64_t k = a[7];
    if (!a[11]) return (const float *)a[0] + q * a[4] + r * a[5] + c0;
    return r < k - 1 ? win + r * CONV_CB : (const float *)a[0] + q * a[4] + (r - (k - 1)) * a[5] + c0;
}

static void conv_blocks(void *ctx, int64_t i0, int64_t i1) {
    const int64_t *a = (const int64_t *)ctx;
    const float *w = (const float *)a[6];
    const int32_t *ids = (const int32_t *)a[11];
    const int64_t n = a[2], d = a[3], k = a[7], os0 = a[9], os1 = a[10];
    const int64_t nb = (d + CONV_CB - 1) / CONV_CB;
    float *out = (float *)a[8];
    float wt[CONV_MAX_K * CONV_CB], win[CONV_MAX_K * CONV_CB];
    for (int64_t it = i0; it < i1; it++) {
        const int64_t q = it / nb, c0 = (it % nb) * CONV_CB, cw = d - c0 < CONV_CB ? d - c0 : CONV_CB;
        float *slot = ids ? (float *)a[13] + (int64_t)ids[q] * a[14] : NULL;
        for (int64_t r = 0; slot && r < k - 1; r++) memcpy(win + r * CONV_CB, slot + r * d + c0, sizeof(float) * cw);
        for (int64_t r = 0; slot && r < k - 1; r++)           /* the next window: the last k - 1 inputs */
            memcpy(slot + r * d + c0, conv_input(a, q, n + r, c0, win), sizeof(float) * cw);
        for (int64_t j = 0; j < k; j++)
            for (int64_t c = 0; c < cw; c++) wt[j * CONV_CB + c] = w[(c0 + c) * k + j];
        for (int64_t t = n - 1; t >= 0; t--) {   /* last row first: out may be x itself (row t reads x rows <= t) */
            float acc[CONV_CB];
            for (int64_t c = 0; c < cw; c++) acc[c] = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                const float *xj = conv_input(a, q, t + j, c0, win), *wj = wt + j * CONV_CB;
#pragma omp simd
                for (int64_t c = 0; c < cw; c++) acc[c] += xj[c] * wj[c];
            }
            memcpy(out + q * os0 + t * os1 + c0, acc, sizeof(float) * (size_t)cw);
        }
    }
}

static void conv_rows(void *ctx, int64_t i0, int64_t i1) {     /* more than CONV_MAX_K taps: (sequence, token) rows */
    const int64_t *a = (const int64_t *)ctx;
    const float *x = (const float *)a[0], *w = (const float *)a[6];
    const int64_t n = a[2], d = a[3], xs0 = a[4], xs1 = a[5], k = a[7], os0 = a[9], os1 = a[10];
    float *out = (float *)a[8];
    for (int64_t it = i0; it < i1; it++) {
        const int64_t q = it / n, t = it % n;
        const float *xr = x + q * xs0 + t * xs1;
        float *o = out + q * os0 + t * os1;
#pragma omp simd
        for (int64_t c = 0; c < d; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++) acc += xr[j * xs1 + c] * w[c * k + j];
            o[c] = acc;
        }
    }
}

void kvg_ssm_conv(const int64_t *a) {
    if (!slots_ok((const int32_t *)a[11], a[1], a[12])) return;
    if (a[7] > CONV_MAX_K)            /* never in place (ops.ssm_conv) */
        parallel_for(a[1] * a[2], 1, conv_rows, (void *)a);
    else
        parallel_for(a[1] * ((a[3] + CONV_CB - 1) / CONV_CB), 1, conv_blocks, (void *)a);
}

/* a: h0 (float [S, s, d]: the state transposed), h0_s0, h0_s1, x, x_s0, x_s1, dt, dt_s0, dt_s1, A (float [d, s]),
 * B, b_s0, b_s1, C, c_s0, c_s1, out (float [S, n + s, d]: y, then the new state), out_s0, out_s1, S, n, d, s,
 * (a[23], a[24]: kvg_ssm_scan2's), ids (int32 [S] or 0), n_rows, A transposed (float [s, d], or 0: kvg_ssm_scan).
 * ids != 0: the scan runs in place in a recurrent state table: sequence q's state is the rows at
 * h0 + ids[q] h0_s0 (h0 then points at the state's first column in the table's row 0) and the new state is
 * written back there, not into out (whose state rows are left alone). Each task reads and writes only its own
 * sequence's channels, and a ubatch's sequences have distinct slots (scan_ids_ok), so the update in place is
 * safe.
 * Mamba-1: per channel, h = exp(softplus(dt) A[c]) h + softplus(dt) x B_t; y_t = h . C_t. */
#define SSM_MAX_STATE 256

/* Where sequence q's old state is read (its rows a[2] apart) and its new state written (rows *dst_s1 apart). */
static inline void scan_state(const int64_t *a, int64_t q, const float **src, float **dst, int64_t *dst_s1) {
    const int32_t *ids = (const int32_t *)a[25];
    if (!ids) {
        *src = (const float *)a[0] + q * a[1];
        *dst = (float *)a[16] + q * a[17] + a[20] * a[18];
        *dst_s1 = a[18];
        return;
    }
    *dst = (float *)a[0] + (int64_t)ids[q] * a[1];
    *src = *dst;
    *dst_s1 = a[2];
}

static int scan_ids_ok(const int64_t *a) { return slots_ok((const int32_t *)a[25], a[19], a[26]); }

static void scan1_channels(void *ctx, int64_t i0, int64_t i1) {
    const int64_t *a = (const int64_t *)ctx;
    const float *x = (const float *)a[3], *dt = (const float *)a[6];
    const float *A = (const float *)a[9], *B = (const float *)a[10], *C = (const float *)a[13];
    float *out = (float *)a[16];
    const int64_t n = a[20], d = a[21], s = a[22];
    float h[SSM_MAX_STATE], da[SSM_MAX_STATE];
    for (int64_t it = i0; it < i1; it++) {                   /* one (sequence, channel) */
        const int64_t q = it / d, c = it % d;
        const float *src;
        float *dst;
        int64_t ds1;
        scan_state(a, q, &src, &dst, &ds1);
        for (int64_t j = 0; j < s; j++) h[j] = src[j * a[2] + c];
        for (int64_t t = 0; t < n; t++) {
            const float sp = softplus(dt[q * a[7] + t * a[8] + c]);
            const float dx = sp * x[q * a[4] + t * a[5] + c];
            const float *bt = B + q * a[11] + t * a[12], *ct = C + q * a[14] + t * a[15];
            for (int64_t j = 0; j < s; j++) da[j] = sp * A[c * s + j];
            int64_t j = 0;
#ifdef VF_W
            for (; j + VF_W <= s; j += VF_W)
                vf_store(h + j, vf_fmadd(vf_exp(vf_load(da + j)), vf_load(h + j), vf_mul(vf_set1(dx), vf_load(bt + j))));
#endif
            for (; j < s; j++) h[j] = expf(da[j]) * h[j] + dx * bt[j];
            out[q * a[17] + t * a[18] + c] = dot_lanes(h, ct, s);
        }
        for (int64_t j = 0; j < s; j++) dst[j * ds1 + c] = h[j];
    }
}

#ifdef VF_W
/* The scan VF_W channels at a time, where d and s are multiples of VF_W (a model's every ubatch then takes
 * this path): the block's state (s rows of VF_W channels, contiguous in the state's rows) is read once into
 * a local buffer, updated token by token in vector lanes -- the softplus too -- and written back once, so
 * decode streams the state instead of gathering it d floats apart per channel. Per channel the operations of
 * scan1_channels: the same fused update, and y summed as dot_lanes sums it (lane i of its accumulator takes
 * states i, i + VF_W, ... by fused multiply-adds, then the lanes are added in order). A is read from a
 * transposed copy where the caller made one (a weight), else gathered into the local buffer. */
static void scan1_blocks(void *ctx, int64_t b0, int64_t b1) {
    const int64_t *a = (const int64_t *)ctx;
    const float *x = (const float *)a[3], *dt = (const float *)a[6], *At = (const float *)a[27];
    const float *A = (const float *)a[9], *B = (const float *)a[10], *C = (const float *)a[13];
    float *out = (float *)a[16];
    const int64_t n = a[20], d = a[21], s = a[22], nb = d / VF_W;
    float hs[SSM_MAX_STATE * VF_W], ab[SSM_MAX_STATE * VF_W];
    for (int64_t it = b0; it < b1; it++) {
        const int64_t q = it / nb, c0 = (it % nb) * VF_W;
        const float *src;
        float *dst;
        int64_t ds1;
        scan_state(a, q, &src, &dst, &ds1);
        for (int64_t j = 0; j < s; j++) {
            vf_store(hs + j * VF_W, vf_load(src + j * a[2] + c0));
            if (!At)
                for (int w = 0; w < VF_W; w++) ab[j * VF_W + w] = A[(c0 + w) * s + j];
        }
        for (int64_t t = 0; t < n; t++) {
            const vf spv = vf_softplus(vf_load(dt + q * a[7] + t * a[8] + c0));
            const vf dxv = vf_mul(spv, vf_load(x + q * a[4] + t * a[5] + c0));
            const float *bt = B + q * a[11] + t * a[12], *ct = C + q * a[14] + t * a[15];
            vf acc[VF_W];
            for (int64_t j0 = 0; j0 < s; j0 += VF_W) {
#pragma GCC unroll 16
                for (int i = 0; i < VF_W; i++) {
                    const int64_t j = j0 + i;
                    const vf aj = At ? vf_load(At + j * d + c0) : vf_load(ab + j * VF_W);
                    const vf h = vf_fmadd(vf_exp(vf_mul(spv, aj)), vf_load(hs + j * VF_W), vf_mul(dxv, vf_set1(bt[j])));
                    vf_store(hs + j * VF_W, h);
                    acc[i] = vf_fmadd(h, vf_set1(ct[j]), j0 ? acc[i] : vf_set1(0.0f));
                }
            }
            vf y = vf_set1(0.0f);
            for (int i = 0; i < VF_W; i++) y = vf_add(y, acc[i]);
            vf_store(out + q * a[17] + t * a[18] + c0, y);
        }
        for (int64_t j = 0; j < s; j++) vf_store(dst + j * ds1 + c0, vf_load(hs + j * VF_W));
    }
}
#endif

/* a: s0, s0_s0, q, q_s0, q_s1, k, k_s0, k_s1, v, v_s0, v_s1, g, g_s0, g_s1, beta, b_s0, b_s1, out, o_s0, o_s1,
 * S, n, Hk, Hv, dk, dv (strides in floats: per sequence, per token; each row's last axis contiguous), ids
 * (int32 [S] or 0), n_rows.
 * The gated delta rule (GraphBuilder.gated_delta_net) per (sequence, value head), its tokens in order: the
 * head's state S [dv, dk] (rows of a sequence's state [Hv, dv, dk], contiguous) is copied to out's state
 * rows and updated there: S = exp(g) S; u = beta (v - S k); S += u k^T; y = S q, every dot product a
 * dot_lanes' sum (delta_rows where the head size is whole vectors: the same sums for every token, whichever
 * ubatch it is in). ids != 0: in place in a recurrent state table instead, sequence q's state at s0 + ids[q] s0_s0
 * (out's state rows are left alone; the slots are checked distinct first, as the scans'). A head's bits
 * depend only on its own sequence's inputs: one token, a whole prompt or a batch, in place or not. */
#ifdef VF_W
#define DELTA_ROWS 4
/* s[j] = the lanes of acc[j] added in order (vf_sum_in_order's sum), for nr <= DELTA_ROWS vectors side by side:
 * their dependency chains overlap. */
static inline void lane_sums(const vf *acc, int nr, float *s) {
    float lanes[DELTA_ROWS][VF_W];
    for (int j = 0; j < nr; j++) vf_store(lanes[j], acc[j]), s[j] = 0.0f;
    for (int i = 0; i < VF_W; i++)
        for (int j = 0; j < nr; j++) s[j] += lanes[j][i];
}

/* Rows r0 .. r0 + nr - 1 (nr <= DELTA_ROWS) of a head's state for one token, dk a multiple of VF_W: two
 * passes over each row instead of four (decay and the k dot together, then the update and the q dot), and
 * the rows' in-order lane sums side by side, so their dependency chains overlap. */
static inline void delta_rows(float *st, int64_t r0, int nr, int64_t dk, float decay, const float *kt,
                              const float *qt, const float *vt, float bt, float *yt) {
    vf acc[DELTA_ROWS];
    float s[DELTA_ROWS], u[DELTA_ROWS];
    const vf dvec = vf_set1(decay);
    for (int j = 0; j < nr; j++) acc[j] = vf_set1(0.0f);
    for (int64_t c = 0; c < dk; c += VF_W) {
        const vf kv = vf_load(kt + c);
        for (int j = 0; j < nr; j++) {
            float *row = st + (r0 + j) * dk + c;
            const vf x = vf_mul(vf_load(row), dvec);
            vf_store(row, x);
            acc[j] = vf_fmadd(x, kv, acc[j]);
        }
    }
    lane_sums(acc, nr, s);
    for (int j = 0; j < nr; j++) u[j] = (vt[r0 + j] - s[j]) * bt, acc[j] = vf_set1(0.0f);
    for (int64_t c = 0; c < dk; c += VF_W) {
        const vf kv = vf_load(kt + c), qv = vf_load(qt + c);
        for (int j = 0; j < nr; j++) {
            float *row = st + (r0 + j) * dk + c;
            const vf x = vf_fmadd(vf_set1(u[j]), kv, vf_load(row));
            vf_store(row, x);
            acc[j] = vf_fmadd(x, qv, acc[j]);
        }
    }
    lane_sums(acc, nr, s);
    for (int j = 0; j < nr; j++) yt[r0 + j] = s[j];
}
#endif

static void delta_heads(void *ctx, int64_t t0, int64_t t1) {
    const int64_t *a = (const int64_t *)ctx;
    const float *s0 = (const float *)a[0], *q = (const float *)a[2], *k = (const float *)a[5];
    const float *v = (const float *)a[8], *g = (const float *)a[11], *beta = (const float *)a[14];
    float *out = (float *)a[17];
    const int64_t n = a[21], hk = a[22], hv = a[23], dk = a[24], dv = a[25];
    for (int64_t it = t0; it < t1; it++) {
        const int64_t sq = it / hv, h = it % hv, kh = h / (hv / hk);
        const int32_t *ids = (const int32_t *)a[26];
        float *st = ids ? (float *)s0 + (int64_t)ids[sq] * a[1] + h * dv * dk
                        : out + sq * a[18] + n * a[19] + h * dv * dk;
        if (!ids) memmove(st, s0 + sq * a[1] + h * dv * dk, sizeof(float) * (size_t)(dv * dk));
        for (int64_t t = 0; t < n; t++) {
            const float *qt = q + sq * a[3] + t * a[4] + kh * dk, *kt = k + sq * a[6] + t * a[7] + kh * dk;
            const float *vt = v + sq * a[9] + t * a[10] + h * dv;
            const float decay = expf(g[sq * a[12] + t * a[13] + h]), bt = beta[sq * a[15] + t * a[16] + h];
            float *yt = out + sq * a[18] + t * a[19] + h * dv;
#ifdef VF_W
            if (dk % VF_W == 0) {
                for (int64_t r = 0; r < dv; r += DELTA_ROWS)
                    delta_rows(st, r, (int)(dv - r < DELTA_ROWS ? dv - r : DELTA_ROWS), dk, decay, kt, qt, vt, bt, yt);
                continue;
            }
#endif
            for (int64_t r = 0; r < dv; r++) {
                float *row = st + r * dk;
                for (int64_t c = 0; c < dk; c++) row[c] *= decay;
                const float u = (vt[r] - dot_lanes(row, kt, dk)) * bt;
                for (int64_t c = 0; c < dk; c++) row[c] += u * kt[c];
                yt[r] = dot_lanes(row, qt, dk);
            }
        }
    }
}

void kvg_gated_delta_net(const int64_t *a) {
    if (!slots_ok((const int32_t *)a[26], a[20], a[27])) return;
    parallel_for(a[20] * a[23], 1, delta_heads, (void *)a);
}

void kvg_ssm_scan(const int64_t *a) {
    if (!scan_ids_ok(a)) return;
#ifdef VF_W
    if (a[21] % VF_W == 0 && a[22] % VF_W == 0) {
        parallel_for(a[19] * (a[21] / VF_W), 1, scan1_blocks, (void *)a);
        return;
    }
#endif
    parallel_for(a[19] * a[21], 16, scan1_channels, (void *)a);
}

/* a: as kvg_ssm_scan, with A (float [H]) one scalar per head, dt [S, n, H], B/C [S, n, G * s], and a[23] H,
 * a[24] G. Mamba-2: per head h (d / H channels, group g = h / (H / G)), h_p = exp(softplus(dt_h) A_h) h_p +
 * softplus(dt_h) x_p B_g; y_p = h_p . C_g. The state is [s, d]: row j holds state j of every channel, a head's
 * channels side by side. Two ways through it, with the same operations on every channel (fused multiply-adds
 * where the build has FMA, in vector lanes or not), so a token's bits never depend on which one its ubatch
 * took or on its batch mates:
 *  - one token per sequence (decode): the state streams through once, row by row over runs of whole heads,
 *    which the hardware prefetches (a head's own rows, d floats apart, would not be);
 *  - more tokens: per (sequence, head), blocks of SCAN_CB channels copied to a contiguous buffer that stays
 *    in L1 over all n tokens (rows d floats apart fall into a few cache sets and evict each other), with
 *    each token's y sums in registers.
 * y_p always sums over j in order. */
#ifdef VF_W
#define SCAN_CB (2 * VF_W)
#define S_FMA(x, y, z) fmaf((x), (y), (z))      /* rounds once, as a vector lane's vf_fmadd */
#else
#define SCAN_CB 16
#define S_FMA(x, y, z) ((x) * (y) + (z))
#endif
#define SCAN_SPAN 2048                            /* channels of the decode path's y and dx buffers */
#define SCAN_AHEAD 4                              /* rows the decode path prefetches ahead */

/* one token, w channels of one state row: h = dx bj + h dA; y += h cj */
static inline void scan2_span(float *h, const float *dx, float *y, int64_t w, float dA, float bj, float cj) {
    int64_t p = 0;
#ifdef VF_W
    const vf da = vf_set1(dA), b = vf_set1(bj), c = vf_set1(cj);
    for (; p + VF_W <= w; p += VF_W) {
        const vf hv = vf_fmadd(vf_load(dx + p), b, vf_mul(vf_load(h + p), da));
        vf_store(h + p, hv);
        vf_store(y + p, vf_fmadd(hv, c, vf_load(y + p)));
    }
#endif
    for (; p < w; p++) {
        h[p] = S_FMA(dx[p], bj, h[p] * dA);
        y[p] = S_FMA(h[p], cj, y[p]);
    }
}

/* one token, one block of w <= SCAN_CB channels of a head: hl [s][SCAN_CB] the block's state */
static inline void scan2_block(float *hl, int64_t s, int64_t w, float sp, float dA, const float *xt,
                               const float *bt, const float *ct, float *y) {
    float dx[SCAN_CB], acc[SCAN_CB];
    for (int64_t p = 0; p < w; p++) dx[p] = sp * xt[p], acc[p] = 0.0f;
#ifdef VF_W
    if (w == SCAN_CB) {       /* the same operations as scan2_span, y kept in registers */
        const vf da = vf_set1(dA), dx0 = vf_load(dx), dx1 = vf_load(dx + VF_W);
        vf y0 = vf_set1(0.0f), y1 = vf_set1(0.0f);
        for (int64_t j = 0; j < s; j++) {
            float *hr = hl + j * SCAN_CB;
            const vf bj = vf_set1(bt[j]), cj = vf_set1(ct[j]);
            const vf h0 = vf_fmadd(dx0, bj, vf_mul(vf_load(hr), da));
            const vf h1 = vf_fmadd(dx1, bj, vf_mul(vf_load(hr + VF_W), da));
            vf_store(hr, h0);
            vf_store(hr + VF_W, h1);
            y0 = vf_fmadd(h0, cj, y0);
            y1 = vf_fmadd(h1, cj, y1);
        }
        vf_store(y, y0);
        vf_store(y + VF_W, y1);
        return;
    }
#endif
    for (int64_t j = 0; j < s; j++) scan2_span(hl + j * SCAN_CB, dx, acc, w, dA, bt[j], ct[j]);
    for (int64_t p = 0; p < w; p++) y[p] = acc[p];
}

static void scan2_heads(void *ctx, int64_t i0, int64_t i1) {      /* (sequence, head) i0 .. i1 - 1, n tokens */
    const int64_t *a = (const int64_t *)ctx;
    const float *x = (const float *)a[3], *dt = (const float *)a[6];
    const float *A = (const float *)a[9], *B = (const float *)a[10], *C = (const float *)a[13];
    float *out = (float *)a[16];
    const int64_t n = a[20], d = a[21], s = a[22], nh = a[23], ng = a[24], hd = d / nh;
    float hl[SSM_MAX_STATE * SCAN_CB];
    for (int64_t it = i0; it < i1; it++) {
        const int64_t q = it / nh, hh = it % nh, g = hh / (nh / ng), c0 = hh * hd;
        const float *src;
        float *dst;
        int64_t ds1;
        scan_state(a, q, &src, &dst, &ds1);
        for (int64_t cb = c0; cb < c0 + hd; cb += SCAN_CB) {
            const int64_t w = c0 + hd - cb < SCAN_CB ? c0 + hd - cb : SCAN_CB;
            for (int64_t j = 0; j < s; j++) memcpy(hl + j * SCAN_CB, src + j * a[2] + cb, sizeof(float) * w);
            for (int64_t t = 0; t < n; t++) {
                const float sp = softplus(dt[q * a[7] + t * a[8] + hh]), dA = expf(sp * A[hh]);
                scan2_block(hl, s, w, sp, dA, x + q * a[4] + t * a[5] + cb, B + q * a[11] + t * a[12] + g * s,
                            C + q * a[14] + t * a[15] + g * s, out + q * a[17] + t * a[18] + cb);
            }
            for (int64_t j = 0; j < s; j++) memcpy(dst + j * ds1 + cb, hl + j * SCAN_CB, sizeof(float) * w);
        }
    }
}

static void scan2_rows(void *ctx, int64_t i0, int64_t i1) {       /* (sequence, head) i0 .. i1 - 1, one token */
    const int64_t *a = (const int64_t *)ctx;
    const float *x = (const float *)a[3], *dt = (const float *)a[6];
    const float *A = (const float *)a[9], *B = (const float *)a[10], *C = (const float *)a[13];
    float *out = (float *)a[16];
    const int64_t d = a[21], s = a[22], nh = a[23], ng = a[24], hd = d / nh;
    float y[SCAN_SPAN], dx[SCAN_SPAN], dA[SCAN_SPAN], sp[SCAN_SPAN];
    for (int64_t it = i0; it < i1;) {
        const int64_t q = it / nh, h0 = it % nh;   /* heads h0 .. h1 - 1 of sequence q: one run of channels */
        int64_t h1 = h0 + (i1 - it < nh - h0 ? i1 - it : nh - h0);
        if ((h1 - h0) * hd > SCAN_SPAN) h1 = h0 + (SCAN_SPAN / hd > 1 ? SCAN_SPAN / hd : 1);
        it += h1 - h0;
        const int64_t c0 = h0 * hd, w = (h1 - h0) * hd;
        const float *xt = x + q * a[4] + c0, *bt = B + q * a[11], *ct = C + q * a[14];
        float *yo = out + q * a[17] + c0;
        const float *src;
        float *dst;
        int64_t ds1;
        scan_state(a, q, &src, &dst, &ds1);
        if (w > SCAN_SPAN) {             /* a head wider than the buffers: the per-head path */
            scan2_heads(ctx, q * nh + h0, q * nh + h1);
            continue;
        }
        for (int64_t hh = h0; hh < h1; hh++) {
            sp[hh - h0] = softplus(dt[q * a[7] + hh]);
            dA[hh - h0] = expf(sp[hh - h0] * A[hh]);
        }
        for (int64_t p = 0; p < w; p++) dx[p] = sp[p / hd] * xt[p], y[p] = 0.0f;
        for (int64_t j = 0; j < s; j++) {
            const float *hs = src + j * a[2] + c0;
            float *hr = dst + j * ds1 + c0;
            if (j + SCAN_AHEAD < s)          /* the run SCAN_AHEAD rows on, d floats away: no prefetcher guesses it */
                for (int64_t off = 0; off < w; off += 16) __builtin_prefetch(hs + SCAN_AHEAD * a[2] + off, 1, 3);
            if (hr != hs) memcpy(hr, hs, sizeof(float) * w);
            for (int64_t hh = h0; hh < h1; hh++) {
                const int64_t g = hh / (nh / ng), o = (hh - h0) * hd;
                scan2_span(hr + o, dx + o, y + o, hd, dA[hh - h0], bt[g * s + j], ct[g * s + j]);
            }
        }
        memcpy(yo, y, sizeof(float) * w);
    }
}

void kvg_ssm_scan2(const int64_t *a) {
    if (!scan_ids_ok(a)) return;
    const int64_t tasks = a[19] * a[23], nt = atomic_load(&pool.n_threads);
    if (a[20] == 1)      /* runs of heads: about two per thread */
        parallel_for(tasks, (tasks + 2 * nt - 1) / (2 * nt), scan2_rows, (void *)a);
    else
        parallel_for(tasks, 1, scan2_heads, (void *)a);
}

/* a: table (float [rows, k], rows ts floats apart), n_rows, k, ts, ids (int32 [n]), n, out (float [n, k], rows
 * os floats apart): out[i] = table[ids[i]] (a recurrent state's rows gathered for a ubatch's sequences: rows of
 * up to MBs, copied in pieces by the threads). The ids are checked on the calling thread first (in_range
 * counts per thread); an id out of range gives a zero row. */
#define GATHER_PIECE 16384                 /* floats */

static void gather_pieces(void *ctx, int64_t u0, int64_t u1) {
    const int64_t *a = (const int64_t *)ctx;
    const float *table = (const float *)a[0];
    const int64_t k = a[2], ts = a[3], os = a[7], per_row = (k + GATHER_PIECE - 1) / GATHER_PIECE;
    const int32_t *ids = (const int32_t *)a[4];
    float *out = (float *)a[6];
    for (int64_t u = u0; u < u1; u++) {
        const int64_t i = u / per_row, e0 = (u % per_row) * GATHER_PIECE;
        const int64_t len = k - e0 < GATHER_PIECE ? k - e0 : GATHER_PIECE;
        memcpy(out + i * os + e0, table + (int64_t)ids[i] * ts + e0, sizeof(float) * (size_t)len);
    }
}

void kvg_get_rows_f32(const int64_t *a) {
    const int32_t *ids = (const int32_t *)a[4];
    const int64_t n = a[5], k = a[2];
    int all_in = 1;
    for (int64_t i = 0; i < n; i++) all_in &= in_range(ids[i], a[1]);
    if (all_in) {
        parallel_for(n * ((k + GATHER_PIECE - 1) / GATHER_PIECE), 1, gather_pieces, (void *)a);
        return;
    }
    for (int64_t i = 0; i < n; i++) {                    /* rare: a bad id (already counted) */
        float *o = (float *)a[6] + i * a[7];
        if (ids[i] >= 0 && ids[i] < a[1]) memcpy(o, (const float *)a[0] + (int64_t)ids[i] * a[3], sizeof(float) * k);
        else memset(o, 0, sizeof(float) * k);
    }
}
