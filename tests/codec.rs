//! State records: a reloaded state continues exactly like the original, lower precisions
//! stay within their rounding, and damage is caught.

mod common;

use candle_core::{DType, Device};
use giststream::engine::state::{advance, Chunk, GistState};
use giststream::model::random::{synthetic_text, RandomSpec};
use giststream::store::codec::{check, decode, encode, DecodeError, Precision};

/// A state after a few sentences, with an open tail.
fn state(model: &giststream::model::GistModel) -> GistState {
    let segs = model.segments(&synthetic_text(6, 8, 5)).unwrap();
    let mut s = GistState::new(model).unwrap();
    for seg in &segs {
        let chunk = Chunk {
            tokens: &seg.tokens,
            close: seg.close,
        };
        advance(model, &mut [(&mut s, chunk)], false).unwrap();
    }
    let tail = [5u32, 6, 7];
    advance(
        model,
        &mut [(
            &mut s,
            Chunk {
                tokens: &tail,
                close: false,
            },
        )],
        false,
    )
    .unwrap();
    s
}

fn continue_with(model: &giststream::model::GistModel, s: &mut GistState) -> Vec<f32> {
    let more = [40u32, 41, 42, 43];
    let logits = advance(
        model,
        &mut [(
            s,
            Chunk {
                tokens: &more,
                close: true,
            },
        )],
        true,
    )
    .unwrap()
    .unwrap();
    logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn an_f32_record_continues_bit_identically() {
    let (_d, model) = common::tiny_model(&RandomSpec::default());
    let mut original = state(&model);
    let bytes = encode(&original, Precision::F32).unwrap();
    let mut reloaded = decode(&bytes, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(reloaded.kv_len(), original.kv_len());
    assert_eq!(reloaded.tail_kept, original.tail_kept);
    assert_eq!(reloaded.next_position, original.next_position);
    assert_eq!(reloaded.fingerprint, model.fingerprint);
    assert!(continue_with(&model, &mut original) == continue_with(&model, &mut reloaded));
    // Encoding is deterministic.
    assert_eq!(
        bytes,
        encode(
            &decode(&bytes, &Device::Cpu, DType::F32).unwrap(),
            Precision::F32
        )
        .unwrap()
    );
}

#[test]
fn lower_precisions_round_within_their_resolution() {
    let (_d, model) = common::tiny_model(&RandomSpec::default());
    let s = state(&model);
    let f32_bytes = encode(&s, Precision::F32).unwrap().len();
    for (p, tol, size) in [
        (Precision::F16, 1e-3, 0.5),
        (Precision::Bf16, 8e-3, 0.5),
        (Precision::Int8, 1.0 / 127.0, 0.28),
    ] {
        let bytes = encode(&s, p).unwrap();
        assert_eq!(check(&bytes).unwrap(), p);
        assert!(
            (bytes.len() as f64) < size * f32_bytes as f64 + 200.0,
            "{p:?}: {} bytes",
            bytes.len()
        );
        let r = decode(&bytes, &Device::Cpu, DType::F32).unwrap();
        for (a, b) in s.layers.iter().zip(&r.layers) {
            let (ka, _) = a.view().unwrap();
            let (kb, _) = b.view().unwrap();
            let scale = common::max_abs(&ka);
            let d = common::max_abs_diff(&ka, &kb);
            assert!(d <= tol * scale, "{p:?}: {d} > {tol} x {scale}");
        }
    }
}

#[test]
fn damage_is_a_clear_error() {
    let (_d, model) = common::tiny_model(&RandomSpec::default());
    let bytes = encode(&state(&model), Precision::F16).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    let err = check(&flipped).unwrap_err();
    assert!(matches!(err, DecodeError::Checksum { .. }));
    assert!(err.to_string().contains("corrupted"));
    let mut version = bytes.clone();
    version[4] = 9;
    assert_eq!(
        check(&version).unwrap_err(),
        DecodeError::Version { found: 9 }
    );
    assert_eq!(
        check(b"not a record at all").unwrap_err(),
        DecodeError::BadMagic
    );
    assert!(decode(&bytes[..bytes.len() - 10], &Device::Cpu, DType::F32).is_err());
}
