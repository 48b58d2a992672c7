//! Documents that arrive in parts: each part appends to the stored state without rewriting
//! it, the result equals compressing the whole text, and redeliveries, gaps and parts
//! after the last are handled without touching what is stored.

mod common;

use giststream::engine::compress::{compress, Document};
use giststream::model::random::{synthetic_text, RandomSpec, SplitMix};
use giststream::model::GistModel;
use giststream::store::codec::{encode, Precision};
use giststream::store::parts::{apply_parts, number_parts, split_parts, Outcome, Part};
use giststream::store::{PartAction, Store};

fn offline(model: &GistModel, text: &str) -> Vec<u8> {
    let doc = Document {
        id: "d".into(),
        segments: model.segments(text).unwrap(),
    };
    let (state, _) = compress(model, vec![doc], 1).unwrap().remove(0);
    encode(&state, Precision::F32).unwrap()
}

fn parts_of(id: &str, version: u64, text: &str, cuts: &[usize]) -> Vec<Part> {
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            let mut c = c.min(text.len());
            while !text.is_char_boundary(c) {
                c -= 1;
            }
            c
        })
        .collect();
    bounds.sort();
    bounds.insert(0, 0);
    bounds.push(text.len());
    number_parts(id, version, bounds.windows(2).map(|w| &text[w[0]..w[1]]))
}

fn stored_record(store: &Store, model: &GistModel, id: &str) -> Vec<u8> {
    let (_, state) = store.load(id, model).unwrap();
    encode(&state, Precision::F32).unwrap()
}

#[test]
fn parts_append_chunks_and_end_equal_to_the_whole_text() {
    parts_equal_the_whole_text(RandomSpec::default());
}

/// With the previous sentence kept visible, a part's first close rewrites the stored last
/// sentence (its window dropped, its gists moved down): the part's chunk starts there,
/// over the rows before it, and earlier chunks still never change.
#[test]
fn parts_of_a_model_keeping_the_previous_sentence_equal_the_whole_text() {
    for positions in [
        giststream::model::config::PositionScheme::Compressed,
        giststream::model::config::PositionScheme::Original,
    ] {
        parts_equal_the_whole_text(RandomSpec {
            previous_sentence_visible: true,
            positions,
            num_gists: 2,
            ..RandomSpec::default()
        });
    }
}

fn parts_equal_the_whole_text(spec: RandomSpec) {
    let (_m, model) = common::tiny_model(&spec);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rng = SplitMix(11);
    for round in 0..6 {
        let text = synthetic_text(6 + round, 7, 40 + round as u64);
        let cuts: Vec<usize> = (0..1 + round % 4)
            .map(|_| rng.next_u64() as usize % text.len())
            .collect();
        let id = format!("doc{round}");
        let parts = parts_of(&id, 1, &text, &cuts);
        // One part at a time, as messages arrive; earlier chunks must never change.
        let mut chunks_before: Vec<Vec<u8>> = Vec::new();
        for p in &parts {
            let out =
                apply_parts(&model, &store, std::slice::from_ref(p), Precision::F32, 1).unwrap();
            let Outcome::Stored { meta, .. } = &out[0] else {
                panic!("{id} part {}: {:?}", p.part, out[0]);
            };
            assert_eq!(meta.parts, p.part + 1);
            for (n, c) in chunks_before.iter().enumerate() {
                assert_eq!(
                    &store.raw("states", &id, n as u32).unwrap().unwrap(),
                    c,
                    "{id}: chunk {n} was rewritten by part {}",
                    p.part
                );
            }
            chunks_before = (0..meta.state_chunks)
                .map(|n| store.raw("states", &id, n).unwrap().unwrap())
                .collect();
        }
        let meta = store.meta(&id).unwrap().unwrap();
        assert!(meta.complete && meta.carry.text.is_empty());
        assert_eq!(meta.parts as usize, parts.len());
        assert_eq!(
            stored_record(&store, &model, &id),
            offline(&model, &text),
            "{id}: {} parts",
            parts.len()
        );
        assert_eq!(store.text(&id).unwrap(), text);
    }
}

#[test]
fn batched_parts_of_many_documents_match_offline_compression() {
    let (_m, model) = common::tiny_model(&RandomSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let texts: Vec<String> = (0..5).map(|i| synthetic_text(4 + i, 6, i as u64)).collect();
    // All parts of all documents in one call, interleaved: parts of one document must
    // still be applied in order, several documents per forward.
    let mut parts = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        parts.extend(parts_of(
            &format!("d{i}"),
            1,
            t,
            &[t.len() / 3, t.len() / 2],
        ));
    }
    // Documents interleaved: every first part, then every second part...
    parts.sort_by_key(|p| (p.part, p.id.clone()));
    let out = apply_parts(&model, &store, &parts, Precision::F32, 4).unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Stored { .. })));
    for (i, t) in texts.iter().enumerate() {
        let id = format!("d{i}");
        let (_, state) = store.load(&id, &model).unwrap();
        let doc = Document {
            id: id.clone(),
            segments: model.segments(t).unwrap(),
        };
        let (want, _) = compress(&model, vec![doc], 1).unwrap().remove(0);
        assert_eq!(state.kv_len(), want.kv_len(), "{id}");
        for (a, b) in state.layers.iter().zip(&want.layers) {
            let d = common::max_abs_diff(&a.view().unwrap().0, &b.view().unwrap().0);
            assert!(d < 1e-4, "{id}: keys differ by {d}");
        }
    }
}

