//! Kernel micro-benchmarks: quantized matmuls at the model's shapes, per SIMD level and thread count.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flotilla_engine::quant::dot::Q8Row;
use flotilla_engine::quant::simd::supported;
use flotilla_engine::quant::{quantize_rows, QWeight};

fn weight(dtype: GgmlDType, n: usize, k: usize) -> QWeight {
    let v: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let q = QTensor::quantize(&Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
    QWeight::new("w", dtype, vec![n, k], q.data().unwrap().into_owned()).unwrap()
}

fn matmul(c: &mut Criterion) {
    // SmolLM2-135M shapes: ffn_up (1536x576, 18 blocks per row), ffn_down (576x1536, 48 blocks), and the
    // output head's format (Q8_0) at ffn_up's shape; 1 activation row (decode), 8 (the fewest whose
    // tiles are unpacked once), 32 (batched decode) and 128 (a prompt). Per-level figures run on one
    // thread.
    let one = flotilla_engine::pool::Pool::new(1);
    for (dtype, n, k) in [(GgmlDType::Q4_1, 1536, 576), (GgmlDType::Q4_1, 576, 1536), (GgmlDType::Q8_0, 1536, 576)] {
        let w = weight(dtype, n, k);
        let mut g = c.benchmark_group(format!("matmul_{dtype:?}_{n}x{k}"));
        for m in [1usize, 8, 32, 128] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 200) as f32 / 100.0) - 1.0).collect();
            let rows = quantize_rows(&x, k);
            g.throughput(Throughput::Elements((m * n * k) as u64));
            for level in supported() {
                g.bench_with_input(BenchmarkId::new(format!("{level:?}"), m), &m, |b, _| b.iter(|| one.install(|| w.matmul_q8_at(level, &rows))));
            }
            for threads in [1usize, 2] {
                let pool = flotilla_engine::pool::Pool::new(threads);
                g.bench_with_input(BenchmarkId::new(format!("best_{threads}t"), m), &m, |b, _| {
                    b.iter(|| pool.install(|| w.matmul_q8_at(flotilla_engine::quant::simd::detected(), &rows)))
                });
            }
        }
        g.finish();
    }
}

fn by_format(c: &mut Criterion) {
    // the other formats through `QWeight::matmul` (activations quantized inside), at ffn_down's shape:
    // a llama.cpp Q4_K_M file of SmolLM2-135M holds Q4_K and Q6_K there (its other matrices' rows, 576
    // wide, fall back to Q5_0 and Q8_0), and a Q5_K_M file Q5_1 (held as Q5); every level has a kernel
    // for each of them
    let one = flotilla_engine::pool::Pool::new(1);
    for (dtype, n, k) in [(GgmlDType::Q4K, 576, 1536), (GgmlDType::Q6K, 576, 1536), (GgmlDType::Q5_1, 576, 1536)] {
        let w = weight(dtype, n, k);
        let mut g = c.benchmark_group(format!("matmul_{dtype:?}_{n}x{k}"));
        for m in [1usize, 32, 128] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 200) as f32 / 100.0) - 1.0).collect();
            g.throughput(Throughput::Elements((m * n * k) as u64));
            g.bench_with_input(BenchmarkId::new("1t", m), &m, |b, _| b.iter(|| one.install(|| w.matmul(&x, m))));
        }
        g.finish();
    }
}

fn quantize(c: &mut Criterion) {
    // activation rows to 8-bit blocks, one row at a time on one thread (the build `Q8Row::quantize`
    // picks for this CPU), at the model's two row widths
    let mut g = c.benchmark_group("quantize");
    for k in [576usize, 1536] {
        let x: Vec<f32> = (0..32 * k).map(|i| ((i * 31 % 200) as f32 / 100.0) - 1.0).collect();
        let mut row = Q8Row::default();
        g.throughput(Throughput::Elements((32 * k) as u64));
        g.bench_with_input(BenchmarkId::new("32_rows", k), &k, |b, _| {
            b.iter(|| {
                for x in x.chunks_exact(k) {
                    row.quantize_into(std::hint::black_box(x));
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = matmul, by_format, quantize
}
criterion_main!(benches);
