//! Configuration: `config.json` as Hugging Face writes it ([`LlamaFileConfig`]), the runtime
//! [`Config`] the forward reads, and `gist.json` ([`GistConfig`]), which says how the model
//! compresses: how many gist tokens, their ids, and the segmentation it was trained with.

use crate::text::segment::SegmentConfig;
use candle_transformers::models::llama::{Llama3RopeConfig, Llama3RopeType, LlamaEosToks};
use serde::{Deserialize, Serialize};

/// `config.json` of an HF Llama checkpoint (only the fields the forward needs).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaFileConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeConfig>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<LlamaEosToks>,
    pub hidden_act: Option<String>,
    /// The context length the model was trained for.
    pub max_position_embeddings: Option<usize>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}

/// What the forward needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub hidden: usize,
    pub intermediate: usize,
    /// Rows of the embedding matrix, gist tokens included.
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    /// RoPE inverse frequencies (head_dim / 2), Llama-3 scaling applied.
    pub inv_freq: Vec<f32>,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Positions the model was trained for (`max_position_embeddings`), when known.
    pub max_positions: Option<usize>,
}

impl LlamaFileConfig {
    /// Checks the fields and builds the runtime config.
    pub fn into_config(self) -> anyhow::Result<Config> {
        use anyhow::ensure;
        let kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        ensure!(
            self.num_attention_heads > 0 && kv_heads > 0,
            "config.json: zero attention heads"
        );
        ensure!(
            self.num_attention_heads.is_multiple_of(kv_heads),
            "config.json: num_attention_heads ({}) is not a multiple of num_key_value_heads ({kv_heads})",
            self.num_attention_heads
        );
        ensure!(
            head_dim.is_multiple_of(2),
            "config.json: head_dim {head_dim} is odd; RoPE needs pairs"
        );
        ensure!(
            !self.attention_bias && !self.mlp_bias,
            "config.json: attention_bias/mlp_bias are not supported (no Llama checkpoint uses them)"
        );
        if let Some(act) = &self.hidden_act {
            ensure!(
                act == "silu",
                "config.json: hidden_act {act:?} is not supported (only silu)"
            );
        }
        let inv_freq = rope_inv_freq(self.rope_theta, head_dim, self.rope_scaling.as_ref());
        Ok(Config {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            vocab: self.vocab_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads,
            head_dim,
            rms_eps: self.rms_norm_eps,
            inv_freq,
            tie_embeddings: self.tie_word_embeddings,
            max_positions: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: match self.eos_token_id {
                Some(LlamaEosToks::Single(id)) => Some(id),
                Some(LlamaEosToks::Multiple(ids)) => ids.first().copied(),
                None => None,
            },
        })
    }
}

/// RoPE inverse frequencies, computed in f32 as transformers does (so positions rotate
/// identically), with the Llama-3 long-context scaling when the config asks for it.
pub fn rope_inv_freq(theta: f32, head_dim: usize, scaling: Option<&Llama3RopeConfig>) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling.filter(|s| matches!(s.rope_type, Llama3RopeType::Llama3)) else {
        return base;
    };
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// `gist.json`: how this checkpoint compresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GistConfig {
    /// Gist tokens written after every sentence (N_g).
    pub num_gist_tokens: usize,
    /// Their token names, in order (`<end_of_sentence_i>` in the reference naming).
    pub gist_tokens: Vec<String>,
    /// Their ids in the tokenizer and embedding matrix.
    pub gist_token_ids: Vec<u32>,
    /// Segmentation the model was trained with.
    #[serde(default)]
    pub segmentation: SegmentConfig,
    /// Keep BOS (position 0) visible to every later token (the reference's
    /// `ft_with_bos_token`); it is then kept in the state like a gist.
    #[serde(default)]
    pub bos_always_visible: bool,
    /// Prepend BOS to every document.
    #[serde(default = "yes")]
    pub add_bos: bool,
    /// Where tokens sit for RoPE (see [`PositionScheme`]). Left out of the file when
    /// `original`, so the checkpoints (and stored states) of before this field keep their
    /// fingerprints.
    #[serde(default, skip_serializing_if = "PositionScheme::is_original")]
    pub positions: PositionScheme,
    /// Keep the regular tokens of the last closed sentence visible to the next sentence (a
    /// one-sentence raw window beside the gists), so a sentence's first words read the
    /// words just before them and not only gists. The state then holds that sentence's
    /// tokens until the next one closes: one sentence more, whatever the document's
    /// length. Off in the paper's scheme; left out of the file when off, so earlier
    /// checkpoints and stored states keep their fingerprints.
    #[serde(default, skip_serializing_if = "is_false")]
    pub previous_sentence_visible: bool,
    /// In the compressed scheme with BOS kept: the farthest a sentence reads BOS from.
    /// BOS is stored at position 0, so in a long document it drifts thousands of
    /// positions away from the sentences reading it, farther than training showed them,
    /// and the attention sink weakens (measured: most of the long-range loss at 64k). With
    /// a distance D, a sentence whose first token sits at position w reads BOS's key
    /// re-rotated to max(0, w − D): the same sink at a bounded distance, whatever the
    /// length. Only the reading changes; BOS is stored as before. Left out of the file
    /// when off, so earlier checkpoints and stored states keep their fingerprints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_distance: Option<u32>,
    /// In the compressed scheme: far keys fade (see [`DistanceDecay`]). Left out of the
    /// file when off, so earlier checkpoints and stored states keep their fingerprints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_decay: Option<DistanceDecay>,
}

