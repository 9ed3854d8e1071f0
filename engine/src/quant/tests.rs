use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

fn random(n: usize, seed: u64) -> Vec<f32> {
    // xorshift: deterministic values in [-1, 1)
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QWeight, QTensor) {
    let vals = random(rows * cols, seed);
    let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let w = QWeight::new("w", dtype, vec![rows, cols], q.data().unwrap().into_owned()).unwrap();
    (w, q)
}

const ALL: [GgmlDType; 11] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

#[test]
fn dequantize_matches_candle_for_every_format() {
    for dtype in ALL {
        let (w, q) = quantized(dtype, 3, 512, 7);
        let ours = w.dequantize();
        let theirs: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs, "{dtype:?}");
    }
}

#[test]
fn matmul_is_close_to_f64_reference() {
    let (m, k, n) = (3, 256, 40);
    let x = random(m * k, 99);
    for dtype in ALL {
        let (w, _) = quantized(dtype, n, k, 5);
        let wf = w.dequantize();
        let out = w.matmul(&x, m);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|c| x[i * k + c] as f64 * wf[j * k + c] as f64).sum();
                let got = out[i * n + j] as f64;
                // 8-bit activations lose ~0.4% per element; the sum of 256 terms of magnitude <= 1 stays well within 0.1.
                assert!((got - exact).abs() < 0.1, "{dtype:?} [{i},{j}] {got} vs {exact}");
            }
        }
    }
}

#[test]
fn matmul_rows_do_not_depend_on_batch_or_threads() {
    let (k, n) = (256, 300);
    let x = random(7 * k, 3);
    for dtype in ALL {
        let (w, _) = quantized(dtype, n, k, 11);
        let full = w.matmul(&x, 7);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let threaded = pool.install(|| w.matmul(&x, 7));
        assert_eq!(full, threaded, "{dtype:?}");
        for i in 0..7 {
            let one = w.matmul(&x[i * k..(i + 1) * k], 1);
            assert_eq!(one, full[i * n..(i + 1) * n], "{dtype:?} row {i}");
        }
    }
}

#[test]
fn q8_row_of_zeros_is_zero() {
    let r = Q8Row::quantize(&[0.0; 64]);
    assert_eq!(r.d, vec![0.0, 0.0]);
    assert!(r.qs.iter().all(|&q| q == 0));
}

#[test]
fn unsupported_format_is_named() {
    let err = QWeight::new("blk.0.x", GgmlDType::Q2K, vec![1, 256], vec![0; 84]).unwrap_err();
    assert!(err.to_string().contains("blk.0.x") && err.to_string().contains("Q2K"), "{err}");
}
