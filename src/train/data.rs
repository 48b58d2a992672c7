//! Training data: documents cut into sequences of whole sentences with gists inserted,
//! and a data order that is a pure function of the seed and the sequences seen.

use crate::model::config::GistConfig;
use crate::model::random::SplitMix;
use crate::text::encoder::DocumentEncoder;
use crate::text::tokenize::{GistTokenizer, Segment};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Training sequences: runs of whole segments of a document, up to `seq_tokens` regular
/// tokens each, every one starting with BOS when the model uses one (as documents do).
pub fn sequences(
    texts: &[String],
    tokenizer: &GistTokenizer,
    gist: &GistConfig,
    bos: Option<u32>,
    seq_tokens: usize,
) -> anyhow::Result<Vec<Vec<Segment>>> {
    let mut out = Vec::new();
    for text in texts {
        let mut enc = DocumentEncoder::new(tokenizer, &gist.segmentation, bos);
        let mut segs = enc.push(text)?;
        segs.extend(enc.finish()?);
        let mut cur: Vec<Segment> = Vec::new();
        let mut n = 0;
        for mut seg in segs {
            if n + seg.tokens.len() > seq_tokens && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                n = 0;
            }
            if let Some(bos) = bos.filter(|&b| cur.is_empty() && seg.tokens.first() != Some(&b)) {
                seg.tokens.insert(0, bos);
            }
            seg.tokens.truncate(seq_tokens);
            n += seg.tokens.len();
            cur.push(seg);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    Ok(out)
}

/// The `k`-th sequence of the endless shuffled stream: epoch `k / n` is a permutation of
/// all sequences seeded by (seed, epoch).
pub(crate) fn stream_index(k: u64, n: usize, seed: u64, perm: &mut (u64, Vec<usize>)) -> usize {
    let epoch = k / n as u64;
    if perm.1.len() != n || perm.0 != epoch {
        let mut p: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix(seed ^ epoch.wrapping_mul(0x9e37_79b9));
        for i in (1..n).rev() {
            p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        *perm = (epoch, p);
    }
    perm.1[(k % n as u64) as usize]
}

/// Reads every `.txt` file under `dir` (sorted, so runs are reproducible).
pub fn read_texts(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {} (UTF-8 text expected)", f.display()))
        })
        .collect()
}
