//! `giststream demo`: the whole path on the embedded defaults, in one process.
//!
//! Two bundled public-domain texts (one whole, one in parts) go to the embedded Kafka
//! broker; the ingest service compresses them with the project's model into a temporary
//! store; then each stored state is resumed twice: to continue the text from the first
//! words of a passage held back from it, and to score that passage (perplexity given the
//! compressed document vs given nothing).

use crate::engine::state::{advance, Chunk, GistState};
use crate::ingest::pipeline::Pipeline;
use crate::ingest::Broker;
use crate::query::{continuation, score, Sampling};
use crate::service::Service;
use anyhow::Context;
use std::time::{Duration, Instant};

pub(crate) const TEXTS: &[(&str, &str)] = &[
    (
        "baum-american-fairy-tales",
        include_str!("../../data/texts/baum-american-fairy-tales.txt"),
    ),
    (
        "twain-alonzo-fitz",
        include_str!("../../data/texts/twain-alonzo-fitz.txt"),
    ),
];

/// Bytes held back from the end of each text.
const HELD_BACK: usize = 1500;

/// Splits `text` into what is sent and a held-back passage that starts at a sentence.
fn hold_back(text: &str) -> (&str, &str) {
    let mut cut = text.len().saturating_sub(HELD_BACK);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let start = text[cut..].find(". ").map_or(cut, |i| cut + i + 2);
    text.split_at(start)
}

/// The shipped real model the demo prefers to the embedded toy.
pub const REAL_MODEL: &str = "smollm2-gist";

/// Bytes of each bundled text a real model reads (the toy reads them whole): SmolLM2 runs
/// ~100-250 tokens/s on two CPU cores, so whole texts (~40,000 tokens each) would take
/// minutes.
pub const REAL_MODEL_BYTES: usize = 24 * 1024;

/// Which model the demo uses when none is given: the shipped SmolLM2 gist adapter when
/// it and its base GGUF are here, else the embedded toy; with the reason for the choice.
pub fn default_model() -> (Option<std::path::PathBuf>, String) {
    let name = std::path::Path::new(REAL_MODEL);
    let Some(dir) = crate::model::shipped(name) else {
        return (None, format!("models/{REAL_MODEL} is not here"));
    };
    let found = crate::model::adapter::read_config(&dir)
        .and_then(|cfg| crate::model::adapter::find_base(&dir, &cfg.base));
    match found {
        Ok(_) => (Some(dir), "the shipped real model".into()),
        Err(e) => (None, format!("{e:#}")),
    }
}

/// The first `bytes` of `text`, cut after a sentence (a paragraph break or `. `).
fn opening(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let mut cut = bytes;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = &text[..cut];
    let end = head
        .rfind("\n\n")
        .or_else(|| head.rfind(". ").map(|i| i + 1))
        .unwrap_or(cut);
    &text[..end]
}

