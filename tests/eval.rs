//! Evaluation scores each regular token exactly once, from the right context.

mod common;

use candle_core::D;
use giststream::engine::whole::{forward, Layout, Mode};
use giststream::model::ops::Ops;
use giststream::model::random::{synthetic_text, RandomSpec};
use giststream::train::eval::{documents, evaluate, nll_gist, Scoring};

#[test]
fn incremental_nll_matches_the_parallel_path_and_reports_add_up() {
    let (_dir, model) = common::tiny_model(&RandomSpec::default());
    let texts: Vec<String> = (0..3)
        .map(|i| synthetic_text(6 + 3 * i, 6, i as u64))
        .collect();
    let docs = documents(&model, &texts, 0).unwrap();
    let (nll, gists, held) = nll_gist(&model, &docs, 2).unwrap();
    assert_eq!(gists as usize, 4 * docs.iter().map(Vec::len).sum::<usize>());
    assert_eq!(held, gists, "the states hold only gists");
    for (doc, nll) in docs.iter().zip(&nll) {
        // The parallel path's logits, rows of regular tokens predicting the next regular token.
        let layout = Layout::new(&model, std::slice::from_ref(doc), true);
        let logits = forward(&model, &layout, Mode::Sentence, Ops::Fused).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let mut expected = Vec::new();
        let mut prev_row = None;
        for (row, &regular) in layout.regular.iter().enumerate() {
            if regular {
                if let Some(p) = prev_row {
                    let lp: f32 = logp
                        .get(p)
                        .unwrap()
                        .get(layout.ids[row] as usize)
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    expected.push(-lp);
                }
            }
            // The next regular token is predicted by the row just before it (a gist after a sentence).
            prev_row = Some(row);
        }
        assert_eq!(nll.len(), expected.len());
        for (a, b) in nll.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let tokens: usize = doc.iter().map(|s| s.tokens.len()).sum();
        assert_eq!(nll.len(), tokens - 1, "every token but BOS is scored once");
    }
    let r = evaluate(&model, "tiny", &docs, Scoring::Gist, 2).unwrap();
    assert!(r.perplexity.is_finite() && r.second_half_alone.is_finite());
    assert!((r.compression_ratio - r.tokens as f64 / gists as f64).abs() < 1e-9);
    let per_token = model.kv_bytes_per_token(4) as f64;
    assert!((r.kv_bytes_per_token - gists as f64 * per_token / r.tokens as f64).abs() < 1e-6);
    let full = evaluate(&model, "tiny", &docs, Scoring::Full, 2).unwrap();
    assert_eq!(full.tokens, r.tokens);
    assert_eq!(full.kv_bytes_per_token, full.full_kv_bytes_per_token);
}

/// The floor reads each sentence alone: it scores the same tokens, and each sentence's
/// scores are those of a document holding only that sentence.
#[test]
fn the_floor_scores_every_sentence_alone() {
    let (_dir, model) = common::tiny_model(&RandomSpec::default());
    let docs = documents(&model, &[synthetic_text(7, 6, 3)], 0).unwrap();
    let floor = giststream::train::eval::nll_sentences(&model, &docs).unwrap();
    let full = giststream::train::eval::nll_full(&model, &docs).unwrap();
    assert_eq!(floor[0].len(), full[0].len());
    let bos = model.bos_token_id().unwrap();
    let second = &docs[0][1];
    let mut alone = second.clone();
    alone.tokens.insert(0, bos);
    let expected = giststream::train::eval::nll_full(&model, &[vec![alone]]).unwrap();
    // Sentence 0 (after the document's own BOS) covers tokens 1..; sentence 1 follows.
    let start = docs[0][0].tokens.len() - 1;
    let got = &floor[0][start..start + second.tokens.len()];
    for (a, b) in got.iter().zip(&expected[0]) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // And it is not the full-context score.
    let diff: f32 = got
        .iter()
        .zip(&full[0][start..])
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(diff > 1e-3);
    let r = evaluate(&model, "tiny", &docs, Scoring::Sentence, 1).unwrap();
    assert_eq!(r.tokens as usize, full[0].len());
}

/// With the previous sentence kept visible, the states also hold each document's last
/// sentence, and the reported bytes per token count it.
#[test]
fn stored_bytes_count_the_previous_sentence_a_state_holds() {
    let (_dir, model) = common::tiny_model(&RandomSpec {
        previous_sentence_visible: true,
        ..RandomSpec::default()
    });
    let texts: Vec<String> = (0..3)
        .map(|i| synthetic_text(6 + 3 * i, 6, i as u64))
        .collect();
    let docs = documents(&model, &texts, 0).unwrap();
    let (_, gists, held) = nll_gist(&model, &docs, 2).unwrap();
    let last_sentences: usize = docs.iter().map(|d| d.last().unwrap().tokens.len()).sum();
    assert_eq!(held as usize, gists as usize + last_sentences);
    let r = evaluate(&model, "tiny", &docs, Scoring::Gist, 2).unwrap();
    let per_token = model.kv_bytes_per_token(4) as f64;
    assert!((r.kv_bytes_per_token - held as f64 * per_token / r.tokens as f64).abs() < 1e-6);
}
