//! The layouts the integer kernels read: weights in tiles of 16 rows (repacked once at load), and 8-bit
//! activations in groups of 16 blocks (written that way by the quantizer).
//!
//! **Weights.** A matrix's rows are cut into tiles of [`TILE`] rows (the last one padded with zero
//! rows), each `TILE * row_bytes` long, the GGUF bytes of its rows reordered so that the 16 rows sit side
//! by side: the values of block 0, block 1, ... (`16 * value_bytes` each), then the 16 rows' f16 scales
//! of every block (32 bytes per block), then (Q4_1) their f16 minimums; Q4K (GGUF Q4_K as blocks of 32)
//! the same with f32 scales and minimums (64 bytes per block each). Inside a block's values, line
//! `c` (64 bytes) holds bytes `4c..4c+4` of every row's values, row `n` at `4n..4n+4`:
//! - Q4_0 / Q4_1 / Q4K: 4 lines, the GGUF nibble bytes `qs[4c..4c+4]` (low nibbles are values `4c..4c+4`, high
//!   nibbles values `16+4c..16+4c+4`);
//! - Q8_0: 8 lines, values `4c..4c+4`; Q6K (GGUF Q6_K as blocks of 32, two f32 scales per block in
//!   the scales' and minimums' places) the same with its 6-bit values unsigned;
//! - Q5 (GGUF Q5_1 and Q5_K as blocks of 32, f32 scale and minimum): 4 lines of low nibbles as Q4's,
//!   then a line of fifth bits: bit `c` of row `n`'s byte `4n + i` is the fifth bit of value `4c + i`
//!   (so shifting that line by `4 - c` bits, or `c - 4` the other way, puts chunk `c`'s fifth bits at
//!   bit 4 of its bytes).
//!
//! A 512-bit register then holds one 4-value chunk of one block for the 16 rows, and one `dpbusd`
//! against that chunk of an activation block broadcast to every lane adds 4 products to each of the 16
//! rows' block sums.
//!
//! **Activations.** A row of `nb` 32-value blocks holds each block's 32 values in order (block `b` at
//! `32 * b`), padded with zero blocks to whole groups of [`GROUP`] blocks.

use super::simd::IntFormat;

/// Blocks per activation group (rows are padded to whole groups; also the lane accumulators of the
/// canonical sum).
pub const GROUP: usize = 16;

/// Weight rows per tile.
pub const TILE: usize = 16;

/// Values per block.
pub const QK: usize = 32;

/// Bytes of 4-bit or 8-bit values per block (without scales).
pub fn value_bytes(f: IntFormat) -> usize {
    match f {
        IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K => 16,
        IntFormat::Q5 => 20,
        IntFormat::Q8_0 | IntFormat::Q6K => 32,
    }
}

/// Bytes of one scale or minimum: f16, Q4K's, Q6K's and Q5's f32.
#[inline(always)]
pub fn scale_bytes(f: IntFormat) -> usize {
    if matches!(f, IntFormat::Q4K | IntFormat::Q6K | IntFormat::Q5) {
        4
    } else {
        2
    }
}

/// Byte offset of the values in a GGUF block (after the scale and, for Q4_1, the minimum; Q4K's blocks
/// of 32 are this crate's: f32 scale, f32 minimum, then the nibbles as in Q4_1).
fn gguf_values(f: IntFormat) -> usize {
    match f {
        IntFormat::Q4_1 => 4,
        IntFormat::Q4_0 | IntFormat::Q8_0 => 2,
        IntFormat::Q4K | IntFormat::Q6K | IntFormat::Q5 => 8,
    }
}

/// Byte offset, inside a tile of rows with `nb` blocks, of block `b`'s value lines.
#[inline(always)]
pub fn values_at(f: IntFormat, b: usize) -> usize {
    b * TILE * value_bytes(f)
}

/// Byte offset, inside a tile of rows with `nb` blocks, of block `b`'s 16 scales.
#[inline(always)]
pub fn scales_at(f: IntFormat, nb: usize, b: usize) -> usize {
    nb * TILE * value_bytes(f) + scale_bytes(f) * TILE * b
}

/// Byte offset, inside a tile of rows with `nb` blocks, of block `b`'s 16 minimums (Q4_1, Q4K) or second
/// scales (Q6K).
#[inline(always)]
pub fn minimums_at(f: IntFormat, nb: usize, b: usize) -> usize {
    scales_at(f, nb, b) + scale_bytes(f) * TILE * nb
}

