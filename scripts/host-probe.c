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

#define BYTES (256L << 20)
#define PASSES 8
#define ITERS 50000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static const float one = 1.0f;

// 12 independent operations on ymm0..ymm11 (ymm15 the other operand)
#define R6(op, r0, r1, r2, r3, r4, r5)                                                                                       \
    op " %%ymm15, %%ymm" r0 ", %%ymm" r0 "\n" op " %%ymm15, %%ymm" r1 ", %%ymm" r1 "\n" op " %%ymm15, %%ymm" r2 ", %%ymm" r2 "\n" op \
       " %%ymm15, %%ymm" r3 ", %%ymm" r3 "\n" op " %%ymm15, %%ymm" r4 ", %%ymm" r4 "\n" op " %%ymm15, %%ymm" r5 ", %%ymm" r5 "\n"
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
    int kind; // 0 stream, 1 maddubs, 2 maddubs + mulps, 3 maddubs + paddw, 4 tiles
    char *buf;
    double rate;
    long sink;
};

static void *run(void *arg) {
    struct job *j = arg;
    double t0 = now();
    if (j->kind == 0) {
        __m256i s = _mm256_setzero_si256();
        for (int p = 0; p < PASSES; p++)
            for (long i = 0; i < BYTES; i += 128) {
                s = _mm256_add_epi64(s, _mm256_load_si256((__m256i *)(j->buf + i)));
                s = _mm256_add_epi64(s, _mm256_load_si256((__m256i *)(j->buf + i + 32)));
                s = _mm256_add_epi64(s, _mm256_load_si256((__m256i *)(j->buf + i + 64)));
                s = _mm256_add_epi64(s, _mm256_load_si256((__m256i *)(j->buf + i + 96)));
            }
        j->rate = (double)PASSES * BYTES / (now() - t0) / 1e9;
        j->sink = _mm256_extract_epi64(s, 0);
    } else if (j->kind == 4) {
        __m256i s = tiles(j->buf);
        j->rate = (double)PASSES * (BYTES - 8192) / (now() - t0) / 1e9;
        j->sink = _mm256_extract_epi64(s, 0);
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

// GHz of a dependent chain of scalar adds (one per cycle)
static double clock_ghz(void) {
    long a = 0;
    double t0 = now();
    for (long i = 0; i < ITERS; i++) __asm__ volatile("add $1, %0\nadd $1, %0\nadd $1, %0\nadd $1, %0\n" : "+r"(a));
    return 4.0 * ITERS / (now() - t0) / 1e9;
}

static void measure(int kind, int threads, char **bufs) {
    pthread_t t[2];
    struct job j[2];
    for (int i = 0; i < threads; i++) {
        j[i] = (struct job){kind, bufs[i], 0, 0};
        pthread_create(&t[i], NULL, run, &j[i]);
    }
    double total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        total += j[i].rate;
    }
    static const char *names[] = {"stream", "maddubs", "maddubs+mulps", "maddubs+paddw", "tiles"};
    printf("%-14s %d thread(s): total %6.2f %s", names[kind], threads, total, kind % 4 ? "G/s" : "GB/s");
    for (int i = 0; i < threads; i++) printf("  [%d] %.2f", i, j[i].rate);
    if (kind % 4 && threads == 1) printf("  (%.2f per cycle)", total / clock_ghz());
    printf("\n");
}

int main(void) {
    char *bufs[2];
    for (int i = 0; i < 2; i++) {
        bufs[i] = aligned_alloc(64, BYTES);
        memset(bufs[i], i + 1, BYTES);
    }
    for (int round = 0; round < 2; round++)
        for (int kind = 0; kind < 5; kind++) {
            measure(kind, 1, bufs);
            if (kind < 2 || kind == 4) measure(kind, 2, bufs);
        }
    return 0;
}
