//! Helpers shared by the integration tests.

// Each test binary uses its own subset of these.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use giststream::engine::state::{advance, Chunk, GistState};
use giststream::model::random::{write_random_model, RandomSpec};
use giststream::model::{GistModel, LoadOptions};
use giststream::text::tokenize::Segment;

/// A small random model that trains in seconds (the training tests' shape).
pub fn small_spec() -> RandomSpec {
    RandomSpec {
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 128,
        num_gists: 2,
        scale: 0.05,
        embed_scale: 0.05,
        norm_noise: 0.0,
        ..RandomSpec::default()
    }
}

/// The model in `dir`, loaded f32 on the CPU.
pub fn load_model(dir: &std::path::Path) -> GistModel {
    GistModel::load(dir, &Device::Cpu, DType::F32, &LoadOptions::default()).unwrap()
}

/// Largest |x| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A random model of `spec` written to a temporary directory and loaded (f32, CPU).
pub fn tiny_model(spec: &RandomSpec) -> (tempfile::TempDir, GistModel) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), spec).unwrap();
    let model = load_model(dir.path());
    (dir, model)
}

/// Largest |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs a command, failing the test with its stderr unless it succeeds.
pub fn succeed(c: &mut std::process::Command) -> std::process::Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Each segment fed as one chunk, or (every other one, with `split_tails`) as two: the
/// first part open (a tail that spans steps), then the rest closing the sentence.
pub fn chunks_of(segs: &[Segment], split_tails: bool) -> Vec<(Vec<u32>, bool)> {
    let mut out = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        if split_tails && i % 2 == 1 && s.tokens.len() > 3 {
            let cut = s.tokens.len() / 2;
            out.push((s.tokens[..cut].to_vec(), false));
            out.push((s.tokens[cut..].to_vec(), s.close));
        } else {
            out.push((s.tokens.clone(), s.close));
        }
    }
    out
}

/// Logits of every row of every document through the incremental path, `batch` documents
/// advancing together, in the parallel layout's row order per document.
pub fn incremental_logits(
    model: &GistModel,
    docs: &[Vec<Segment>],
    batch: usize,
    split_tails: bool,
) -> Vec<Tensor> {
    let chunked: Vec<_> = docs.iter().map(|d| chunks_of(d, split_tails)).collect();
    let mut per_doc: Vec<Vec<Tensor>> = vec![Vec::new(); docs.len()];
    for group in (0..docs.len()).collect::<Vec<_>>().chunks(batch) {
        let mut states: Vec<GistState> = group
            .iter()
            .map(|_| GistState::new(model).unwrap())
            .collect();
        let steps = group.iter().map(|&d| chunked[d].len()).max().unwrap();
        for step in 0..steps {
            let mut items: Vec<(&mut GistState, Chunk)> = Vec::new();
            let mut lens = Vec::new();
            for (g, state) in states.iter_mut().enumerate() {
                let Some((tokens, close)) = chunked[group[g]].get(step) else {
                    continue;
                };
                let n = tokens.len()
                    + if *close {
                        model.gist.num_gist_tokens
                    } else {
                        0
                    };
                lens.push((group[g], n));
                items.push((
                    state,
                    Chunk {
                        tokens,
                        close: *close,
                    },
                ));
            }
            let logits = advance(model, &mut items, true).unwrap().unwrap();
            let mut row = 0;
            for (d, n) in lens {
                per_doc[d].push(logits.narrow(0, row, n).unwrap());
                row += n;
            }
        }
    }
    per_doc
        .into_iter()
        .map(|parts| Tensor::cat(&parts, 0).unwrap())
        .collect()
}

/// Largest |a - b| over the regular-token rows.
pub fn max_diff_regular(a: &Tensor, b: &Tensor, regular: &[bool]) -> f32 {
    let rows: Vec<u32> = (0..regular.len() as u32)
        .filter(|&i| regular[i as usize])
        .collect();
    let idx = Tensor::new(rows.as_slice(), a.device()).unwrap();
    let a = a.index_select(&idx, 0).unwrap();
    let b = b.index_select(&idx, 0).unwrap();
    max_abs_diff(&a, &b)
}