/// An attention bias on keys read from far away: a key read `d` positions before its
/// query, `d` past `from`, gets `-strength · ln(d / from)` added to its score, so its
/// weight is scaled by `(from / d)^strength`; nearer keys are untouched. This is KERPLE's
/// logarithmic kernel (Chi et al., 2022), shifted to start at `from`.
///
/// Why: in the compressed scheme a long document's state holds thousands of gist rows,
/// and every one of them takes a share of each query's attention. Measured on the held-out
/// book at 32k and 64k tokens, a second half read after its compressed first half scored
/// worse than alone: the far rows, read at full weight, crowd out the near ones. Faded
/// rather than cut off (a window), a far key that matches strongly is still read. Distances
/// are positions, which in the compressed scheme are rows of the state (~20 tokens each).
/// The parallel and incremental paths apply the same bias; BOS, read at `sink_distance`,
/// is left near.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistanceDecay {
    /// The exponent of the fade (> 0).
    pub strength: f32,
    /// Keys up to this many positions before the query are read at full weight (>= 1).
    pub from: u32,
}

impl DistanceDecay {
    /// The additive score of a key at position `key` read by a query at `query`.
    pub fn bias(&self, query: u32, key: u32) -> f32 {
        let d = query.saturating_sub(key);
        if d <= self.from {
            0.0
        } else {
            -self.strength * (d as f32 / self.from as f32).ln()
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How tokens are numbered for RoPE.
///
/// `original` (the paper's): every token, gists included, at its index in the
/// gist-augmented document, so a document of T tokens spans T + N_g · sentences positions,
/// and a model reads positions it never saw in training once a document outgrows its
/// context.
///
/// `compressed`: a token's position is its row in the document's state. The stored entries
/// (BOS when kept, then every gist) are numbered 0, 1, 2, ... and the open sentence follows
/// right after them; when the sentence closes, its gists move down over its dropped tokens
/// and their keys are re-rotated to their new rows (RoPE is a rotation by position, so
/// rotating by the difference gives exactly the key written there). A document spans about
/// T / R_c positions: a 200,000-token book at R_c 8 fits in a model trained on 32k.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PositionScheme {
    #[default]
    Original,
    Compressed,
}

impl PositionScheme {
    pub fn is_original(&self) -> bool {
        *self == PositionScheme::Original
    }
}

fn yes() -> bool {
    true
}

impl GistConfig {
    /// Where a segment whose first token is written at `w` reads BOS (see `sink_distance`):
    /// None where it reads BOS where it is stored, at 0.
    pub fn bos_sink(&self, w: u32) -> Option<u32> {
        self.sink_distance
            .and_then(|d| w.checked_sub(d))
            .filter(|&p| p > 0)
    }

    /// Names of the reference code's gist tokens.
    pub fn reference_names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("<end_of_sentence_{i}>")).collect()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            (1..=MAX_GISTS).contains(&self.num_gist_tokens),
            "gist.json: num_gist_tokens must be 1 to {MAX_GISTS} (it is {})",
            self.num_gist_tokens
        );
        ensure!(
            self.gist_tokens.len() == self.num_gist_tokens
                && self.gist_token_ids.len() == self.num_gist_tokens,
            "gist.json: {} gist tokens declared, but {} names and {} ids given",
            self.num_gist_tokens,
            self.gist_tokens.len(),
            self.gist_token_ids.len()
        );
        let mut ids = self.gist_token_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        ensure!(
            ids.len() == self.num_gist_tokens,
            "gist.json: gist token ids repeat"
        );
        if let Some(d) = self.sink_distance {
            ensure!(d >= 1, "gist.json: sink_distance must be at least 1");
            ensure!(
                self.positions == PositionScheme::Compressed
                    && self.bos_always_visible
                    && self.add_bos,
                "gist.json: sink_distance needs positions \"compressed\", add_bos and \
                 bos_always_visible (it moves where the kept BOS is read)"
            );
        }
        if let Some(d) = &self.distance_decay {
            ensure!(
                d.strength.is_finite() && d.strength > 0.0 && d.from >= 1,
                "gist.json: distance_decay needs a strength above 0 and from at least 1 \
                 (it is {} and {})",
                d.strength,
                d.from
            );
            ensure!(
                self.positions == PositionScheme::Compressed,
                "gist.json: distance_decay needs positions \"compressed\" (its distances are \
                 rows of the state)"
            );
        }
        Ok(())
    }
}

