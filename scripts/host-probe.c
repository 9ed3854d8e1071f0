// What this host's cores can do together, for reading engine scaling figures (BENCHMARKS.md):
// - stream: each thread reads its own 256 MiB buffer 8 times with AVX2 loads (GB/s per thread, total);
// - maddubs: each thread runs 12 independent `vpmaddubsw` chains held in registers (G ops/s), which tells
//   two real cores (about 2x) from two hyperthreads of one core (about 1x); with one thread, also per
//   cycle of a dependent scalar add chain (the clock), and mixed 6 + 6 with `vmulps` (sharing its pipes:
//   about 2 per cycle in all) and with `vpaddw` (not sharing them: up to 4 per cycle in all).
// - tiles: each thread reads its own buffer as the single-stream decode kernels read Q4_1 weights, tile
//   after tile of 16 rows by 18 blocks (each block's 4 lines of nibbles, then the tile's f16 scales and
//   minimums), doing a block's unpacking and integer multiplies on it and prefetching 8 KiB ahead
//   (GB/s): about what one and two threads' single-stream decode can read, 98 MB a token of the
//   default model (on the Zen 4 kind one core read 20-22 GB/s and two together 32-35, so two
//   threads cannot decode at 1.8x one there; BENCHMARKS.md, 2026-12-06).
// - cache: a buffer of the default model's size (94 MiB) read 16 times over after a first pass, whole by
//   one thread, a half each by two (as two decode threads split every matrix), prefetching 8 KiB ahead as
//   the decode kernels do (GB/s): where two read far more than twice one, each core's part of the L3
//   holds a half but not the whole, and the 2-thread decode runs from the L3 while the 1-thread decode
//   streams from memory (on an Emerald Rapids VM one read 11-18 GB/s and two 45-49; without the
//   prefetches 10 and 22; BENCHMARKS.md, 2026-12-06, twelfth session).
// - vpdpbusd (AVX-512 VNNI) and tdpbssd (AMX-INT8), where the CPU has them: 12 independent 512-bit
//   chains, and 4 independent 16x16x64 tile products, held in registers (G ops/s): how the integer
//   multiplies of the batched kernels scale from one core to two (on that Emerald Rapids VM vpdpbusd
//   scaled 2.0-2.1x and tdpbssd 1.6-1.9x).
// (The AMX permission is asked once for the process, before any thread starts.)
// The chains are written in assembly: an earlier version let the compiler keep them in memory, and a
// store and a load per operation held it to about 1 `vpmaddubsw` per cycle, half of what the core does.
// Build and run: gcc -O2 -mavx2 -mf16c -pthread scripts/host-probe.c -o /tmp/host-probe && /tmp/host-probe
// (x86-64 with AVX2 and F16C only; not part of the build or the tests.)
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BYTES (256L << 20)
#define PASSES 8
#define CACHE_BYTES (94L << 20)
#define CACHE_PASSES 16
#define ITERS 50000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static const float one = 1.0f;

// The tile operands of the tdpbssd probe (all bytes 1: no zero operands).
static char ones[1024] __attribute__((aligned(64)));

// 12 independent operations on ymm0..ymm11 (ymm15 the other operand)
#define R6(op, r0, r1, r2, r3, r4, r5)                                                                                       \
    op " %%ymm15, %%ymm" r0 ", %%ymm" r0 "\n" op " %%ymm15, %%ymm" r1 ", %%ymm" r1 "\n" op " %%ymm15, %%ymm" r2 ", %%ymm" r2 "\n" op \
       " %%ymm15, %%ymm" r3 ", %%ymm" r3 "\n" op " %%ymm15, %%ymm" r4 ", %%ymm" r4 "\n" op " %%ymm15, %%ymm" r5 ", %%ymm" r5 "\n"
// 6 independent vpdpbusd on zmm registers (zmm14 and zmm15 the operands)
#define D6(r0, r1, r2, r3, r4, r5)                                                                                            \
    "vpdpbusd %%zmm15, %%zmm14, %%zmm" r0 "\nvpdpbusd %%zmm15, %%zmm14, %%zmm" r1 "\nvpdpbusd %%zmm15, %%zmm14, %%zmm" r2     \
    "\nvpdpbusd %%zmm15, %%zmm14, %%zmm" r3 "\nvpdpbusd %%zmm15, %%zmm14, %%zmm" r4 "\nvpdpbusd %%zmm15, %%zmm14, %%zmm" r5 "\n"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
