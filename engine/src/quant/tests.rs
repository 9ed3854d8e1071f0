use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

/// Deterministic values in [-1, 1) (also used by other modules' tests).
pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
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
        let pool = crate::pool::Pool::new(3);
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
    assert_eq!((r.len, r.blocks()), (64, 2));
    assert!(r.d.iter().chain(&r.s).all(|&v| v == 0.0) && r.sums.iter().all(|&v| v == 0));
    assert!(r.qs.iter().all(|&q| q == 0));
}

#[test]
fn q8_row_keeps_every_value_in_block_order() {
    // 17 blocks: a full group and a one-block tail, padded to two groups
    let x: Vec<f32> = (0..17 * 32).map(|i| ((i * 37 % 255) as f32 - 127.0) / 127.0).collect();
    let r = Q8Row::quantize(&x);
    assert_eq!((r.qs.len(), r.d.len()), (2 * 16 * 32, 32));
    for b in 0..17 {
        let sum: i32 = (0..32).map(|j| r.value(b, j) as i32).sum();
        assert_eq!(r.sums[b], sum);
        for j in 0..32 {
            assert_eq!(r.value(b, j), (x[b * 32 + j] * (1.0 / r.d[b])).round() as i8, "block {b} value {j}");
        }
    }
    assert!(r.d[17..].iter().all(|&d| d == 0.0));
}

#[test]
fn q8_rounding_is_round_half_away_from_zero() {
    // d = 1 (max 127), so the values are rounded as they are: ties, near-ties, NaN
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    let cases = [(0.5, 1), (-0.5, -1), (1.5, 2), (-2.5, -3), (0.49999997, 0), (-0.49999997, 0), (2.4999998, 2), (126.5, 127), (f32::NAN, 0)];
    for (i, &(v, _)) in cases.iter().enumerate() {
        x[i + 1] = v;
    }
    let r = Q8Row::quantize(&x);
    assert_eq!(r.d[0], 1.0);
    for (i, &(v, want)) in cases.iter().enumerate() {
        assert_eq!(r.value(0, i + 1), want, "{v}");
        if !v.is_nan() {
            assert_eq!(want, v.round() as i8);
        }
    }
}

#[test]
fn packing_rows_into_a_tile_keeps_every_block() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for blocks in [1, 2, 15, 16, 17, 18, 31, 33, 48] {
            let ts = dtype.type_size();
            let f = match dtype {
                GgmlDType::Q4_0 => simd::IntFormat::Q4_0,
                GgmlDType::Q4_1 => simd::IntFormat::Q4_1,
                _ => simd::IntFormat::Q8_0,
            };
            let rows: Vec<Vec<u8>> = (0..pack::TILE).map(|n| (0..blocks * ts).map(|i| ((i + 7 * n) * 131 % 251) as u8).collect()).collect();
            let mut tile = vec![0u8; pack::TILE * blocks * ts];
            for (n, r) in rows.iter().enumerate() {
                pack::pack_row(f, r, &mut tile, n);
            }
            assert_ne!(&tile[..blocks * ts], &rows[0][..], "{dtype:?} {blocks}");
            let mut blk = vec![0u8; ts];
            for (n, r) in rows.iter().enumerate() {
                for b in 0..blocks {
                    pack::unpack_block(f, &tile, blocks, n, b, &mut blk);
                    assert_eq!(blk, r[b * ts..(b + 1) * ts], "{dtype:?} {blocks} blocks, row {n} block {b}");
                }
            }
        }
    }
}

#[test]
fn a_matrix_with_a_part_tile_keeps_every_row() {
    // 21 rows: one whole tile and 5 rows of a second, padded one
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (w, q) = quantized(dtype, 21, 96, 3);
        let theirs: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(w.dequantize(), theirs, "{dtype:?}");
        assert_eq!(w.size_bytes(), 32 * 96 / 32 * dtype.type_size(), "{dtype:?}: two tiles");
    }
}

