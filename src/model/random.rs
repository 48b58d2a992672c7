//! Tiny random gist models in real HF-format directories, for tests and benchmarks: the
//! same loading path as any checkpoint, with weights nobody trained.

use crate::model::config::GistConfig;
use crate::text::segment::SegmentConfig;
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct RandomSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// Vocabulary in config.json: at least 258 (bytes, <s>, </s>); gist ids follow.
    pub vocab: usize,
    pub num_gists: usize,
    /// Write gist.json and gist rows (a gist checkpoint), or not (a plain checkpoint).
    pub gist_checkpoint: bool,
    pub llama3_rope_scaling: bool,
    /// Llama 3 scaling factor and original context (used with `llama3_rope_scaling`).
    pub rope_factor: f64,
    pub rope_original_max: usize,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
    pub segmentation: SegmentConfig,
    pub bos_always_visible: bool,
    /// gist.json's position scheme.
    pub positions: crate::model::config::PositionScheme,
    /// gist.json's `previous_sentence_visible`.
    pub previous_sentence_visible: bool,
    /// gist.json's `sink_distance`.
    pub sink_distance: Option<u32>,
    /// gist.json's `distance_decay`.
    pub distance_decay: Option<crate::model::config::DistanceDecay>,
    /// Standard deviation of the random projection weights.
    pub scale: f32,
    /// Standard deviation of the embedding rows.
    pub embed_scale: f32,
    /// Standard deviation of the norm weights around 1.
    pub norm_noise: f32,
    pub seed: u64,
    /// Distribution of the random weights.
    pub init: Init,
    /// Precision of model.safetensors.
    pub weights_dtype: DType,
}

/// How random weights are drawn (both with the spec's standard deviations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Normal (Box-Muller): what the tests were written against.
    Normal,
    /// Uniform with the same standard deviation: about ten times faster to draw, for
    /// benchmark models of a billion weights, where only the shape matters.
    Uniform,
}

impl Default for RandomSpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            vocab: 262,
            num_gists: 4,
            gist_checkpoint: true,
            llama3_rope_scaling: true,
            rope_factor: 8.0,
            rope_original_max: 64,
            rope_theta: 10000.0,
            tie_embeddings: false,
            segmentation: SegmentConfig::default(),
            bos_always_visible: false,
            positions: Default::default(),
            previous_sentence_visible: false,
            sink_distance: None,
            distance_decay: None,
            scale: 0.2,
            embed_scale: 1.0,
            norm_noise: 0.1,
            seed: 7,
            init: Init::Normal,
            weights_dtype: DType::F32,
        }
    }
}

/// GPT-2's byte-to-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// tokenizer.json of a byte-level BPE without merges: byte b is token b; `<s>` is 256 and
/// `</s>` 257.
pub fn byte_level_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

pub fn byte_level_tokenizer() -> tokenizers::Tokenizer {
    byte_level_tokenizer_json()
        .parse()
        .expect("the byte-level tokenizer.json is valid")
}

/// config.json of a Llama of `spec`'s shape.
pub fn config_json(spec: &RandomSpec, vocab: usize, bos: u32, eos: u32) -> serde_json::Value {
    let mut rope_scaling = serde_json::Value::Null;
    if spec.llama3_rope_scaling {
        rope_scaling = serde_json::json!({"factor": spec.rope_factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": spec.rope_original_max,
            "rope_type": "llama3"});
    }
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "vocab_size": vocab,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.hidden / spec.heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "torch_dtype": match spec.weights_dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
    })
}