/// The most gist tokens per sentence a model may have (the paper uses 1 to 8).
pub const MAX_GISTS: usize = 64;

/// `--num-gists`: 1 to [`MAX_GISTS`].
pub fn parse_num_gists(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if (1..=MAX_GISTS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not 1 to {MAX_GISTS}"))
    }
}

/// How [`crate::engine::compress::compress`] batches documents on the incremental path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Incremental {
    /// Each document's cache in its own buffer, attention per document
    /// ([`crate::engine::state::advance`]): fewest copies; the CPU default.
    PerDocument,
    /// All documents' caches in one tensor, attention batched ([`crate::engine::slots`]): a fixed
    /// number of kernels per layer at any batch; the GPU default.
    Slots,
}

impl Incremental {
    pub fn default_for(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Incremental::PerDocument
        } else {
            Incremental::Slots
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_distance_decay_fades_keys_past_from_as_a_power_of_distance() {
        let d = DistanceDecay {
            strength: 2.0,
            from: 100,
        };
        // Near keys, the query itself and keys after it (never read) are untouched.
        for (q, k) in [(500, 500), (500, 400), (500, 450), (10, 50)] {
            assert_eq!(d.bias(q, k), 0.0, "{q} {k}");
        }
        // Past `from` the weight is scaled by (from / d)^strength: at 200, by 1/4.
        assert!((d.bias(300, 100).exp() - 0.25).abs() < 1e-6);
        assert!((d.bias(1100, 100).exp() - 0.01).abs() < 1e-6);
        assert!(d.bias(5000, 0) < d.bias(5000, 1000));
    }

    #[test]
    fn llama3_scaling_matches_transformers() {
        // Llama-3.2 settings, head_dim 64. The exact values are checked end to end against
        // transformers in tests/reference.rs (fixture a); this pins the three bands.
        let s = Llama3RopeConfig {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
            rope_type: Llama3RopeType::Llama3,
        };
        let f = rope_inv_freq(500_000.0, 64, Some(&s));
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        // High frequencies are unchanged, the lowest are divided by the factor.
        let plain = rope_inv_freq(500_000.0, 64, None);
        assert_eq!(f[10], plain[10]);
        assert!((f[31] - plain[31] / 32.0).abs() < 1e-12);
        // Medium band: strictly between.
        let mid = (0..32).find(|&i| f[i] != plain[i] && (f[i] - plain[i] / 32.0).abs() > 1e-12);
        assert!(mid.is_some());
    }
}