#[test]
fn unsupported_format_is_named() {
    let err = QWeight::new("blk.0.x", GgmlDType::Q2K, vec![1, 256], vec![0; 84]).unwrap_err();
    assert!(err.to_string().contains("blk.0.x") && err.to_string().contains("Q2K"), "{err}");
}

/// `n` deterministic random bytes (also used by other modules' tests).
pub(crate) fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect()
}

/// Raw blocks with every byte random (including Q8_0's -128 and extreme scales), so SIMD paths meet
/// values a quantizer would never produce.
fn raw_weight(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> QWeight {
    QWeight::new("raw", dtype, vec![rows, cols], raw_bytes(dtype, rows, cols, seed)).unwrap()
}

/// [`raw_weight`]'s bytes.
fn raw_bytes(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let bytes = rows * cols / dtype.block_size() * dtype.type_size();
    let mut data = random_bytes(bytes, seed);
    // Keep scales finite and moderate: f16 bytes of each block set to ~0.01..0.02.
    let ts = dtype.type_size();
    // (Q4_K: its super-block scale and minimum scale; the 6-bit sub-block ones stay random)
    let n_scales = if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q4K | GgmlDType::Q5_1 | GgmlDType::Q5K) { 2 } else { 1 };
    for blk in data.chunks_exact_mut(ts) {
        if dtype == GgmlDType::Q6K {
            // its super-block scale is last; the 8-bit sub-block scales stay random
            let v = half::f16::from_f32(0.0005 + (blk[0] as f32) / 255000.0);
            blk[208..210].copy_from_slice(&v.to_le_bytes());
            continue;
        }
        for i in 0..n_scales {
            let v = half::f16::from_f32(0.01 + (blk[4 + i] as f32) / 25500.0);
            blk[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    data
}

/// `w · rows` at every kernel level this CPU has, bit for bit against the scalar reference (`what` names
/// the case); returns the reference.
fn assert_every_level_gives_scalar_bits(w: &QWeight, rows: &[dot::Q8Row], what: &str) -> Vec<f32> {
    use super::simd::{supported, Level};
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let reference = w.matmul_q8_at(Level::Scalar, rows);
    for level in supported() {
        assert_eq!(bits(&w.matmul_q8_at(level, rows)), bits(&reference), "{what} {level:?}");
    }
    reference
}

/// A row of zeros times weights whose scales (and minimums) are all negative: every block's term is
/// -0.0 (`(dw * 0.0) * 0` with `dw < 0`), and the reference's lanes, which start from 0.0, sum them to
/// +0.0. The kernels give the same bits, whatever sign of zero they carry on the way.
#[test]
fn zero_outputs_have_the_references_sign() {
    let n = 40;
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_1, GgmlDType::Q4K, GgmlDType::Q6K] {
        for k in [576usize, 1536] {
            if k % dtype.block_size() != 0 {
                continue; // (K-quants: rows of 256-value super-blocks)
            }
            let mut data = raw_bytes(dtype, n, k, 5);
            // the sign bit of each block's f16 scales (Q4_K: its super-block scale and minimum scale; Q6_K:
            // its super-block scale, last)
            let ts = dtype.type_size();
            let signs: &[usize] = match dtype {
                GgmlDType::Q6K => &[209],
                GgmlDType::Q4_1 | GgmlDType::Q4K | GgmlDType::Q5_1 => &[1, 3],
                _ => &[1],
            };
            for blk in data.chunks_exact_mut(ts) {
                signs.iter().for_each(|&i| blk[i] |= 0x80);
            }
            let w = QWeight::new("negative", dtype, vec![n, k], data).unwrap();
            for m in [1usize, 17, 32] {
                let mut x = random(m * k, 9);
                x[..k].fill(0.0);
                let reference = assert_every_level_gives_scalar_bits(&w, &quantize_rows(&x, k), &format!("{dtype:?} k={k} m={m}"));
                assert!(reference[..n].iter().all(|v| v.to_bits() == 0), "{dtype:?}: the reference sums to +0.0");
            }
        }
    }
}

#[test]
fn every_simd_level_is_bit_identical_to_scalar() {
    use super::simd::supported;
    let levels = supported();
    eprintln!("kernel levels on this CPU: {levels:?}");
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_1, GgmlDType::Q5K]
    {
        for &(k, n, m) in &[
            (32, 1, 1),
            (64, 7, 3),
            (96, 33, 5),
            (576, 50, 1),
            (544, 21, 1),
            (608, 17, 1),
            (1088, 40, 1),
            (1536, 19, 8),
            (256, 3, 33),
            (544, 5, 9),
            (992, 4, 17),
            (512, 3, 2),
            (160, 3, 13),
            (224, 2, 8),
            (704, 5, 11),
            (384, 3, 4),
            (128, 2, 16),
            (576, 50, 20),
            (1536, 33, 40),
            (32, 17, 8),
            (576, 32, 12),
            (1536, 16, 14),
            (256, 5, 1),
            (768, 17, 1),
            (1280, 9, 3),
            (2048, 40, 12),
        ] {
            if k % dtype.block_size() != 0 {
                continue; // (K-quants: rows of 256-value super-blocks)
            }
            for w in [quantized(dtype, n, k, 21).0, raw_weight(dtype, n, k, 77)] {
                let mut x = random(m * k, 4);
                x[0] = 0.0;
                x[1..32.min(k)].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
                if k > 64 {
                    x[40] = 1000.0; // an outlier block
                }
                let rows = quantize_rows(&x, k);
                let reference = assert_every_level_gives_scalar_bits(&w, &rows, &format!("{dtype:?} k={k} n={n} m={m}"));
                // and each row alone gives the same bits as in the batch
                for i in 0..m {
                    let one = w.matmul_q8(&rows[i..i + 1]);
                    assert_eq!(one, reference[i * n..(i + 1) * n], "{dtype:?} row {i}");
                }
            }
        }
    }
}

/// The AVX-512 kernel's two pass sizes, 6 activation rows and 4 (Zen 4's: `vnni::rows_per_pass`), both
/// on any AVX-512 host, bit for bit against the scalar reference: over packed tiles (fewer than 8 rows)
/// and unpacked ones, with a last pass of every size. And the layout a matmul makes takes 6 rows a pass
/// below 8 rows and this CPU's choice from 8 on.
#[cfg(target_arch = "x86_64")]
#[test]
fn both_vnni_pass_sizes_give_scalar_bits() {
    use super::simd::{supported, Level, Out};
    use super::vnni::{rows_per_pass, PassRows};
    if !supported().contains(&Level::Avx512Vnni) {
        eprintln!("skipped: no AVX-512 VNNI");
        return;
    }
    let some = quantize_rows(&random(9 * 64, 3), 64);
    assert_eq!(PassRows::new(&some[..7]).per(), 6);
    assert_eq!(PassRows::new(&some).per(), rows_per_pass());
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_1] {
        for &(k, n, m) in &[(576, 50, 32), (1536, 33, 9), (256, 17, 13), (96, 3, 2), (576, 16, 4), (768, 40, 7), (1024, 5, 11), (512, 20, 10)] {
            if k % dtype.block_size() != 0 {
                continue; // (K-quants: rows of 256-value super-blocks)
            }
            let w = raw_weight(dtype, n, k, 31 + m as u64);
            let rows = quantize_rows(&random(m * k, 5 + n as u64), k);
            let Kernel::Int(f) = w.kernel else { panic!("{dtype:?} has an integer kernel") };
            let reference = w.matmul_q8_at(Level::Scalar, &rows);
            for per in [4, 6] {
                let passes = PassRows::with_rows_per_pass(&rows, per);
                let mut out = vec![f32::NAN; m * n];
                // SAFETY: the CPU has AVX-512 VNNI and F16C (checked above); the tiles hold the matrix's n
                // rows, the rows its blocks, and `out` has room for m rows of n
                unsafe { super::vnni::tile(f, w.tiles_bytes(&(0..n)), w.row_bytes, n, &rows, Some(&passes), Out::strided(out.as_mut_ptr(), n)) };
                assert_eq!(bits(&out), bits(&reference), "{dtype:?} k={k} n={n} m={m}, {per} rows a pass");
            }
        }
    }
}