/// Row `n`'s scale (or minimum) among the 16 at byte `at` of a tile.
#[inline(always)]
pub fn scale(f: IntFormat, tile: &[u8], at: usize, n: usize) -> f32 {
    if scale_bytes(f) == 4 {
        f32::from_le_bytes(tile[at + 4 * n..at + 4 * n + 4].try_into().expect("4 bytes"))
    } else {
        super::dequant::f16_at(tile, at + 2 * n)
    }
}

/// Bytes the tiles of `rows` rows of `row_bytes` take (the last tile padded to 16 rows).
pub fn tiled_len(rows: usize, row_bytes: usize) -> usize {
    rows.div_ceil(TILE) * TILE * row_bytes
}

/// Writes GGUF row `n` (0..16) of a tile (`tile` is `16 * gguf.len()` bytes long) into its place.
pub fn pack_row(f: IntFormat, gguf: &[u8], tile: &mut [u8], n: usize) {
    let bb = f.block_bytes();
    let nb = gguf.len() / bb;
    let (vb, vo) = (value_bytes(f), gguf_values(f));
    assert_eq!(tile.len(), TILE * gguf.len());
    for (b, blk) in gguf.chunks_exact(bb).enumerate() {
        let v = values_at(f, b);
        for c in 0..vb / 4 {
            tile[v + c * 64 + 4 * n..][..4].copy_from_slice(&blk[vo + 4 * c..vo + 4 * c + 4]);
        }
        let sb = scale_bytes(f);
        let s = scales_at(f, nb, b) + sb * n;
        tile[s..s + sb].copy_from_slice(&blk[0..sb]);
        if f.two_scales() {
            let m = minimums_at(f, nb, b) + sb * n;
            tile[m..m + sb].copy_from_slice(&blk[sb..2 * sb]);
        }
    }
}

/// Block `b` of row `n` of a tile (rows of `nb` blocks) back in its GGUF bytes (`out` is one block long).
pub fn unpack_block(f: IntFormat, tile: &[u8], nb: usize, n: usize, b: usize, out: &mut [u8]) {
    let (vb, vo) = (value_bytes(f), gguf_values(f));
    let v = values_at(f, b);
    for c in 0..vb / 4 {
        out[vo + 4 * c..vo + 4 * c + 4].copy_from_slice(&tile[v + c * 64 + 4 * n..][..4]);
    }
    let sb = scale_bytes(f);
    let s = scales_at(f, nb, b) + sb * n;
    out[0..sb].copy_from_slice(&tile[s..s + sb]);
    if f.two_scales() {
        let m = minimums_at(f, nb, b) + sb * n;
        out[sb..2 * sb].copy_from_slice(&tile[m..m + sb]);
    }
}

/// Weight value `j` (0..32) of block `b` of row `n` in a tile, as stored: Q4 nibbles unsigned (0..15),
/// Q8_0 signed, Q6K unsigned (0..63), Q5 unsigned (0..31, its nibble and fifth bit).
#[inline(always)]
pub fn weight_value(f: IntFormat, tile: &[u8], n: usize, b: usize, j: usize) -> i32 {
    let v = values_at(f, b);
    match f {
        IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K => {
            let byte = tile[v + (j % 16) / 4 * 64 + 4 * n + j % 4];
            (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i32
        }
        IntFormat::Q8_0 => tile[v + j / 4 * 64 + 4 * n + j % 4] as i8 as i32,
        IntFormat::Q5 => q5_value(tile[v + (j % 16) / 4 * 64 + 4 * n + j % 4], tile[v + 4 * 64 + 4 * n + j % 4], j) as i32,
        IntFormat::Q6K => tile[v + j / 4 * 64 + 4 * n + j % 4] as i32,
    }
}

/// Q5 value `j` (0..32) from the byte of nibbles holding it (its low nibble for `j < 16`, else its high
/// one) and the byte of fifth bits holding its own (bit `j / 4`).
#[inline(always)]
pub fn q5_value(nibbles: u8, fifth_bits: u8, j: usize) -> u8 {
    let low = if j < 16 { nibbles & 0x0F } else { nibbles >> 4 };
    low | (((fifth_bits >> (j / 4)) & 1) << 4)
}

/// Position of value `j` (0..32) of block `b` in an activation row.
#[inline(always)]
pub fn act_index(b: usize, j: usize) -> usize {
    b * QK + j
}