#[test]
fn redeliveries_gaps_and_late_parts_change_nothing() {
    let (_m, model) = common::tiny_model(&RandomSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let text = synthetic_text(8, 6, 3);
    let parts = parts_of("d", 2, &text, &[text.len() / 4, text.len() / 2]);
    let snapshot = |s: &Store| {
        (0..4)
            .map(|n| {
                (
                    s.raw("states", "d", n).unwrap(),
                    s.raw("texts", "d", n).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    // A gap: part 1 before part 0.
    let out = apply_parts(&model, &store, &parts[1..2], Precision::F32, 1).unwrap();
    assert!(
        matches!(&out[0], Outcome::Rejected(why) if why.contains("out of order")),
        "{out:?}"
    );
    assert!(store.meta("d").unwrap().is_none());

    apply_parts(&model, &store, &parts[..2], Precision::F32, 1).unwrap();
    let before = snapshot(&store);
    let meta_before = store.raw("meta", "d", 0).unwrap();
    // Redelivery of parts 0 and 1, an older version, a gap after part 1.
    let mut stale = parts[0].clone();
    stale.version = 1;
    let mut gap = parts[2].clone();
    gap.part = 3;
    let out = apply_parts(
        &model,
        &store,
        &[parts[0].clone(), parts[1].clone(), stale, gap],
        Precision::F32,
        2,
    )
    .unwrap();
    assert_eq!(out[0], Outcome::Skipped(PartAction::Duplicate));
    assert_eq!(out[1], Outcome::Skipped(PartAction::Duplicate));
    assert_eq!(out[2], Outcome::Skipped(PartAction::Stale { stored: 2 }));
    assert!(matches!(&out[3], Outcome::Rejected(_)), "{:?}", out[3]);
    assert_eq!(snapshot(&store), before);
    assert_eq!(store.raw("meta", "d", 0).unwrap(), meta_before);

    // The last part completes it; one more part after the last is refused.
    apply_parts(&model, &store, &parts[2..], Precision::F32, 1).unwrap();
    assert_eq!(stored_record(&store, &model, "d"), offline(&model, &text));
    let mut late = parts[2].clone();
    late.part = 3;
    let out = apply_parts(&model, &store, &[late], Precision::F32, 1).unwrap();
    assert!(
        matches!(&out[0], Outcome::Rejected(why) if why.contains("ended")),
        "{out:?}"
    );

    // A new version replaces every chunk and part of the old one.
    let text3 = synthetic_text(3, 5, 99);
    apply_parts(
        &model,
        &store,
        &parts_of("d", 3, &text3, &[]),
        Precision::F32,
        1,
    )
    .unwrap();
    let meta = store.meta("d").unwrap().unwrap();
    assert_eq!((meta.version, meta.parts, meta.state_chunks), (3, 1, 1));
    assert!(store.raw("states", "d", 1).unwrap().is_none());
    assert!(store.raw("texts", "d", 1).unwrap().is_none());
    assert_eq!(store.text("d").unwrap(), text3);
    assert_eq!(stored_record(&store, &model, "d"), offline(&model, &text3));
}

#[test]
fn split_parts_round_trips_text() {
    let t = "héllo wörld ".repeat(20);
    let p = split_parts(&t, 7);
    assert!(p.len() > 10);
    assert_eq!(p.concat(), t);
}

#[test]
fn compress_with_part_bytes_stores_what_whole_compression_gives() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    giststream::model::random::write_random_model(&model_dir, &RandomSpec::default()).unwrap();
    let model = common::load_model(&model_dir);
    let files: Vec<std::path::PathBuf> = (0..3)
        .map(|i| {
            let p = dir.path().join(format!("t{i}.txt"));
            std::fs::write(&p, synthetic_text(10 + 5 * i, 8, 70 + i as u64)).unwrap();
            p
        })
        .collect();
    let store_dir = dir.path().join("store");
    let out = common::succeed(
        std::process::Command::new(env!("CARGO_BIN_EXE_giststream"))
            .env("RAYON_NUM_THREADS", "1")
            .args(["compress", "--json", "--batch", "1", "--part-bytes", "150"])
            .arg("--model")
            .arg(&model_dir)
            .arg("--store")
            .arg(&store_dir)
            .args(&files),
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 3);
    let store = Store::open(&store_dir).unwrap();
    for (i, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap();
        let id = format!("t{i}");
        let meta = store.meta(&id).unwrap().unwrap();
        assert!(meta.parts > 2 && meta.state_chunks > 1, "{meta:?}");
        assert_eq!(stored_record(&store, &model, &id), offline(&model, &text));
    }
}