#[test]
fn batched_f32_dots_give_each_single_dots_bits() {
    // every pass shape (1-2 activation rows against 1-4 weight rows) and widths with and without a tail
    for k in [1, 7, 8, 9, 64, 100, 576] {
        for (m, n) in [(1, 1), (1, 3), (1, 4), (1, 9), (2, 2), (3, 5), (5, 8), (7, 7)] {
            let (ws, xs) = (random(n * k, k as u64), random(m * k, 7 + m as u64));
            let mut got = vec![f32::NAN; m * n];
            let mut seen = vec![0; m * n];
            dot::dots_f32(&ws, &xs, k, |i, j, v| {
                got[i * n + j] = v;
                seen[i * n + j] += 1;
            });
            assert!(seen.iter().all(|&s| s == 1), "k={k} {m}x{n}: every pair once");
            for i in 0..m {
                for j in 0..n {
                    let want = dot::dot_f32(&ws[j * k..(j + 1) * k], &xs[i * k..(i + 1) * k]);
                    assert_eq!(got[i * n + j].to_bits(), want.to_bits(), "k={k} {m}x{n} [{i},{j}]");
                }
            }
        }
    }
}

#[test]
fn every_quantizer_build_gives_the_portable_bits() {
    // random rows of several widths (a tail group, several groups) plus values that test the edges:
    // ties, NaN, infinities, signed zeros, subnormals (whose scale's reciprocal overflows), huge values
    let special = [0.5f32, -0.5, 1.5, -2.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-40, -3e-41, 3e38, -3e38, 127.0, 126.5];
    for (i, &k) in [32usize, 64, 576, 1536].iter().enumerate() {
        let mut x = random(k, 40 + i as u64);
        for (j, v) in x.iter_mut().enumerate().skip(7).step_by(13) {
            *v = special[j % special.len()] * if j % 3 == 0 { 1.0 } else { 1e-3 };
        }
        // a block of subnormals only, and one all zeros
        x[..32.min(k)].iter_mut().enumerate().for_each(|(j, v)| *v = 1e-44 * (j as f32 - 9.0));
        let portable = Q8Row::quantize_portable(&x);
        for (b, (&lo, &sum)) in portable.lo_sums.iter().zip(&portable.sums).enumerate() {
            let half = |h: usize| (16 * h..16 * h + 16).map(|j| portable.value(b, j) as i32).sum::<i32>();
            assert_eq!((lo, sum), (half(0), half(0) + half(1)), "portable block {b}'s sums, width {k}");
        }
        for (build, simd) in quantizer_builds(&x) {
            assert_eq!(&simd.qs[..], &portable.qs[..], "{build} values, width {k}");
            assert_eq!(simd.sums, portable.sums, "{build} sums, width {k}");
            assert_eq!(simd.lo_sums, portable.lo_sums, "{build} first halves' sums, width {k}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&simd.d), bits(&portable.d), "{build} scales, width {k}");
            assert_eq!(bits(&simd.s), bits(&portable.s), "{build} scaled sums, width {k}");
        }
    }
}

/// `x` quantized by the build `Q8Row::quantize` picks and by every SIMD build this CPU can run.
fn quantizer_builds(x: &[f32]) -> Vec<(&'static str, Q8Row)> {
    let mut out = vec![("dispatched", Q8Row::quantize(x))];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            let mut row = Q8Row::default();
            // SAFETY: the CPU has AVX2
            unsafe { row.quantize_avx2(x) };
            out.push(("avx2", row));
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
            let mut row = Q8Row::default();
            // SAFETY: the CPU has these features
            unsafe { row.quantize_avx512(x) };
            out.push(("avx512", row));
        }
    }
    out
}

