// What this host's cores can do together, for reading engine scaling figures (BENCHMARKS.md):
// - stream: each thread reads its own 256 MiB buffer 8 times with AVX2 loads (GB/s per thread, total);
// - maddubs: each thread runs 12 independent `vpmaddubsw` chains in registers (G ops/s), which tells
//   two real cores (about 2x) from two hyperthreads of one core (about 1x).
// Build and run: gcc -O2 -mavx2 -pthread scripts/host-probe.c -o /tmp/host-probe && /tmp/host-probe
// (x86-64 with AVX2 only; not part of the build or the tests.)
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (256L << 20)
#define PASSES 8
#define ITERS 100000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

struct job {
    int kind; // 0 stream, 1 maddubs
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
    } else {
        __m256i w = _mm256_set1_epi8(5), x[12];
        for (int i = 0; i < 12; i++) x[i] = _mm256_set1_epi8(i + 1);
        for (long i = 0; i < ITERS; i++) {
#define M(k) x[k] = _mm256_maddubs_epi16(w, x[k]);
            M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
            __asm__ volatile("" : "+x"(x[0]), "+x"(x[1]), "+x"(x[2]), "+x"(x[3]), "+x"(x[4]), "+x"(x[5]), "+x"(x[6]), "+x"(x[7]),
                             "+x"(x[8]), "+x"(x[9]), "+x"(x[10]), "+x"(x[11]));
        }
        j->rate = 12.0 * ITERS / (now() - t0) / 1e9;
        j->sink = _mm256_extract_epi64(x[0], 0);
    }
    return NULL;
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
    printf("%-8s %d thread(s): total %6.2f %s", kind ? "maddubs" : "stream", threads, total, kind ? "G/s" : "GB/s");
    for (int i = 0; i < threads; i++) printf("  [%d] %.2f", i, j[i].rate);
    printf("\n");
}

int main(void) {
    char *bufs[2];
    for (int i = 0; i < 2; i++) {
        bufs[i] = aligned_alloc(64, BYTES);
        memset(bufs[i], i + 1, BYTES);
    }
    for (int round = 0; round < 2; round++)
        for (int kind = 0; kind < 2; kind++) {
            measure(kind, 1, bufs);
            measure(kind, 2, bufs);
        }
    return 0;
}