/// Runs the demo; `store` keeps the store (default: a temporary folder), `model` replaces
/// the default (the shipped SmolLM2 gist adapter when its base is here, else the
/// embedded model).
pub fn run(
    store: Option<std::path::PathBuf>,
    model: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut p = Pipeline::default();
    p.store.path = store.unwrap_or(tmp.path().join("store"));
    p.batch.max_documents = 4;
    let model = match model {
        Some(m) => Some(m),
        None => {
            let (m, why) = default_model();
            if m.is_none() {
                println!("using the embedded toy model: {why}");
            }
            m
        }
    };
    if let Some(m) = &model {
        p.model.dir = m.display().to_string();
    }
    let broker = Broker::start(&p)?;
    println!("embedded Kafka broker: {}", broker.bootstrap);
    let model = crate::serve::run::load_model(&p)?;
    println!(
        "model: {} ({} parameters, N_g = {})",
        if p.model.dir.is_empty() {
            format!("{} (embedded)", crate::model::embedded::SOURCE)
        } else {
            p.model.dir.clone()
        },
        model.llama.parameter_count(),
        model.gist.num_gist_tokens
    );
    println!("store: {}", p.store.path.display());
    // The toy reads the texts whole; a real model, their openings (see REAL_MODEL_BYTES).
    let limit = if p.model.dir.is_empty() {
        usize::MAX
    } else {
        REAL_MODEL_BYTES
    };
    let texts: Vec<(&str, &str)> = TEXTS
        .iter()
        .map(|&(id, text)| (id, opening(text, limit)))
        .collect();
    if limit < usize::MAX {
        println!("each text cut to its first {limit} bytes for this model's speed");
    }
    let store = crate::store::Store::open(&p.store.path)?;
    let svc = Service::new(store, model);

    // Produce: the first text whole, the second in parts (up to 32 KiB, at least four).
    let mut msgs = Vec::new();
    for (i, (id, text)) in texts.iter().enumerate() {
        let (sent, _) = hold_back(text);
        let part_bytes = if i == 0 {
            usize::MAX
        } else {
            (sent.len() / 4).clamp(4096, 32 * 1024)
        };
        msgs.extend(crate::ingest::produce::messages(id, 1, sent, part_bytes));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let producer = crate::ingest::producer(&p, &broker.bootstrap)?;
    let n = rt.block_on(crate::ingest::produce::send_all(
        &producer,
        &p.kafka.topic,
        msgs,
        |_| {},
    ))?;
    println!("produced {n} messages to {}", p.kafka.topic);

    // Ingest until every document is complete.
    let started = Instant::now();
    rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ingest = tokio::spawn({
            let p = p.clone();
            let bootstrap = broker.bootstrap.clone();
            let svc = svc.clone();
            async move { crate::ingest::run(&p, &bootstrap, svc, stop_rx).await }
        });
        loop {
            let done = texts.iter().all(|(id, _)| {
                svc.store
                    .meta(id)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.complete)
            });
            if done || ingest.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = stop_tx.send(true);
        ingest.await.context("the ingest task panicked")?
    })?;
    println!("ingested in {:.1} s\n", started.elapsed().as_secs_f64());
    let model = &svc.model;
    let kv_token = model.kv_bytes_per_token(4);
    println!(
        "{:<28} {:>6} {:>8} {:>9} {:>7} {:>6} {:>12} {:>12}",
        "document", "parts", "tokens", "sentences", "gists", "R_c", "full KV f32", "gist state"
    );
    for (id, _) in &texts {
        let m = svc.store.meta(id)?.context("stored")?;
        println!(
            "{:<28} {:>6} {:>8} {:>9} {:>7} {:>6.2} {:>12} {:>12}",
            id,
            m.parts,
            m.tokens,
            m.sentences,
            m.gist_tokens,
            m.tokens as f64 / m.gist_tokens.max(1) as f64,
            crate::engine::compress::human_bytes(m.tokens * kv_token),
            crate::engine::compress::human_bytes(m.state_bytes)
        );
    }

    for (id, text) in &texts {
        let (_, held) = hold_back(text);
        let (_, state) = svc.store.load(id, model)?;
        println!("\n== {id}: resumed from its stored state");
        let prompt: String = held.split_inclusive(' ').take(8).collect();
        print!("continuation of \"{}\" -> ", prompt.trim_end());
        let sampling = Sampling {
            max_tokens: 40,
            temperature: 0.0,
            top_p: None,
            seed: 1,
            chat_template: false,
        };
        continuation(model, state.clone(), &prompt, &sampling, |t| {
            print!("{t}");
        })?;
        println!();
        let with = score(model, state, None, false, held)?;
        // The same passage after only BOS: what the document's gists are worth.
        let mut alone = GistState::new(model)?;
        if let Some(bos) = model.bos_token_id() {
            advance(
                model,
                &mut [(
                    &mut alone,
                    Chunk {
                        tokens: &[bos],
                        close: false,
                    },
                )],
                false,
            )?;
        }
        let without = score(model, alone, None, false, held)?;
        println!(
            "held-back passage ({} tokens): perplexity {:.2} given the compressed document, {:.2} given nothing",
            with.tokens, with.perplexity, without.perplexity
        );
    }
    Ok(())
}