/// The Q4 formats' largest block sums: every nibble 15 against activations all at +127, all at -127, or
/// alternating in sign, for enough rows to take every kernel's batched path (the AVX2 one adds a lane's
/// products of offset activations in wrapping 16-bit integers, exact only while the true sum fits).
#[test]
fn extreme_q4_and_q5_block_sums_are_bit_identical_to_scalar() {
    let (n, k) = (40usize, 576usize);
    // (Q5_1's values all 31, its fifth bits set too: the AVX2 kernels widen their sums of four chunks
    // apart; 16 rows take the batched kernels, 2 the passes)
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_1] {
        let ts = dtype.type_size();
        let mut data = vec![0xFFu8; n * k / dtype.block_size() * ts];
        let scales = if dtype == GgmlDType::Q4_0 { 1 } else { 2 };
        for blk in data.chunks_exact_mut(ts) {
            for i in 0..scales {
                blk[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(0.0125).to_le_bytes());
            }
        }
        let w = QWeight::new("extreme", dtype, vec![n, k], data).unwrap();
        for m in [2usize, 16] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| match (i / k) % 4 {
                    0 => 1.0,
                    1 => -1.0,
                    2 => [1.0, -1.0][i % 2],
                    _ => [1.0, 1.0, -1.0, -1.0][i % 4],
                })
                .collect();
            let rows = quantize_rows(&x, k);
            assert!(rows[0].qs[..k].iter().all(|&q| q == 127) && rows[1].qs[..k].iter().all(|&q| q == -127));
            assert_every_level_gives_scalar_bits(&w, &rows, &format!("{dtype:?} m={m}"));
        }
    }
}

