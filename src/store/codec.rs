//! The binary record of a [`GistState`]: what the store persists and what crosses process
//! boundaries. Versioned and checksummed, so a record from another format or a flipped bit
//! is a clear error, never a silently wrong state.
//!
//! A state may be stored as several *chunks*, each holding a run of rows of every layer:
//! a document that arrives in parts appends a chunk per part instead of rewriting its state
//! (at a part boundary every sentence is closed, so earlier rows never change). A whole
//! state is one chunk starting at row 0.
//!
//! Layout of a chunk (little-endian):
//!
//! ```text
//! magic "GIST" | version u16 | precision u8 | 0u8
//! fingerprint u64 | next_position u32 | sentences u64 | regular_tokens u64 | gist_tokens u64
//! layers u32 | kv_heads u32 | head_dim u32 | first_row u32 | rows u32
//! tail u32 | tail flags ⌈tail/8⌉ bytes | window u32 (format 3 on)
//! per layer: K then V, each (kv_heads, rows, head_dim) in `precision`
//! crc32 of everything before it
//! ```
//!
//! The counters, the tail and the window describe the whole state after this chunk (the
//! last chunk's are the state's). A chunk may start before the previous one ended: its
//! rows replace those from `first_row` on. That is how a model that keeps the previous
//! sentence visible appends a part: closing the part's first sentence drops the window of
//! the last stored sentence and moves its gists down, so the rows from that window's
//! start change. Int8 stores one f16 scale per (head, row) before the values of that
//! tensor: a scale per row (rather than per head for the whole state) keeps appended rows
//! from changing the encoding of earlier ones.

use crate::engine::state::{GistState, KvBuffer};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"GIST";
/// Bumped on any change of the layout above (2: chunks, `first_row`; 3: `window`, and
/// chunks that overlap the one before).
pub const FORMAT_VERSION: u16 = 3;
/// Records of format 2 still decode: they have no window and never overlap.
const OLDEST_READABLE: u16 = 2;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    F16,
    Bf16,
    /// 8-bit integers with an f16 scale per head and row.
    Int8,
}

impl Precision {
    fn code(self) -> u8 {
        match self {
            Precision::F32 => 0,
            Precision::F16 => 1,
            Precision::Bf16 => 2,
            Precision::Int8 => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => Precision::F32,
            1 => Precision::F16,
            2 => Precision::Bf16,
            3 => Precision::Int8,
            _ => return None,
        })
    }
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a gist state record (bad magic bytes)")]
    BadMagic,
    #[error("gist state record format {found} is not supported (this build reads formats {OLDEST_READABLE} to {FORMAT_VERSION})")]
    Version { found: u16 },
    #[error("gist state record is corrupted: checksum {found:08x}, expected {expected:08x}")]
    Checksum { found: u32, expected: u32 },
    #[error("gist state record is truncated or malformed: {0}")]
    Malformed(&'static str),
}

/// Encodes `state` at `precision`, whole.
pub fn encode(state: &GistState, precision: Precision) -> anyhow::Result<Vec<u8>> {
    encode_rows(state, precision, 0)
}

