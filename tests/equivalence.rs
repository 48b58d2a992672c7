//! The incremental path (sentence by sentence, only gist K/V kept) computes exactly what
//! the parallel path (whole document, sentence-attention mask) computes, and a plain causal
//! mask does not: the comparison has teeth.

mod common;

use candle_core::{DType, Device, IndexOp};
use giststream::engine::state::{advance, Chunk, GistState};
use giststream::engine::whole::{self, Layout, Mode};
use giststream::model::config::{DistanceDecay, Incremental, PositionScheme};
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

/// The documents as compression input, named by their index.
fn numbered(docs: &[Vec<Segment>]) -> Vec<giststream::engine::compress::Document> {
    docs.iter()
        .enumerate()
        .map(|(i, s)| giststream::engine::compress::Document {
            id: i.to_string(),
            segments: s.clone(),
        })
        .collect()
}

fn check(spec: RandomSpec, batch: usize, split_tails: bool) {
    let (_dir, model) = common::tiny_model(&spec);
    let docs = documents(&model);
    let layout = Layout::new(&model, &docs, true);
    let par = whole::forward(&model, &layout, Mode::Sentence, Ops::Fused).unwrap();
    let par_diff = whole::forward(&model, &layout, Mode::Sentence, Ops::Differentiable).unwrap();
    let causal = whole::forward(&model, &layout, Mode::Causal, Ops::Fused).unwrap();
    let inc = common::incremental_logits(&model, &docs, batch, split_tails);
    let mut worst_causal = 0f32;
    for (d, doc) in layout.docs.iter().enumerate() {
        let rows = doc.rows.clone();
        let regular = &layout.regular[rows.clone()];
        let p = par.i(rows.clone()).unwrap();
        let c = causal.i(rows.clone()).unwrap();
        assert_eq!(inc[d].dims(), p.dims(), "doc {d}: row count");
        let diff = common::max_diff_regular(&p, &inc[d], regular);
        assert!(
            diff < 1e-4,
            "N_g={} doc {d}: parallel vs incremental differ by {diff}",
            spec.num_gists
        );
        let ops_diff = common::max_diff_regular(&p, &par_diff.i(rows.clone()).unwrap(), regular);
        assert!(
            ops_diff < 1e-4,
            "doc {d}: fused vs differentiable ops differ by {ops_diff}"
        );
        worst_causal = worst_causal.max(common::max_diff_regular(&c, &inc[d], regular));
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
    let input = numbered(&docs);
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

// ---------------------------------------------------------------------------------------
// The compressed position scheme
// ---------------------------------------------------------------------------------------

fn compressed(num_gists: usize) -> RandomSpec {
    RandomSpec {
        num_gists,
        positions: PositionScheme::Compressed,
        ..RandomSpec::default()
    }
}

#[test]
fn compressed_positions_incremental_equals_parallel() {
    check(compressed(1), 1, false);
    check(compressed(2), 3, true);
    check(compressed(4), 2, true);
    // Blocks of the parallel path hold many sentences: later sentences of a block read the
    // stored copies of the earlier ones' gists, and the first of the next block reads them
    // as its prefix.
    let spec = RandomSpec {
        bos_always_visible: true,
        tie_embeddings: true,
        ..compressed(2)
    };
    check(spec, 2, true);
}

#[test]
fn compressed_positions_differ_from_original_and_span_the_state_only() {
    let (_d1, orig) = common::tiny_model(&RandomSpec {
        num_gists: 2,
        ..RandomSpec::default()
    });
    let (_d2, comp) = common::tiny_model(&compressed(2));
    let docs = documents(&comp);
    // Same weights, other positions: the logits differ past the first sentence.
    let lo = Layout::new(&orig, &docs, true);
    let lc = Layout::new(&comp, &docs, true);
    assert_eq!(lo.ids, lc.ids);
    let po = whole::forward(&orig, &lo, Mode::Sentence, Ops::Fused).unwrap();
    let pc = whole::forward(&comp, &lc, Mode::Sentence, Ops::Fused).unwrap();
    assert!(common::max_diff_regular(&po, &pc, &lo.regular) > 1e-3);
    // Positions never pass the state's rows: a document ends at N_g per earlier sentence
    // plus its last sentence, not at its token count.
    for (d, segs) in lc.docs.iter().zip(&docs) {
        let max = lc.positions[d.rows.clone()].iter().max().copied().unwrap() as usize;
        let expected = segs
            .iter()
            .enumerate()
            .map(|(i, seg)| 2 * i + seg.tokens.len() + if seg.close { 2 } else { 0 } - 1)
            .max()
            .unwrap();
        assert_eq!(max, expected, "{} rows", d.rows.len());
    }
    let input = numbered(&docs);
    for (state, _) in giststream::engine::compress::compress(&comp, input, 2).unwrap() {
        assert_eq!(state.next_position as usize, state.kv_len());
    }
}

/// Both incremental engines (per-document buffers and the batched slot cache) store the
/// same keys: the re-rotation of moved gists is done the same way in both.
#[test]
fn compressed_positions_slots_equal_per_document_states() {
    for spec in [
        compressed(3),
        RandomSpec {
            bos_always_visible: true,
            ..compressed(1)
        },
    ] {
        engines_agree(&spec);
    }
}

/// Compresses the test documents with both incremental engines and compares the states.
fn engines_agree(spec: &RandomSpec) {
    let (_dir, model) = common::tiny_model(spec);
    let docs = documents(&model);
    let input = |_: ()| {
        numbered(&docs)
            .into_iter()
            .map(|d| (d, GistState::new(&model).unwrap()))
            .collect::<Vec<_>>()
    };
    let per =
        giststream::engine::compress::compress_with(&model, input(()), 3, Incremental::PerDocument)
            .unwrap();
    let slots =
        giststream::engine::compress::compress_with(&model, input(()), 3, Incremental::Slots)
            .unwrap();
    for ((a, _), (b, _)) in per.iter().zip(&slots) {
        assert_eq!(spec.previous_sentence_visible, a.window > 0);
        assert_eq!(
            (a.next_position, a.kv_len(), a.window),
            (b.next_position, b.kv_len(), b.window)
        );
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            let ((ka, va), (kb, vb)) = (la.view().unwrap(), lb.view().unwrap());
            for (x, y) in [(ka, kb), (va, vb)] {
                let diff = common::max_abs_diff(&x, &y);
                assert!(diff < 1e-4, "{diff}");
            }
        }
    }
}

/// Training with a carried memory (`train::memory`): a document cut into sequences, each
/// read after the kept rows (gists, a kept BOS) of those before it, computes what the whole
/// document computes in one forward, on both ops paths; the same sequence read without
/// its memory does not.
#[test]
fn a_carried_memory_continues_a_document_exactly() {
    use giststream::model::llama::Logits;
    use giststream::train::memory::{forward_continued, without_bos, Memory};
    let kept_bos = RandomSpec {
        bos_always_visible: true,
        ..compressed(4)
    };
    // With the window the memory also holds the last segment of the text before, which
    // the next sequence's first segment reads whole.
    // With a BOS sink, the memory's BOS is read at each segment's sink; cut after the
    // first sentence, the window's held segment is the one BOS starts.
    let specs = [
        compressed(2),
        kept_bos.clone(),
        windowed(compressed(2)),
        windowed(kept_bos.clone()),
        sunk(kept_bos.clone(), 6),
        sunk(windowed(kept_bos.clone()), 6),
        // Faded keys: the memory's rows (kept and held) at the positions the whole
        // document reads them from.
        decayed(compressed(2), 1.5, 2),
        decayed(sunk(windowed(kept_bos), 6), 1.0, 3),
    ];
    for spec in specs {
        let cuts = match spec.sink_distance {
            None => [0..4, 4..9, 9..usize::MAX],
            Some(_) => [0..1, 1..6, 6..usize::MAX],
        };
        let (_dir, model) = common::tiny_model(&spec);
        let doc = model.segments(&synthetic_text(14, 7, 4)).unwrap();
        assert!(doc.len() >= 10 && doc[..doc.len() - 1].iter().all(|s| s.close));
        let whole_layout = Layout::new(&model, std::slice::from_ref(&doc), true);
        let whole = whole::forward(&model, &whole_layout, Mode::Sentence, Ops::Fused).unwrap();
        for ops in [Ops::Fused, Ops::Differentiable] {
            let mut memory = vec![Memory::default()];
            let (mut row, mut worst_alone) = (0, 0f32);
            for cut in cuts.clone() {
                let cut = cut.start..cut.end.min(doc.len());
                let seq = match cut.start {
                    0 => doc[cut].to_vec(),
                    _ => without_bos(&doc[cut], model.bos_token_id()),
                };
                let before = memory[0].rows();
                let layout = Layout::continued(
                    &model,
                    std::slice::from_ref(&seq),
                    true,
                    &[memory[0].carried()],
                );
                let n = layout.ids.len();
                assert_eq!(
                    layout.ids,
                    whole_layout.ids[row..row + n],
                    "{ops:?}: the same tokens"
                );
                let (logits, next) =
                    forward_continued(&model, &layout, &memory, ops, &Logits::All).unwrap();
                let expected = whole.i(row..row + n).unwrap();
                let diff = common::max_diff_regular(&expected, &logits.unwrap(), &layout.regular);
                assert!(
                    diff < 1e-4,
                    "N_g={} {ops:?}: rows {row}.. after their memory differ from the whole \
                     document by {diff}",
                    spec.num_gists
                );
                if before > 0 {
                    let alone = Layout::new(&model, std::slice::from_ref(&seq), true);
                    let a = whole::forward(&model, &alone, Mode::Sentence, ops).unwrap();
                    worst_alone =
                        worst_alone.max(common::max_diff_regular(&expected, &a, &alone.regular));
                }
                memory = next;
                row += n;
            }
            assert_eq!(row, whole_layout.ids.len());
            let kept = whole_layout.docs[0].kept.iter().filter(|&&k| k).count();
            assert_eq!(
                memory[0].rows(),
                kept,
                "the memory holds every kept row once"
            );
            assert!(
                worst_alone > 1e-2,
                "{ops:?}: a sequence without its memory should not match ({worst_alone})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The previous sentence kept visible (gist.json `previous_sentence_visible`)
// ---------------------------------------------------------------------------------------

fn windowed(spec: RandomSpec) -> RandomSpec {
    RandomSpec {
        previous_sentence_visible: true,
        ..spec
    }
}

/// The incremental path, holding the last closed sentence whole until the next one
/// closes, computes what the parallel path computes under the windowed mask, in both
/// position schemes (the compressed one reads that sentence at a third set of positions).
#[test]
fn the_previous_sentence_window_incremental_equals_parallel() {
    for positions in [PositionScheme::Original, PositionScheme::Compressed] {
        let base = |n: usize| RandomSpec {
            num_gists: n,
            positions,
            ..RandomSpec::default()
        };
        check(windowed(base(1)), 1, false);
        check(windowed(base(2)), 3, true);
        check(windowed(base(4)), 2, true);
        check(
            windowed(RandomSpec {
                bos_always_visible: true,
                tie_embeddings: true,
                ..base(2)
            }),
            2,
            true,
        );
    }
}

/// The window changes what a sentence reads (the comparison has teeth), and the state
/// holds the gists, plus the last sentence whole: one sentence more than without it.
#[test]
fn the_window_changes_the_logits_and_holds_one_sentence_more() {
    for positions in [PositionScheme::Original, PositionScheme::Compressed] {
        let spec = RandomSpec {
            num_gists: 2,
            positions,
            ..RandomSpec::default()
        };
        let (_d1, plain) = common::tiny_model(&spec);
        let (_d2, win) = common::tiny_model(&windowed(spec));
        let docs = documents(&win);
        let lp = Layout::new(&plain, &docs, true);
        let lw = Layout::new(&win, &docs, true);
        assert_eq!(lp.ids, lw.ids);
        let pp = whole::forward(&plain, &lp, Mode::Sentence, Ops::Fused).unwrap();
        let pw = whole::forward(&win, &lw, Mode::Sentence, Ops::Fused).unwrap();
        let diff = common::max_diff_regular(&pp, &pw, &lp.regular);
        assert!(
            diff > 1e-3,
            "{positions:?}: the window changed nothing ({diff})"
        );
        let states =
            |m: &GistModel| giststream::engine::compress::compress(m, numbered(&docs), 2).unwrap();
        for (((sp, _), (sw, _)), segs) in states(&plain).iter().zip(states(&win)).zip(&docs) {
            // No BOS is kept here: the window is every token of the last closed sentence.
            let last = segs.iter().rev().find(|s| s.close).unwrap();
            assert_eq!(sw.window, last.tokens.len(), "{positions:?}");
            assert_eq!(sw.kv_len(), sp.kv_len() + sw.window, "{positions:?}");
            if positions == PositionScheme::Compressed {
                assert_eq!(sw.next_position as usize, sw.kv_len());
            }
        }
    }
}

/// Both incremental engines hold and drop the window the same way.
#[test]
fn the_window_slots_equal_per_document_states() {
    for spec in [
        windowed(compressed(3)),
        windowed(RandomSpec {
            bos_always_visible: true,
            ..compressed(1)
        }),
        windowed(RandomSpec {
            num_gists: 2,
            ..RandomSpec::default()
        }),
    ] {
        engines_agree(&spec);
    }
}

/// The parallel logits of the test documents without a setting (`plain`), with it where it
/// reaches them (`near`) and with it past their end (`far`): checks that `near` changes
/// them and `far` does not. Returns the logits of `plain` and `near`, and near's layout.
fn only_near_changes(
    plain: &RandomSpec,
    near: RandomSpec,
    far: RandomSpec,
) -> (candle_core::Tensor, candle_core::Tensor, Layout) {
    let (_d0, plain) = common::tiny_model(plain);
    let (_d1, near) = common::tiny_model(&near);
    let (_d2, far) = common::tiny_model(&far);
    let docs = documents(&plain);
    let forward = |m: &GistModel| {
        let l = Layout::new(m, &docs, true);
        (
            whole::forward(m, &l, Mode::Sentence, Ops::Fused).unwrap(),
            l,
        )
    };
    let ((pp, lp), (pn, ln), (pf, _)) = (forward(&plain), forward(&near), forward(&far));
    assert!(common::max_diff_regular(&pp, &pn, &lp.regular) > 1e-3);
    assert!(common::max_diff_regular(&pp, &pf, &lp.regular) < 1e-5);
    (pp, pn, ln)
}

/// Why a model written from `spec` fails to load, with its cause chain.
fn load_error(spec: &RandomSpec) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), spec).unwrap();
    let err = GistModel::load(
        dir.path(),
        &Device::Cpu,
        DType::F32,
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    format!("{err:#}")
}

// ---------------------------------------------------------------------------------------
// BOS read at a bounded distance (gist.json `sink_distance`)
// ---------------------------------------------------------------------------------------

fn sunk(spec: RandomSpec, distance: u32) -> RandomSpec {
    RandomSpec {
        bos_always_visible: true,
        sink_distance: Some(distance),
        ..spec
    }
}

/// Each sentence reading BOS's key re-rotated to D positions before it: the incremental
/// path (a rotated copy of row 0) computes what the parallel path (sink copies per
/// segment, BOS's stored rows masked from those segments) computes, with the window too,
/// and at D = 1 where every later segment (and the window's copy of BOS) is moved.
#[test]
fn a_bos_sink_incremental_equals_parallel() {
    for d in [1, 9, 40] {
        check(sunk(compressed(1), d), 1, false);
        check(sunk(compressed(2), d), 3, true);
        check(sunk(windowed(compressed(2)), d), 2, true);
        check(sunk(windowed(compressed(4)), d), 1, true);
    }
}

/// The sink changes what far sentences read (the comparisons above have teeth), only
/// them: a distance past every document's end changes nothing; and the sink positions
/// are D before each segment.
#[test]
fn a_bos_sink_moves_only_far_sentences() {
    let kept = RandomSpec {
        bos_always_visible: true,
        ..compressed(2)
    };
    // (BOS moves among the masked keys with a sink: the sums run in another order.)
    let (pp, pn, ln) = only_near_changes(&kept, sunk(kept.clone(), 9), sunk(kept.clone(), 100_000));
    for doc in &ln.docs {
        let mut segs = 0;
        for i in 0..doc.segment.len() {
            if i == 0 || doc.segment[i] != doc.segment[i - 1] {
                let w = ln.positions[doc.rows.start + i];
                let expected = w.saturating_sub(9);
                assert_eq!(doc.bos_sink[doc.segment[i] as usize], expected);
                segs += 1;
            }
        }
        assert_eq!(doc.bos_sink.len(), segs);
    }
    // The first sentence of every document reads BOS where it is stored.
    let rows = ln.docs[0].rows.clone();
    let first = ln.docs[0].segment.iter().take_while(|&&s| s == 0).count();
    let head = |t: &candle_core::Tensor| t.i(rows.start..rows.start + first).unwrap();
    assert!(common::max_abs_diff(&head(&pp), &head(&pn)) < 1e-5);
}

/// Both incremental engines read the sink the same way.
#[test]
fn a_bos_sink_slots_equal_per_document_states() {
    for spec in [sunk(compressed(3), 5), sunk(windowed(compressed(1)), 12)] {
        engines_agree(&spec);
    }
}

/// A sink needs what it moves: compressed positions and a kept BOS.
#[test]
fn a_sink_without_a_kept_bos_or_compressed_positions_is_refused() {
    for spec in [
        RandomSpec {
            sink_distance: Some(8),
            ..compressed(2)
        },
        sunk(
            RandomSpec {
                num_gists: 2,
                ..RandomSpec::default()
            },
            8,
        ),
    ] {
        let err = load_error(&spec);
        assert!(err.contains("sink_distance"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------
// Far keys faded (gist.json `distance_decay`)
// ---------------------------------------------------------------------------------------

fn decayed(spec: RandomSpec, strength: f32, from: u32) -> RandomSpec {
    RandomSpec {
        distance_decay: Some(DistanceDecay { strength, from }),
        ..spec
    }
}

/// Every key faded by how far it is read from: the incremental path (row = position, BOS
/// at its sink) computes what the parallel path (each group's mask over all its keys, the
/// stored, window and sink copies at their own positions) computes, on both ops paths.
#[test]
fn a_distance_decay_incremental_equals_parallel() {
    for (strength, from) in [(0.5, 1), (2.0, 4), (1.0, 12)] {
        check(decayed(compressed(1), strength, from), 1, false);
        check(decayed(compressed(2), strength, from), 3, true);
        check(decayed(windowed(compressed(2)), strength, from), 2, true);
        check(
            decayed(sunk(windowed(compressed(4)), 5), strength, from),
            1,
            true,
        );
    }
}

/// The decay changes what queries read from far away (the comparisons above have teeth),
/// and only that: a `from` past every document's length changes nothing, and the first
/// sentence, whose keys are all near, reads what it read without the decay.
#[test]
fn a_distance_decay_fades_only_far_keys() {
    let spec = RandomSpec {
        bos_always_visible: true,
        ..compressed(2)
    };
    let (pp, pn, ln) = only_near_changes(
        &spec,
        decayed(spec.clone(), 1.0, 3),
        decayed(spec.clone(), 1.0, 100_000),
    );
    // The first three tokens of each document read keys at most 2 positions away.
    for doc in &ln.docs {
        let head = |t: &candle_core::Tensor| t.i(doc.rows.start..doc.rows.start + 3).unwrap();
        assert!(ln.positions[doc.rows.start + 2] == 2);
        assert!(common::max_abs_diff(&head(&pp), &head(&pn)) < 1e-5);
    }
}

/// Both incremental engines fade the same keys.
#[test]
fn a_distance_decay_slots_equal_per_document_states() {
    for spec in [
        decayed(compressed(3), 1.0, 2),
        decayed(sunk(windowed(compressed(1)), 4), 2.0, 3),
    ] {
        engines_agree(&spec);
    }
}

/// A decay needs compressed positions (its distances are rows of the state) and a
/// strength above 0.
#[test]
fn a_distance_decay_without_compressed_positions_or_strength_is_refused() {
    for (spec, says) in [
        (
            decayed(
                RandomSpec {
                    num_gists: 2,
                    ..RandomSpec::default()
                },
                1.0,
                4,
            ),
            "compressed",
        ),
        (decayed(compressed(2), 0.0, 4), "strength above 0"),
        (decayed(compressed(2), 1.0, 0), "from at least 1"),
    ] {
        let err = load_error(&spec);
        let msg = format!("{err:#}");
        assert!(
            msg.contains("distance_decay") && msg.contains(says),
            "{msg}"
        );
    }
}