/// A one-row matrix of GGUF `dtype` bytes `row`, held in an integer format, dequantizes to the bits of
/// `reference` (the GGUF format's own dequantization) block by block.
fn assert_held_with_the_same_values(dtype: GgmlDType, row: &[u8], reference: fn(&[u8], &mut [f32])) {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    let w = QWeight::new("w", dtype, vec![1, row.len() / ts * bs], row.to_vec()).unwrap();
    assert!(w.takes_q8(), "{dtype:?} multiplies 8-bit activations");
    let mut want = vec![0f32; row.len() / ts * bs];
    for (blk, y) in row.chunks_exact(ts).zip(want.chunks_exact_mut(bs)) {
        reference(blk, y);
    }
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&w.dequantize()), bits(&want), "{dtype:?}");
}

#[test]
fn q5_0_is_held_as_q8_0_with_the_same_values() {
    let mut row = random_bytes(22 * 9, 21);
    for (b, blk) in row.chunks_exact_mut(22).enumerate() {
        // finite scales of either sign; the value bytes and fifth bits stay random
        blk[0..2].copy_from_slice(&half::f16::from_f32(0.01 * (b as f32 - 4.5)).to_le_bytes());
    }
    assert_held_with_the_same_values(GgmlDType::Q5_0, &row, dequant::q5_0);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_dequantization_gives_the_portable_bits() {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
        eprintln!("skipped: no AVX2");
        return;
    }
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        let (_, q) = quantized(dtype, 1, 1024, 17);
        let bytes = q.data().unwrap().into_owned();
        let (mut want, mut got) = (vec![0f32; 1024], vec![0f32; 1024]);
        dequant::row(dtype, &bytes, &mut want);
        // SAFETY: the CPU has AVX2 and F16C (checked above)
        unsafe { dequant::row_avx2(dtype, &bytes, &mut got) };
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{dtype:?}");
    }
}