// (every register starts at 1.0f: no denormal operands for vmulps)
#define LOOP(first, second)                                                                                                   \
    do {                                                                                                                      \
    __asm__ volatile("vbroadcastss %0, %%ymm15\n" R6("vblendps $255,", "0", "1", "2", "3", "4", "5") R6("vblendps $255,", "6", "7", "8", "9", "10", "11") \
                     ::"m"(one) : CLOBBER, "xmm15");                                                                          \
    for (long i = 0; i < ITERS; i++)                                                                                          \
        __asm__ volatile(R6(first, "0", "1", "2", "3", "4", "5") R6(second, "6", "7", "8", "9", "10", "11")::: CLOBBER, "xmm15");  \
    } while (0)

// Q4_1 tiles of 16 rows by 18 blocks: 18 x 256 bytes of nibbles, then 18 x 32 of scales, 18 x 32 of
// minimums (engine/src/quant/pack.rs)
#define TILE_BYTES (18 * 320)

static __m256i tiles(const char *buf) {
    const __m256i low = _mm256_set1_epi8(0x0F), act = _mm256_set1_epi8(3);
    __m256i acc = _mm256_setzero_si256();
    __m256 scaled = _mm256_setzero_ps();
    for (int p = 0; p < PASSES; p++)
        for (long t = 0; t + TILE_BYTES <= BYTES - 8192; t += TILE_BYTES) {
            const char *tile = buf + t;
            for (int b = 0; b < 18; b++) {
                for (int l = 0; l < 5; l++) _mm_prefetch(tile + 8192 + b * 320 + 64 * l, _MM_HINT_T0);
                for (int h = 0; h < 8; h++) {
                    __m256i x = _mm256_load_si256((const __m256i *)(tile + b * 256 + 32 * h));
                    __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(x, low), act);
                    __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(x, 4), low), act);
                    acc = _mm256_add_epi16(acc, _mm256_add_epi16(lo, hi));
                }
                __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tile + 18 * 256 + b * 32)));
                __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tile + 18 * 288 + b * 32)));
                scaled = _mm256_add_ps(scaled, _mm256_mul_ps(s, m));
            }
        }
    return _mm256_add_epi32(acc, _mm256_castps_si256(scaled));
}

struct job {
    int kind; // 0 stream, 1 maddubs, 2 maddubs + mulps, 3 maddubs + paddw, 4 tiles, 5 cache
    char *buf;
    long len; // bytes of buf this thread reads (stream, cache)
    double rate;
    long sink;
};

// The sum of len bytes at p, read passes times with AVX2 loads, prefetching ahead bytes ahead (0: none).
static __m256i read_bytes(const char *p, long len, int passes, long ahead) {
    __m256i s = _mm256_setzero_si256();
    for (int pass = 0; pass < passes; pass++)
        for (long i = 0; i < len; i += 128) {
            if (ahead) {
                _mm_prefetch(p + i + ahead, _MM_HINT_T0);
                _mm_prefetch(p + i + ahead + 64, _MM_HINT_T0);
            }
            s = _mm256_add_epi64(s, _mm256_load_si256((const __m256i *)(p + i)));
            s = _mm256_add_epi64(s, _mm256_load_si256((const __m256i *)(p + i + 32)));
            s = _mm256_add_epi64(s, _mm256_load_si256((const __m256i *)(p + i + 64)));
            s = _mm256_add_epi64(s, _mm256_load_si256((const __m256i *)(p + i + 96)));
        }
    return s;
}

