//! Scalar dequantization of GGML block formats, one block at a time (layouts as in ggml-quants.c).

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// A row of GGUF blocks `b` of a format without integer kernels (as `QWeight::new` admits them)
/// dequantized into `y`.
#[inline(always)]
pub(crate) fn row(dtype: GgmlDType, b: &[u8], y: &mut [f32]) {
    match dtype {
        GgmlDType::F32 => f32_block(b, y),
        GgmlDType::F16 => f16_block(b, y),
        GgmlDType::BF16 => bf16_block(b, y),
        _ => unreachable!("{dtype:?} is held in an integer format or refused by QWeight::new"),
    }
}

/// [`row`] compiled for AVX2, which the compiler vectorizes (elementwise, so the same bits).
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn row_avx2(dtype: GgmlDType, b: &[u8], y: &mut [f32]) {
    row(dtype, b, y)
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Q4_0: f16 scale, 32 4-bit values centred on 8.
pub(crate) fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 scale and minimum, 32 4-bit values.
pub(crate) fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 scale, 32 5-bit values centred on 16 (fifth bits packed in a u32). Q5_0 weights are held as
/// Q8_0 (`super::int_format`); this is the reference the tests hold that conversion to.
#[cfg(test)]
pub(crate) fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0xF) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 scale and minimum, 32 5-bit values. Q5_1 weights are held as `super::IntFormat::Q5`; this
/// is the reference the tests hold that conversion to.
#[cfg(test)]
pub(crate) fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0xF) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 scale, 32 signed bytes.
pub(crate) fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// A Q4_K sub-block as held (`super::IntFormat::Q4K`): f32 scale and minimum, then nibbles as in Q4_1.
pub(crate) fn q4_k_held(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let m = f32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// A Q6_K block of 32 as held (`super::IntFormat::Q6K`): the f32 scales of its halves, then 32 unsigned
/// 6-bit values.
pub(crate) fn q6_k_held(b: &[u8], y: &mut [f32]) {
    let d = [f32::from_le_bytes([b[0], b[1], b[2], b[3]]), f32::from_le_bytes([b[4], b[5], b[6], b[7]])];
    for (j, v) in y[..32].iter_mut().enumerate() {
        *v = d[j / 16] * (b[8 + j] as i32 - 32) as f32;
    }
}

/// A Q5_1 or Q5_K block of 32 as held (`super::IntFormat::Q5`): f32 scale and minimum, 16 bytes of low
/// nibbles as in Q4_1, then 4 bytes of fifth bits (byte `j % 4`, bit `j / 4` for value `j`).
pub(crate) fn q5_held(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let m = f32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, v) in y[..32].iter_mut().enumerate() {
        *v = super::pack::q5_value(b[8 + j % 16], b[24 + j % 4], j) as f32 * d + m;
    }
}

/// Q4_K: super-block of 256 with 8 sub-blocks, 6-bit scales and minimums. Q4_K weights are held as
/// `super::IntFormat::Q4K`; this is the reference the tests hold that conversion to.
#[cfg(test)]
pub(crate) fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let mut q = &b[16..144];
    let mut out = 0;
    for is in (0..8).step_by(2) {
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        for l in 0..32 {
            y[out + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[out + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
        out += 64;
        q = &q[32..];
    }
}

/// Q5_K: as Q4_K with a fifth bit per value. Q5_K weights are held as `super::IntFormat::Q5`; this is the
/// reference the tests hold that conversion to.
#[cfg(test)]
pub(crate) fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let mut ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    let mut out = 0;
    for is in (0..8).step_by(2) {
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[out + l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            y[out + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
        out += 64;
        ql = &ql[32..];
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// Q6_K: super-block of 256, 6-bit values, 16 signed 8-bit scales, f16 scale at the end. Q6_K weights
/// are held as `super::IntFormat::Q6K`; this is the reference the tests hold that conversion to.
#[cfg(test)]
pub(crate) fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[inline(always)]
pub(crate) fn f32_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[inline(always)]
pub(crate) fn f16_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

#[inline(always)]
pub(crate) fn bf16_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}