/// Random weights of `spec`'s shape and `weights_dtype`, named as in HF safetensors.
pub fn random_weights(spec: &RandomSpec, vocab: usize) -> anyhow::Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let d = spec.hidden / spec.heads;
    let mut rng = SplitMix(spec.seed);
    let mut randn = |shape: &[usize], scale: f32, offset: f32| -> anyhow::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = match spec.init {
            Init::Normal => (0..n).map(|_| offset + scale * rng.normal()).collect(),
            Init::Uniform => {
                // U(-a, a) has standard deviation a / sqrt(3).
                let a = 2.0 * 3f32.sqrt() * scale;
                (0..n).map(|_| offset + a * (rng.uniform() - 0.5)).collect()
            }
        };
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(spec.weights_dtype)?)
    };
    let (h, i, s, nn) = (spec.hidden, spec.intermediate, spec.scale, spec.norm_noise);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        randn(&[vocab, h], spec.embed_scale, 0.0)?,
    );
    if !spec.tie_embeddings {
        w.insert("lm_head.weight".into(), randn(&[vocab, h], s, 0.0)?);
    }
    w.insert("model.norm.weight".into(), randn(&[h], nn, 1.0)?);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let mut put = |name: &str, t: Tensor| w.insert(format!("{p}.{name}"), t);
        put("input_layernorm.weight", randn(&[h], nn, 1.0)?);
        put("post_attention_layernorm.weight", randn(&[h], nn, 1.0)?);
        put(
            "self_attn.q_proj.weight",
            randn(&[spec.heads * d, h], s, 0.0)?,
        );
        put(
            "self_attn.k_proj.weight",
            randn(&[spec.kv_heads * d, h], s, 0.0)?,
        );
        put(
            "self_attn.v_proj.weight",
            randn(&[spec.kv_heads * d, h], s, 0.0)?,
        );
        put(
            "self_attn.o_proj.weight",
            randn(&[h, spec.heads * d], s, 0.0)?,
        );
        put("mlp.gate_proj.weight", randn(&[i, h], s, 0.0)?);
        put("mlp.up_proj.weight", randn(&[i, h], s, 0.0)?);
        put("mlp.down_proj.weight", randn(&[h, i], s, 0.0)?);
    }
    Ok(w)
}

/// Writes a random model directory per `spec`, with the byte-level tokenizer.
pub fn write_random_model(dir: &Path, spec: &RandomSpec) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut vocab = spec.vocab;
    let gist_ids: Vec<u32> = (0..spec.num_gists).map(|i| (258 + i) as u32).collect();
    if spec.gist_checkpoint {
        vocab = vocab.max(258 + spec.num_gists);
    }
    let config = config_json(spec, vocab, 256, 257);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut tok = crate::text::tokenize::GistTokenizer::from_tokenizer(byte_level_tokenizer());
    if spec.gist_checkpoint {
        let names = GistConfig::reference_names(spec.num_gists);
        let ids = tok.ensure_special_tokens(&names)?;
        assert_eq!(ids, gist_ids);
        let gist = GistConfig {
            num_gist_tokens: spec.num_gists,
            gist_tokens: names,
            gist_token_ids: gist_ids,
            segmentation: spec.segmentation.clone(),
            bos_always_visible: spec.bos_always_visible,
            add_bos: true,
            positions: spec.positions,
            previous_sentence_visible: spec.previous_sentence_visible,
            sink_distance: spec.sink_distance,
            distance_decay: spec.distance_decay,
        };
        std::fs::write(dir.join("gist.json"), serde_json::to_string_pretty(&gist)?)?;
    }
    tok.inner()
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("saving tokenizer: {e}"))?;
    candle_core::safetensors::save(&random_weights(spec, vocab)?, dir.join("model.safetensors"))?;
    Ok(())
}

/// A small deterministic generator (no `rand` dependency for tests and benchmarks).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

/// Synthetic text: sentences of roughly `words` words drawn from a small vocabulary.
pub fn synthetic_text(sentences: usize, words: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "river", "stone", "quiet", "light", "of", "a", "morning", "and", "city", "old",
        "garden", "walked", "under", "bright", "window", "she", "he", "found", "letter",
    ];
    let mut rng = SplitMix(seed);
    let mut out = String::new();
    for _ in 0..sentences {
        let n = words / 2 + (rng.next_u64() as usize % (words + 1));
        for w in 0..n.max(1) {
            let word = WORDS[rng.next_u64() as usize % WORDS.len()];
            if w == 0 {
                let mut c = word.chars();
                let first = c.next().expect("non-empty").to_uppercase();
                out.extend(first);
                out.push_str(c.as_str());
            } else {
                out.push(' ');
                out.push_str(word);
            }
        }
        out.push_str(". ");
    }
    out
}