/// Encodes rows `first_row..` of `state` as a chunk that follows chunks holding the rows
/// before it.
pub fn encode_rows(
    state: &GistState,
    precision: Precision,
    first_row: usize,
) -> anyhow::Result<Vec<u8>> {
    let (kv_heads, total, head_dim) = match state.layers.first() {
        Some(b) => {
            let (k, _) = b.view()?;
            k.dims3()?
        }
        None => (0, 0, 0),
    };
    anyhow::ensure!(
        state.tail_kept.len() <= total,
        "inconsistent state: a tail of {} rows in a state of {total} rows",
        state.tail_kept.len()
    );
    anyhow::ensure!(
        first_row <= total,
        "a chunk from row {first_row} of a state of {total} rows"
    );
    let rows = total - first_row;
    let mut out = Vec::with_capacity(72 + state.layers.len() * 2 * kv_heads * rows * head_dim * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(precision.code());
    out.push(0);
    out.extend_from_slice(&state.fingerprint.to_le_bytes());
    out.extend_from_slice(&state.next_position.to_le_bytes());
    out.extend_from_slice(&state.sentences.to_le_bytes());
    out.extend_from_slice(&state.regular_tokens.to_le_bytes());
    out.extend_from_slice(&state.gist_tokens.to_le_bytes());
    for n in [
        state.layers.len(),
        kv_heads,
        head_dim,
        first_row,
        rows,
        state.tail_kept.len(),
    ] {
        out.extend_from_slice(&(n as u32).to_le_bytes());
    }
    let mut flags = vec![0u8; state.tail_kept.len().div_ceil(8)];
    for (i, &k) in state.tail_kept.iter().enumerate() {
        if k {
            flags[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&flags);
    out.extend_from_slice(&(state.window as u32).to_le_bytes());
    for layer in &state.layers {
        let (k, v) = layer.view()?;
        for t in [k, v] {
            let t = t.narrow(1, first_row, rows)?;
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            write_values(&mut out, &values, precision, head_dim);
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn write_values(out: &mut Vec<u8>, values: &[f32], precision: Precision, head_dim: usize) {
    match precision {
        Precision::F32 => values
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Precision::F16 => values
            .iter()
            .for_each(|x| out.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
        Precision::Bf16 => values
            .iter()
            .for_each(|x| out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes())),
        Precision::Int8 => {
            let rows: Vec<&[f32]> = values.chunks(head_dim.max(1)).collect();
            let scales: Vec<f16> = rows
                .iter()
                .map(|r| f16::from_f32(r.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0))
                .collect();
            scales
                .iter()
                .for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
            for (r, s) in rows.iter().zip(&scales) {
                let s = s.to_f32();
                for x in *r {
                    let q = if s > 0.0 {
                        (x / s).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    out.push(q as i8 as u8);
                }
            }
        }
    }
}

/// A cursor over a record's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Malformed("size overflow"))?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Malformed("ends early"))?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// The precision a record was stored at, after checking magic, version and checksum.
pub fn check(bytes: &[u8]) -> Result<Precision, DecodeError> {
    if bytes.len() < 4 + 2 + 2 + 4 || &bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(DecodeError::Version { found: version });
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let expected = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    let found = crc32fast::hash(body);
    if found != expected {
        return Err(DecodeError::Checksum { found, expected });
    }
    Precision::from_code(bytes[6]).ok_or(DecodeError::Malformed("unknown precision"))
}

/// Decodes a whole-state record into a state on `device` at `dtype` (the model's compute
/// precision).
pub fn decode(bytes: &[u8], device: &Device, dtype: DType) -> anyhow::Result<GistState> {
    decode_chunks(&[bytes], device, dtype)
}

/// One parsed chunk: its header and, per layer, K and V values as f32.
struct Parsed {
    precision: Precision,
    fingerprint: u64,
    next_position: u32,
    sentences: u64,
    regular_tokens: u64,
    gist_tokens: u64,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    first_row: usize,
    rows: usize,
    tail_kept: Vec<bool>,
    window: usize,
    values: Vec<[Vec<f32>; 2]>,
}

fn parse(bytes: &[u8]) -> Result<Parsed, DecodeError> {
    let precision = check(bytes)?;
    let mut r = Reader {
        bytes: &bytes[..bytes.len() - 4],
        pos: 8,
    };
    let fingerprint = r.u64()?;
    let next_position = r.u32()?;
    let sentences = r.u64()?;
    let regular_tokens = r.u64()?;
    let gist_tokens = r.u64()?;
    let layers = r.u32()? as usize;
    let kv_heads = r.u32()? as usize;
    let head_dim = r.u32()? as usize;
    let first_row = r.u32()? as usize;
    let rows = r.u32()? as usize;
    let tail = r.u32()? as usize;
    if tail > first_row.saturating_add(rows) {
        return Err(DecodeError::Malformed("tail longer than the state"));
    }
    let flags = r.take(tail.div_ceil(8))?;
    let tail_kept: Vec<bool> = (0..tail)
        .map(|i| flags[i / 8] & (1 << (i % 8)) != 0)
        .collect();
    let window = if u16::from_le_bytes([bytes[4], bytes[5]]) >= 3 {
        r.u32()? as usize
    } else {
        0
    };
    if window.saturating_add(tail) > first_row.saturating_add(rows) {
        return Err(DecodeError::Malformed("window longer than the state"));
    }
    // Check the declared sizes against the bytes present before allocating anything.
    let n = kv_heads
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(head_dim))
        .ok_or(DecodeError::Malformed("size overflow"))?;
    let per_tensor = match precision {
        Precision::F32 => n.checked_mul(4),
        Precision::F16 | Precision::Bf16 => n.checked_mul(2),
        Precision::Int8 if head_dim == 0 && n > 0 => None,
        Precision::Int8 => n.checked_add(2 * n.checked_div(head_dim).unwrap_or(0)),
    };
    let expected = per_tensor
        .and_then(|t| t.checked_mul(2))
        .and_then(|t| t.checked_mul(layers))
        .ok_or(DecodeError::Malformed("size overflow"))?;
    if r.bytes.len() - r.pos != expected {
        return Err(DecodeError::Malformed(
            "sizes disagree with the record length",
        ));
    }
    let mut values = Vec::with_capacity(layers);
    for _ in 0..layers {
        let k = read_values(&mut r, n, precision, head_dim)?;
        let v = read_values(&mut r, n, precision, head_dim)?;
        values.push([k, v]);
    }
    if r.pos != r.bytes.len() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(Parsed {
        precision,
        fingerprint,
        next_position,
        sentences,
        regular_tokens,
        gist_tokens,
        layers,
        kv_heads,
        head_dim,
        first_row,
        rows,
        tail_kept,
        window,
        values,
    })
}

/// Decodes the chunks of one state, in order, into a state on `device` at `dtype`. Each
/// chunk must start within the rows before it, no earlier than the previous chunk started
/// (its rows replace the rest), and agree with it on model and shape.
pub fn decode_chunks(chunks: &[&[u8]], device: &Device, dtype: DType) -> anyhow::Result<GistState> {
    // Name the chunk in errors only when there are several.
    let fail = |i: usize, e: DecodeError| -> anyhow::Error {
        if chunks.len() > 1 {
            anyhow::anyhow!("chunk {i} of {}: {e}", chunks.len())
        } else {
            e.into()
        }
    };
    let mut parsed: Vec<Parsed> = Vec::with_capacity(chunks.len());
    let mut rows = 0usize;
    for (i, bytes) in chunks.iter().enumerate() {
        let p = parse(bytes).map_err(|e| fail(i, e))?;
        let after_previous = parsed.last().map_or(0, |q| q.first_row);
        if p.first_row > rows || p.first_row < after_previous {
            return Err(fail(
                i,
                DecodeError::Malformed("a chunk does not start within the rows before it"),
            ));
        }
        if let Some(f) = parsed.first() {
            if (f.fingerprint, f.layers, f.kv_heads, f.head_dim, f.precision)
                != (p.fingerprint, p.layers, p.kv_heads, p.head_dim, p.precision)
            {
                return Err(fail(
                    i,
                    DecodeError::Malformed("chunks of different states"),
                ));
            }
        }
        rows = p.first_row + p.rows;
        parsed.push(p);
    }
    let Some(last) = parsed.last() else {
        anyhow::bail!("a state needs at least one chunk");
    };
    let (layers, kv_heads, head_dim) = (last.layers, last.kv_heads, last.head_dim);
    let mut buffers = Vec::with_capacity(layers);
    for layer in 0..layers {
        let mut kv = Vec::with_capacity(2);
        for which in 0..2 {
            // Each chunk's rows up to where the next one starts.
            let parts = parsed
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let values = p.values[layer][which].clone();
                    let t = Tensor::from_vec(values, (kv_heads, p.rows, head_dim), device)?;
                    let upto = parsed
                        .get(i + 1)
                        .map_or(p.rows, |q| q.first_row - p.first_row);
                    t.narrow(1, 0, upto)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            kv.push(Tensor::cat(&parts, 1)?.to_dtype(dtype)?);
        }
        let v = kv.pop().expect("two tensors");
        let k = kv.pop().expect("two tensors");
        buffers.push(KvBuffer::from_tensors(k, v)?);
    }
    let last = parsed.pop().expect("one chunk at least");
    Ok(GistState {
        fingerprint: last.fingerprint,
        layers: buffers,
        tail_kept: last.tail_kept,
        next_position: last.next_position,
        sentences: last.sentences,
        regular_tokens: last.regular_tokens,
        gist_tokens: last.gist_tokens,
        window: last.window,
    })
}

fn read_values(
    r: &mut Reader<'_>,
    n: usize,
    precision: Precision,
    head_dim: usize,
) -> Result<Vec<f32>, DecodeError> {
    Ok(match precision {
        Precision::F32 => r
            .take(
                n.checked_mul(4)
                    .ok_or(DecodeError::Malformed("size overflow"))?,
            )?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        Precision::F16 => r
            .take(n * 2)?
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Precision::Bf16 => r
            .take(n * 2)?
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Precision::Int8 => {
            let groups = n / head_dim.max(1);
            let scales: Vec<f32> = r
                .take(groups * 2)?
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            let q = r.take(n)?;
            q.chunks(head_dim.max(1))
                .zip(&scales)
                .flat_map(|(row, s)| row.iter().map(move |&b| b as i8 as f32 * s))
                .collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, &Device::Cpu, DType::F32);
        }

        #[test]
        fn decoding_a_valid_header_with_random_body_never_panics(
            precision in 0u8..4,
            body in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            // Magic and version right and the checksum recomputed, so parsing goes deep.
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&[precision, 0]);
            bytes.extend_from_slice(&body);
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&bytes, &Device::Cpu, DType::F32);
        }

        #[test]
        fn chunks_decode_to_the_whole_state(
            rows in 0usize..9,
            cuts in prop::collection::vec(0usize..9, 0..4),
            seed in any::<u64>(),
            p in 0u8..4,
        ) {
            let precision = Precision::from_code(p).unwrap();
            let mut rng = crate::model::random::SplitMix(seed);
            let (heads, dim) = (2, 3);
            let mut t = || Tensor::from_vec(
                (0..heads * rows * dim).map(|_| rng.normal()).collect::<Vec<f32>>(),
                (heads, rows, dim),
                &Device::Cpu,
            ).unwrap();
            let layers: Vec<(Tensor, Tensor)> = (0..2).map(|_| (t(), t())).collect();
            // The state as it stood after `n` rows (as when each chunk was written).
            let at = |n: usize| GistState {
                fingerprint: seed,
                layers: layers
                    .iter()
                    .map(|(k, v)| KvBuffer::from_tensors(k.narrow(1, 0, n).unwrap(), v.narrow(1, 0, n).unwrap()).unwrap())
                    .collect(),
                tail_kept: if n == rows { vec![true; rows.min(2)] } else { Vec::new() },
                next_position: n as u32,
                sentences: n as u64,
                regular_tokens: 2 * n as u64,
                gist_tokens: n as u64,
                window: 0,
            };
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(rows)).collect();
            bounds.sort();
            bounds.insert(0, 0);
            bounds.push(rows);
            let chunks: Vec<Vec<u8>> = bounds
                .windows(2)
                .map(|w| encode_rows(&at(w[1]), precision, w[0]).unwrap())
                .collect();
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let joined = decode_chunks(&refs, &Device::Cpu, DType::F32).unwrap();
            let whole = decode(&encode(&at(rows), precision).unwrap(), &Device::Cpu, DType::F32).unwrap();
            prop_assert_eq!(encode(&joined, Precision::F32).unwrap(), encode(&whole, Precision::F32).unwrap());
            // Out of order, or a chunk missing: an error, never a wrong state.
            if refs.len() > 2 && bounds[1] > 0 && bounds[1] < rows {
                prop_assert!(decode_chunks(&refs[1..], &Device::Cpu, DType::F32).is_err());
            }
        }

        /// A state whose later rows are rewritten between parts (a model that keeps the
        /// previous sentence visible), stored as chunks that each start where its rows
        /// began to differ, decodes to the last state.
        #[test]
        fn overlapping_chunks_decode_to_the_last_state(
            steps in prop::collection::vec((0usize..4, 1usize..5), 1..5),
            seed in any::<u64>(),
            p in 0u8..4,
        ) {
            let precision = Precision::from_code(p).unwrap();
            let mut rng = crate::model::random::SplitMix(seed);
            let (heads, dim) = (2, 3);
            let mut rows_of = |n: usize| Tensor::from_vec(
                (0..heads * n * dim).map(|_| rng.normal()).collect::<Vec<f32>>(),
                (heads, n, dim),
                &Device::Cpu,
            ).unwrap();
            let state = |k: &Tensor, window: usize| {
                let n = k.dim(1).unwrap();
                GistState {
                    fingerprint: seed,
                    layers: vec![KvBuffer::from_tensors(k.clone(), (k * 2.0).unwrap()).unwrap()],
                    tail_kept: Vec::new(),
                    next_position: n as u32,
                    sentences: n as u64,
                    regular_tokens: n as u64,
                    gist_tokens: n as u64,
                    window: window.min(n),
                }
            };
            // Each step keeps rows ..from (at least where the previous chunk started) and
            // appends new ones.
            let mut k = rows_of(2);
            let mut chunks = vec![encode(&state(&k, 1), precision).unwrap()];
            let (mut started, mut window) = (0, 1);
            for (back, add) in steps {
                let n = k.dim(1).unwrap();
                let from = n.saturating_sub(back).max(started);
                k = Tensor::cat(&[&k.narrow(1, 0, from).unwrap(), &rows_of(add)], 1).unwrap();
                chunks.push(encode_rows(&state(&k, add), precision, from).unwrap());
                (started, window) = (from, add);
            }
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let joined = decode_chunks(&refs, &Device::Cpu, DType::F32).unwrap();
            let last = state(&k, 0);
            let whole = decode(&encode(&last, precision).unwrap(), &Device::Cpu, DType::F32).unwrap();
            prop_assert_eq!(joined.window, window);
            let (a, b) = (joined.layers[0].view().unwrap(), whole.layers[0].view().unwrap());
            prop_assert_eq!(a.0.dims(), b.0.dims());
            prop_assert_eq!(a.0.to_vec3::<f32>().unwrap(), b.0.to_vec3::<f32>().unwrap());
            prop_assert_eq!(a.1.to_vec3::<f32>().unwrap(), b.1.to_vec3::<f32>().unwrap());
        }

        /// A chunk starting before the one before it started is refused.
        #[test]
        fn a_chunk_reaching_back_past_the_previous_one_is_refused(seed in any::<u64>()) {
            let mut rng = crate::model::random::SplitMix(seed);
            let k = Tensor::from_vec((0..2 * 6 * 3).map(|_| rng.normal()).collect::<Vec<f32>>(), (2, 6, 3), &Device::Cpu).unwrap();
            let state = GistState {
                fingerprint: seed,
                layers: vec![KvBuffer::from_tensors(k.clone(), k).unwrap()],
                tail_kept: Vec::new(),
                next_position: 6,
                sentences: 1,
                regular_tokens: 6,
                gist_tokens: 4,
                window: 2,
            };
            let chunks = [encode_rows(&state, Precision::F32, 0).unwrap(), encode_rows(&state, Precision::F32, 4).unwrap(), encode_rows(&state, Precision::F32, 3).unwrap()];
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            prop_assert!(decode_chunks(&refs[..2], &Device::Cpu, DType::F32).is_ok());
            let err = decode_chunks(&refs, &Device::Cpu, DType::F32).unwrap_err();
            prop_assert!(err.to_string().contains("chunk 2 of 3"), "{err}");
        }

        #[test]
        fn small_random_states_round_trip_exactly_in_f32(
            layers in 0usize..3, heads in 1usize..3, rows in 0usize..5, dim in 1usize..5,
            tail in 0usize..5, seed in any::<u64>(),
        ) {
            let mut rng = crate::model::random::SplitMix(seed);
            let n = heads * rows * dim;
            let mut buffers = Vec::new();
            for _ in 0..layers {
                let mut t = || Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f32>>(), (heads, rows, dim), &Device::Cpu).unwrap();
                let (k, v) = (t(), t());
                buffers.push(KvBuffer::from_tensors(k, v).unwrap());
            }
            let tail = if layers == 0 { 0 } else { tail.min(rows) };
            let state = GistState {
                fingerprint: seed,
                layers: buffers,
                tail_kept: (0..tail).map(|i| i % 2 == 0).collect(),
                next_position: 7,
                sentences: 3,
                regular_tokens: 11,
                gist_tokens: 12,
                window: if layers == 0 { 0 } else { (rows - tail).min(seed as usize % 3) },
            };
            for p in [Precision::F32, Precision::F16, Precision::Bf16, Precision::Int8] {
                let bytes = encode(&state, p).unwrap();
                let back = decode(&bytes, &Device::Cpu, DType::F32).unwrap();
                prop_assert_eq!(back.tail_kept.clone(), state.tail_kept.clone());
                prop_assert_eq!(back.window, state.window);
                prop_assert_eq!(back.layers.len(), layers);
                if p == Precision::F32 {
                    prop_assert_eq!(encode(&back, p).unwrap(), bytes);
                }
            }
        }
    }

    /// Records written before format 3 (no window field) still decode, with no window.
    #[test]
    fn a_format_2_record_decodes_with_no_window() {
        let k = Tensor::from_vec(
            (0..2 * 3 * 4).map(|i| i as f32).collect::<Vec<f32>>(),
            (2, 3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let state = GistState {
            fingerprint: 9,
            layers: vec![KvBuffer::from_tensors(k.clone(), (&k + 1.0).unwrap()).unwrap()],
            tail_kept: vec![true],
            next_position: 3,
            sentences: 1,
            regular_tokens: 5,
            gist_tokens: 2,
            window: 0,
        };
        let v3 = encode(&state, Precision::F32).unwrap();
        // Format 2: the same bytes without the window field, under version 2.
        let header = 8 + 8 + 4 + 8 + 8 + 8 + 6 * 4 + 1; // through the one flag byte
        let mut v2 = v3[..header].to_vec();
        v2.extend_from_slice(&v3[header + 4..v3.len() - 4]);
        v2[4..6].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&crc.to_le_bytes());
        let back = decode(&v2, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(encode(&back, Precision::F32).unwrap(), v3);
        // And a format this build does not know is named.
        let mut v9 = v3.clone();
        v9[4..6].copy_from_slice(&9u16.to_le_bytes());
        let err = decode(&v9, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("format 9") && err.contains("formats 2 to 3"),
            "{err}"
        );
    }
}
