//! The incremental path (sentence by sentence, only gist K/V kept) computes exactly what
//! the parallel path (whole document, sentence-attention mask) computes, and a plain causal
//! mask does not: the comparison has teeth.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use giststream::engine::state::{advance, Chunk, GistState};
use giststream::engine::whole::{self, Layout, Mode};
use giststream::model::ops::Ops;
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::model::{GistModel, LoadOptions};
use giststream::text::segment::SegmentConfig;
use giststream::text::tokenize::Segment;

/// Documents of different lengths and sentence lengths.
fn documents(model: &GistModel) -> Vec<Vec<Segment>> {
    [(3, 4, 1), (9, 12, 2), (6, 2, 3), (14, 7, 4)]
        .iter()
        .map(|&(sentences, words, seed)| {
            model
                .segments(&synthetic_text(sentences, words, seed))
                .unwrap()
        })
        .collect()
}

/// Each segment fed as one chunk, or (every other one, with `split_tails`) as two: the
/// first part open (a tail that spans steps), then the rest closing the sentence.
fn chunks_of(segs: &[Segment], split_tails: bool) -> Vec<(Vec<u32>, bool)> {
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
fn incremental_logits(
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
fn max_diff_regular(a: &Tensor, b: &Tensor, regular: &[bool]) -> f32 {
    let rows: Vec<u32> = (0..regular.len() as u32)
        .filter(|&i| regular[i as usize])
        .collect();
    let idx = Tensor::new(rows.as_slice(), a.device()).unwrap();
    let a = a.index_select(&idx, 0).unwrap();
    let b = b.index_select(&idx, 0).unwrap();
    common::max_abs_diff(&a, &b)
}

fn check(spec: RandomSpec, batch: usize, split_tails: bool) {
    let (_dir, model) = common::tiny_model(&spec);
    let docs = documents(&model);
    let layout = Layout::new(&model, &docs, true);
    let par = whole::forward(&model, &layout, Mode::Sentence, Ops::Fused).unwrap();
    let par_diff = whole::forward(&model, &layout, Mode::Sentence, Ops::Differentiable).unwrap();
    let causal = whole::forward(&model, &layout, Mode::Causal, Ops::Fused).unwrap();
    let inc = incremental_logits(&model, &docs, batch, split_tails);
    let mut worst_causal = 0f32;
    for (d, doc) in layout.docs.iter().enumerate() {
        let rows = doc.rows.clone();
        let regular = &layout.regular[rows.clone()];
        let p = par.i(rows.clone()).unwrap();
        let c = causal.i(rows.clone()).unwrap();
        assert_eq!(inc[d].dims(), p.dims(), "doc {d}: row count");
        let diff = max_diff_regular(&p, &inc[d], regular);
        assert!(
            diff < 1e-4,
            "N_g={} doc {d}: parallel vs incremental differ by {diff}",
            spec.num_gists
        );
        let ops_diff = max_diff_regular(&p, &par_diff.i(rows.clone()).unwrap(), regular);
        assert!(
            ops_diff < 1e-4,
            "doc {d}: fused vs differentiable ops differ by {ops_diff}"
        );
        worst_causal = worst_causal.max(max_diff_regular(&c, &inc[d], regular));
    }
    assert!(
        worst_causal > 1e-2,
        "a plain causal mask should not match the gist path (diff {worst_causal})"
    );
}

#[test]
fn incremental_equals_parallel_ng1() {
    check(
        RandomSpec {
            num_gists: 1,
            ..RandomSpec::default()
        },
        1,
        false,
    );
}

#[test]
fn incremental_equals_parallel_ng2_batched_with_tails() {
    check(
        RandomSpec {
            num_gists: 2,
            ..RandomSpec::default()
        },
        3,
        true,
    );
}

#[test]
fn incremental_equals_parallel_ng4_batched() {
    check(
        RandomSpec {
            num_gists: 4,
            ..RandomSpec::default()
        },
        4,
        false,
    );
    check(
        RandomSpec {
            num_gists: 4,
            ..RandomSpec::default()
        },
        2,
        true,
    );
}

#[test]
fn incremental_equals_parallel_with_bos_kept_and_tied_head() {
    let spec = RandomSpec {
        num_gists: 2,
        bos_always_visible: true,
        tie_embeddings: true,
        llama3_rope_scaling: false,
        ..RandomSpec::default()
    };
    check(spec, 2, true);
}

#[test]
fn long_sentences_are_cut_at_the_token_limit_and_still_match() {
    let spec = RandomSpec {
        num_gists: 2,
        segmentation: SegmentConfig {
            max_sentence_tokens: 16,
            ..SegmentConfig::default()
        },
        ..RandomSpec::default()
    };
    let (_dir, model) = common::tiny_model(&spec);
    let segs = model
        .segments(&"no punctuation at all ".repeat(20))
        .unwrap();
    assert!(segs.len() >= 20 && segs.iter().all(|s| s.tokens.len() <= 16));
    check(spec, 2, false);
}

#[test]
fn the_state_keeps_only_gists() {
    let (_dir, model) = common::tiny_model(&RandomSpec::default());
    let docs = documents(&model);
    let input = docs
        .iter()
        .enumerate()
        .map(|(i, s)| giststream::engine::compress::Document {
            id: i.to_string(),
            segments: s.clone(),
        })
        .collect();
    let results = giststream::engine::compress::compress(&model, input, 3).unwrap();
    for ((state, report), segs) in results.iter().zip(&docs) {
        let tokens: usize = segs.iter().map(|s| s.tokens.len()).sum();
        assert_eq!(report.tokens as usize, tokens);
        assert_eq!(report.sentences as usize, segs.len());
        assert_eq!(state.kv_len(), 4 * segs.len());
        assert_eq!(state.next_position as usize, tokens + 4 * segs.len());
    }
}

#[test]
fn a_plain_checkpoint_gets_gist_tokens_at_the_mean_embedding() {
    let spec = RandomSpec {
        gist_checkpoint: false,
        vocab: 258,
        ..RandomSpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &spec).unwrap();
    let opts = LoadOptions {
        num_gists: 2,
        ..LoadOptions::default()
    };
    let model = GistModel::load(dir.path(), &Device::Cpu, DType::F32, &opts).unwrap();
    assert_eq!(model.gist.gist_token_ids, vec![258, 259]);
    assert_eq!(model.llama.cfg.vocab, 260);
    assert_eq!(
        model.gist.gist_tokens,
        vec![
            "<end_of_sentence_0>".to_string(),
            "<end_of_sentence_1>".to_string()
        ]
    );
    // Compressing works end to end on it: 2 sentences, 2 gists each.
    let segs = model
        .segments("One sentence here. And another one.")
        .unwrap();
    let mut state = GistState::new(&model).unwrap();
    for s in &segs {
        advance(
            &model,
            &mut [(
                &mut state,
                Chunk {
                    tokens: &s.tokens,
                    close: s.close,
                },
            )],
            false,
        )
        .unwrap();
    }
    assert_eq!(state.kv_len(), 4);
}

#[test]
fn a_state_of_another_model_is_refused() {
    let (_d1, a) = common::tiny_model(&RandomSpec::default());
    let (_d2, b) = common::tiny_model(&RandomSpec {
        seed: 99,
        ..RandomSpec::default()
    });
    assert_ne!(a.fingerprint, b.fingerprint);
    let mut state = GistState::new(&a).unwrap();
    let err = advance(
        &b,
        &mut [(
            &mut state,
            Chunk {
                tokens: &[1, 2],
                close: true,
            },
        )],
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("another model"), "{err}");
}
