//! The block-interleaved layout the integer kernels read, for weights (repacked once at load) and for
//! 8-bit activations (written that way by the quantizer).
//!
//! A row of `nb` 32-value blocks is cut into groups of [`GROUP`] blocks (the last group may be shorter).
//! Inside a group of `g` blocks the values are stored by 4-value chunk, then by block: chunk `k` of block
//! `b` (values `4k..4k+4`) sits at `k * 4g + 4b`. One 512-bit load of a full group's chunk thus holds 4
//! values of each of 16 blocks, and eight `dpbusd` into one register leave each block's exact integer dot
//! product in its own 32-bit lane: no horizontal sums, and the per-block scaling runs 16 blocks at a time.
//!
//! Weight groups keep the GGUF bytes per block, only reordered, so a row has the same size as in the file:
//! - Q4_0 / Q4_1: `16g` bytes of nibbles (nibble chunk `c` of block `b` at `c * 4g + 4b`, the GGUF bytes
//!   `qs[4c..4c+4]`: low nibbles are values `4c..4c+4`, high nibbles values `16+4c..16+4c+4`), then `g` f16
//!   scales, then (Q4_1) `g` f16 minimums.
//! - Q8_0: `32g` bytes of values in the chunk order above, then `g` f16 scales.
//!
//! Activation rows are padded with zero blocks to whole groups, so the kernels load them unmasked.

use super::simd::IntFormat;

/// Blocks per group.
pub const GROUP: usize = 16;

/// Values per block.
pub const QK: usize = 32;

/// Bytes of 4-bit or 8-bit values per block (without scales).
fn value_bytes(f: IntFormat) -> usize {
    match f {
        IntFormat::Q4_0 | IntFormat::Q4_1 => 16,
        IntFormat::Q8_0 => 32,
    }
}

/// Byte offset of the scales (and whether minimums follow) in a GGUF block.
fn gguf_scales(f: IntFormat) -> usize {
    match f {
        IntFormat::Q4_1 => 4,
        IntFormat::Q4_0 | IntFormat::Q8_0 => 2,
    }
}

/// Where block `b` of a row lives: (byte offset of its group, blocks in that group, index in the group).
#[inline(always)]
pub fn locate(f: IntFormat, nb: usize, b: usize) -> (usize, usize, usize) {
    let g0 = b / GROUP * GROUP;
    (g0 * f.block_bytes(), (nb - g0).min(GROUP), b - g0)
}

/// Byte offset, inside a group of `g` blocks, of its f16 scales; the minimums (Q4_1) follow at `+ 2g`.
#[inline(always)]
pub fn scales_at(f: IntFormat, g: usize) -> usize {
    value_bytes(f) * g
}

/// Reorders one row of GGUF blocks into the grouped layout.
pub fn pack_row(f: IntFormat, gguf: &[u8], out: &mut [u8]) {
    let bb = f.block_bytes();
    let nb = gguf.len() / bb;
    let (vb, so) = (value_bytes(f), gguf_scales(f));
    for (b, blk) in gguf.chunks_exact(bb).enumerate() {
        let (base, g, i) = locate(f, nb, b);
        let grp = &mut out[base..base + g * bb];
        for c in 0..vb / 4 {
            grp[c * 4 * g + 4 * i..][..4].copy_from_slice(&blk[so + 4 * c..so + 4 * c + 4]);
        }
        let s = scales_at(f, g);
        grp[s + 2 * i..s + 2 * i + 2].copy_from_slice(&blk[0..2]);
        if f == IntFormat::Q4_1 {
            grp[s + 2 * g + 2 * i..s + 2 * g + 2 * i + 2].copy_from_slice(&blk[2..4]);
        }
    }
}

/// Block `b` of a grouped row back in its GGUF bytes (`out` is one block long).
pub fn unpack_block(f: IntFormat, row: &[u8], b: usize, out: &mut [u8]) {
    let bb = f.block_bytes();
    let nb = row.len() / bb;
    let (vb, so) = (value_bytes(f), gguf_scales(f));
    let (base, g, i) = locate(f, nb, b);
    let grp = &row[base..base + g * bb];
    for c in 0..vb / 4 {
        out[so + 4 * c..so + 4 * c + 4].copy_from_slice(&grp[c * 4 * g + 4 * i..][..4]);
    }
    let s = scales_at(f, g);
    out[0..2].copy_from_slice(&grp[s + 2 * i..s + 2 * i + 2]);
    if f == IntFormat::Q4_1 {
        out[2..4].copy_from_slice(&grp[s + 2 * g + 2 * i..s + 2 * g + 2 * i + 2]);
    }
}

/// Position of value `j` (0..32) of block `b` in an activation row padded to whole groups.
#[inline(always)]
pub fn act_index(b: usize, j: usize) -> usize {
    (b / GROUP) * GROUP * QK + (j / 4) * 4 * GROUP + (b % GROUP) * 4 + j % 4
}