static void *run(void *arg) {
    struct job *j = arg;
    double t0 = now();
    if (j->kind == 0) {
        __m256i s = read_bytes(j->buf, j->len, PASSES, 0);
        j->rate = (double)PASSES * j->len / (now() - t0) / 1e9;
        j->sink = _mm256_extract_epi64(s, 0);
    } else if (j->kind == 5) {
        __m256i s = read_bytes(j->buf, j->len, 1, 8192);
        t0 = now();
        s = _mm256_add_epi64(s, read_bytes(j->buf, j->len, CACHE_PASSES, 8192));
        j->rate = (double)CACHE_PASSES * j->len / (now() - t0) / 1e9;
        j->sink = _mm256_extract_epi64(s, 0);
    } else if (j->kind == 4) {
        __m256i s = tiles(j->buf);
        j->rate = (double)PASSES * (BYTES - 8192) / (now() - t0) / 1e9;
        j->sink = _mm256_extract_epi64(s, 0);
    } else if (j->kind == 6) {
        // (all bits set: no zero operands)
        __asm__ volatile("vpternlogd $255, %%zmm14, %%zmm14, %%zmm14\nvpternlogd $255, %%zmm15, %%zmm15, %%zmm15" ::: "xmm14", "xmm15");
        for (long i = 0; i < ITERS; i++)
            __asm__ volatile(D6("0", "1", "2", "3", "4", "5") D6("6", "7", "8", "9", "10", "11")::: CLOBBER, "xmm14", "xmm15");
        j->rate = 12.0 * ITERS / (now() - t0) / 1e9;
    } else if (j->kind == 7) {
        static const char cfg[64] __attribute__((aligned(64))) = {
            1, [16] = 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, [48] = 16, 16, 16, 16, 16, 16};
        // (ones: set in main, before the threads start)
        __asm__ volatile("ldtilecfg %0\n"
                         "tileloadd (%1,%2,1), %%tmm4\ntileloadd (%1,%2,1), %%tmm5\n"
                         "tilezero %%tmm0\ntilezero %%tmm1\ntilezero %%tmm2\ntilezero %%tmm3" ::"m"(cfg), "r"(ones), "r"(64L)
                         : "memory");
        for (long i = 0; i < ITERS / 16; i++)
            __asm__ volatile("tdpbssd %%tmm5, %%tmm4, %%tmm0\ntdpbssd %%tmm5, %%tmm4, %%tmm1\n"
                             "tdpbssd %%tmm5, %%tmm4, %%tmm2\ntdpbssd %%tmm5, %%tmm4, %%tmm3\n" ::);
        __asm__ volatile("tilerelease");
        j->rate = 4.0 * (ITERS / 16) / (now() - t0) / 1e9;
    } else {
        if (j->kind == 1)
            LOOP("vpmaddubsw", "vpmaddubsw");
        else if (j->kind == 2)
            LOOP("vpmaddubsw", "vmulps");
        else
            LOOP("vpmaddubsw", "vpaddw");
        j->rate = 12.0 * ITERS / (now() - t0) / 1e9;
    }
    return NULL;
}

// GHz of a dependent chain of scalar multiplies (3 cycles each on the Intel cores since Nehalem and the
// AMD ones since Zen, every kind in BENCHMARKS.md; a chain of adds read 5-9 GHz on an Emerald Rapids
// VM, whose cores run some dependent adds faster than one a cycle)
static double clock_ghz(void) {
    long a = 1, factor = 1;
    double t0 = now();
    for (long i = 0; i < ITERS / 4; i++)
        __asm__ volatile("imul %1, %0\nimul %1, %0\nimul %1, %0\nimul %1, %0\n" : "+r"(a) : "r"(factor));
    return 3.0 * ITERS / (now() - t0) / 1e9;
}

static void measure(int kind, int threads, char **bufs) {
    pthread_t t[2];
    struct job j[2];
    for (int i = 0; i < threads; i++) {
        // cache: one buffer, a part per thread; the others: a buffer per thread
        j[i] = kind == 5 ? (struct job){kind, bufs[0] + i * (CACHE_BYTES / threads), CACHE_BYTES / threads, 0, 0}
                         : (struct job){kind, bufs[i], BYTES, 0, 0};
        pthread_create(&t[i], NULL, run, &j[i]);
    }
    double total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        total += j[i].rate;
    }
    static const char *names[] = {"stream", "maddubs", "maddubs+mulps", "maddubs+paddw", "tiles", "cache", "vpdpbusd", "tdpbssd"};
    int ops = (kind >= 1 && kind <= 3) || kind >= 6;
    printf("%-14s %d thread(s): total %6.2f %s", names[kind], threads, total, ops ? "G/s" : "GB/s");
    for (int i = 0; i < threads; i++) printf("  [%d] %.2f", i, j[i].rate);
    if (ops && threads == 1) printf("  (%.2f per cycle)", total / clock_ghz());
    printf("\n");
}

// Whether the CPU has AVX-512 VNNI (and the OS keeps the zmm state), and AMX-INT8 that Linux lets this
// process use.
static int has_vnni512(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 16) & 1) || !((c >> 11) & 1)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xE6) == 0xE6;
}

static int has_amx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

int main(void) {
    char *bufs[2];
    int vnni = has_vnni512(), amx = has_amx();
    memset(ones, 1, sizeof ones);
    for (int i = 0; i < 2; i++) {
        bufs[i] = aligned_alloc(64, BYTES);
        memset(bufs[i], i + 1, BYTES);
    }
    for (int round = 0; round < 2; round++)
        for (int kind = 0; kind < 8; kind++) {
            if ((kind == 6 && !vnni) || (kind == 7 && !amx)) continue;
            measure(kind, 1, bufs);
            if (kind < 2 || kind >= 4) measure(kind, 2, bufs);
        }
    return 0;
}