/// Three random Q4_K or Q5_K super-blocks (`dtype`) with finite super-block scales `d` and `dmin`; their
/// 6-bit sub-block scales, minimums, nibbles and (Q5_K) fifth bits stay random.
fn k_quant_row(dtype: GgmlDType, seed: u64) -> Vec<u8> {
    let ts = dtype.type_size();
    let mut row = random_bytes(ts * 3, seed);
    for (b, sb) in row.chunks_exact_mut(ts).enumerate() {
        sb[0..2].copy_from_slice(&half::f16::from_f32(0.003 * (b as f32 + 1.0)).to_le_bytes());
        sb[2..4].copy_from_slice(&half::f16::from_f32(-0.002 * (b as f32 + 0.5)).to_le_bytes());
    }
    row
}

#[test]
fn q4_k_is_held_as_blocks_of_32_with_the_same_values() {
    assert_held_with_the_same_values(GgmlDType::Q4K, &k_quant_row(GgmlDType::Q4K, 31), dequant::q4_k);
}

#[test]
fn q5_1_is_held_as_blocks_of_bytes_with_the_same_values() {
    let mut row = random_bytes(24 * 9, 41);
    for (b, blk) in row.chunks_exact_mut(24).enumerate() {
        // finite scales and minimums of either sign; the nibbles and fifth bits stay random
        blk[0..2].copy_from_slice(&half::f16::from_f32(0.01 * (b as f32 - 4.5)).to_le_bytes());
        blk[2..4].copy_from_slice(&half::f16::from_f32(-0.3 * (b as f32 - 3.5)).to_le_bytes());
    }
    assert_held_with_the_same_values(GgmlDType::Q5_1, &row, dequant::q5_1);
}

#[test]
fn q5_k_is_held_as_blocks_of_32_with_the_same_values() {
    assert_held_with_the_same_values(GgmlDType::Q5K, &k_quant_row(GgmlDType::Q5K, 43), dequant::q5_k);
}

#[test]
fn q6_k_is_held_as_blocks_of_32_with_the_same_values() {
    let mut row = random_bytes(210 * 3, 41);
    for (b, sb) in row.chunks_exact_mut(210).enumerate() {
        // a finite super-block scale of either sign; the 8-bit sub-block scales and values stay random
        sb[208..210].copy_from_slice(&half::f16::from_f32(0.001 * (b as f32 - 1.5)).to_le_bytes());
    }
    assert_held_with_the_same_values(GgmlDType::Q6K, &row, dequant::q6_k);
}

#[test]
fn matrices_of_mixed_formats_sharing_an_input_give_each_ones_bits() {
    // a layer's fused matmuls (q, k, v; gate, up) may mix formats (llama.cpp's K-quant mixes do), and
    // one call multiplies them all against one layout of the rows
    let k = 512;
    let ws: Vec<QWeight> =
        [(GgmlDType::Q4K, 40), (GgmlDType::Q6K, 24), (GgmlDType::Q4_1, 17), (GgmlDType::Q5_1, 20), (GgmlDType::Q8_0, 16), (GgmlDType::Q5K, 18)]
            .iter()
            .enumerate()
            .map(|(i, &(dtype, n))| raw_weight(dtype, n, k, 50 + i as u64))
            .collect();
    for m in [1, 3, 16] {
        let rows = quantize_rows(&random(m * k, 9 + m as u64), k);
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
        let mut dst: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        matmul_q8_many_into(&ws.iter().collect::<Vec<_>>(), &rows, &mut dst);
        for (w, got) in ws.iter().zip(&outs) {
            let want = w.matmul_q8(&rows);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(&want), "{:?} m={m}", w.dtype);
        }
    }
}

#[test]
fn every_int_format_comes_back_from_its_id() {
    // the SIMD kernels are generic over `const F: u8` and take their format back with `from_id`
    use super::simd::IntFormat;
    for f in [IntFormat::Q4_0, IntFormat::Q4_1, IntFormat::Q8_0, IntFormat::Q4K, IntFormat::Q6K, IntFormat::Q5] {
        assert_eq!(IntFormat::from_id(f as u8), f);
    }
}
