//! `giststream train-tokenizer` and `giststream train`.

use crate::model::config::DistanceDecay;
use crate::model::device::{parse_device, parse_dtype};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct TrainTokenizerArgs {
    /// Folder of .txt files to learn from.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Where to write tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Vocabulary size, special tokens included.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Gist tokens to reserve (`<end_of_sentence_0>`...); a model uses the first N_g.
    #[arg(long, default_value_t = 8)]
    pub gist_tokens: usize,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Folder of .txt training documents (not needed with --finish, which trains nothing,
    /// or with --qa).
    #[arg(long, value_name = "DIR", required_unless_present_any = ["finish", "qa"], conflicts_with = "qa")]
    pub data: Option<PathBuf>,
    /// Train on questions and answers over compressed documents instead of text: a
    /// JSON-lines file of {"document", "question", "answer"} (`scripts/make-qa.py` makes
    /// them). Each document is read sentence by sentence, then the question (in the chat
    /// template) and the answer, which reads only the document's gists; the loss is the
    /// answer's tokens plus --qa-text-weight times the document's. Documents longer than
    /// --seq-tokens with their question are skipped; --tokens counts each question as
    /// --seq-tokens tokens.
    #[arg(long, value_name = "FILE")]
    pub qa: Option<PathBuf>,
    /// With --qa: the weight of the documents' own tokens in the loss beside the answers'
    /// (0: answers only).
    #[arg(long, value_name = "W", default_value_t = 1.0, requires = "qa")]
    pub qa_text_weight: f64,
    /// Output model directory (checkpoints go to DIR/checkpoint).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Continue the checkpoint in --out (its settings win over these flags, except the
    /// --valid ones, which may be added or changed: scoring changes no weight).
    #[arg(long)]
    pub resume: bool,
    /// End the run in --out where its checkpoint stands and write its model (in
    /// --save-dtype), without training further: the plan is cut to the steps taken. For
    /// shipping a run stopped early; more training later starts from the written model
    /// with --init-adapter.
    #[arg(long)]
    pub finish: bool,
    /// Folder of held-out .txt documents, never trained on, scored every --valid-every
    /// steps, before the first and after the last: the validation curve, in
    /// DIR/valid-log.jsonl of --out. Each book's opening is read like a training
    /// document (with a memory span, that many consecutive sequences).
    #[arg(long, value_name = "DIR")]
    pub valid: Option<PathBuf>,
    /// Steps between validation scorings [default: --checkpoint-every].
    #[arg(long, value_name = "N", requires = "valid")]
    pub valid_every: Option<usize>,
    /// Held-out regular tokens scored each time, at most (whole documents, at least one).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub valid_tokens: usize,
    /// Start from this HF model directory (or, with --adapter-rank, this GGUF file)
    /// instead of random weights.
    #[arg(long, value_name = "PATH", conflicts_with = "tokenizer")]
    pub from: Option<PathBuf>,
    /// Train a gist adapter of this rank on the frozen --from GGUF base (LoRA on every
    /// projection plus the gist embeddings; see `models/smollm2-gist/README.md`) instead
    /// of the whole model. --out then receives the adapter folder.
    #[arg(long, value_name = "R", requires = "from")]
    pub adapter_rank: Option<usize>,
    /// Start the adapter from this trained adapter folder (its rank, targets and gist
    /// settings) with a new schedule: more training for a run whose schedule has ended.
    #[arg(
        long,
        value_name = "DIR",
        requires = "from",
        conflicts_with = "adapter_rank"
    )]
    pub init_adapter: Option<PathBuf>,
    /// Prepend the base's BOS to every document and keep it visible to every later token
    /// (gist.json `add_bos`, `bos_always_visible`). Models without BOS, like SmolLM2,
    /// otherwise lose their first token (the attention sink) when the first sentence
    /// closes.
    #[arg(long)]
    pub keep_bos: bool,
    /// Keep the last closed sentence's tokens visible to the next sentence (gist.json
    /// `previous_sentence_visible`): a sentence's first words read the words just before
    /// them, not only gists, for one sentence more in the state. With --memory-span the
    /// memory carries each sequence's last sentence to the next.
    #[arg(long)]
    pub previous_sentence_visible: bool,
    /// Read the kept BOS at most this many positions before each sentence (gist.json
    /// `sink_distance`): in a long document BOS, stored at position 0, otherwise drifts
    /// far from the sentences that use it as their attention sink. Needs `--positions
    /// compressed` (or an adapter that has it) and `--keep-bos`.
    #[arg(long, value_name = "D")]
    pub sink_distance: Option<u32>,
    /// Fade keys read from farther than FROM positions by (FROM / distance)^STRENGTH
    /// (gist.json `distance_decay`), so that the thousands of gist rows of a long document
    /// do not crowd out the near ones. Needs `--positions compressed` (or an adapter that
    /// has it).
    #[arg(long, value_name = "STRENGTH,FROM", value_parser = parse_distance_decay)]
    pub distance_decay: Option<DistanceDecay>,
    /// The adapter's scale numerator (a projection adds alpha / r · x·Aᵀ·Bᵀ).
    #[arg(long, default_value_t = 32.0)]
    pub adapter_alpha: f64,
    /// Projections the adapter adapts (comma-separated HF names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub adapter_targets: Vec<String>,
    /// Position scheme of the new model (gist.json `positions`): `original` (the paper's)
    /// or `compressed` (a document spans about T / R_c positions).
    #[arg(long, value_enum, default_value = "original")]
    pub positions: crate::model::config::PositionScheme,
    /// tokenizer.json for a model trained from scratch (see train-tokenizer).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Gist tokens per sentence (N_g) [default: 4]. With --init-adapter, the adapter's
    /// N_g unless given: a different N_g starts the run from the adapter's LoRA and its
    /// gist rows resized (growing repeats each row, shrinking keeps the last), the way to
    /// compare N_g at the same training from one trained adapter.
    #[arg(long, value_parser = crate::model::config::parse_num_gists)]
    pub num_gists: Option<usize>,
    /// gist: sentence attention with gists; full: the plain causal baseline.
    #[arg(long, value_enum, default_value = "gist")]
    pub attention: crate::train::Attention,
    /// Recipe: `scratch` (one stage, everything trained) or `paper` (the paper's three
    /// stages: embeddings only, everything, large-batch cool-down).
    #[arg(long, default_value = "scratch", value_parser = ["scratch", "paper"])]
    pub recipe: String,
    /// Regular tokens to train on, all stages together.
    #[arg(long, default_value_t = 1_000_000)]
    pub tokens: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Sequences per optimizer step (stage 1 of the paper recipe; later stages scale it).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequences per forward (gradients of a step's micro-batches are summed).
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Regular tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_tokens: usize,
    /// Train on documents of this many consecutive sequences of one book: each sequence
    /// after the first reads the gists of those before it (computed when they were
    /// trained, no gradient into them), so the model learns to read gists from much
    /// farther back than one sequence holds. Needs `--positions compressed`. 1: off.
    #[arg(long, default_value_t = 1)]
    pub memory_span: usize,
    /// Also score predictions of gist tokens.
    #[arg(long)]
    pub gist_loss: bool,
    /// Warmup steps of every stage (default: the recipe's, 100).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Shape of a model trained from scratch: hidden size.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 688)]
    pub intermediate: usize,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Stop within this many seconds: after the first steps, token budgets shrink to fit
    /// (schedules still run to their end).
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Precision of the saved weights: f32, or bf16 (half the size; loads as f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub save_dtype: String,
}

impl TrainArgs {
    /// N_g for a run that does not start from an adapter: `--num-gists`, or 4.
    fn num_gists_or_default(&self) -> usize {
        self.num_gists.unwrap_or(4)
    }
}

pub fn run_tokenizer(args: TrainTokenizerArgs) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .txt files in {}", args.data.display());
    }
    let mut special = vec!["<s>".to_string(), "</s>".to_string()];
    special.extend(crate::model::config::GistConfig::reference_names(
        args.gist_tokens,
    ));
    let started = std::time::Instant::now();
    let tok = crate::text::tokenize::train_bpe(&files, args.vocab_size, &special, &args.out)?;
    println!(
        "trained a {}-token BPE on {} files in {:.1}s: {}",
        tok.vocab_size(),
        files.len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    use crate::train::{self, TrainConfig};
    let device = parse_device(&args.device)?;
    let ckpt = args.out.join("checkpoint").join("trainer.json");
    let save_dtype = parse_dtype(&args.save_dtype)?;
    if args.finish && !ckpt.exists() {
        bail!(
            "--finish: {} holds no checkpoint (checkpoint/trainer.json)",
            args.out.display()
        );
    }
    let resume = if args.finish {
        train::Resume::Finish
    } else if args.resume {
        train::Resume::Continue
    } else {
        train::Resume::No
    };
    let (mut trainee, mut cfg) = if resume != train::Resume::No && ckpt.exists() {
        train::resume_trainee(&args.out, &device)?
    } else {
        let cfg = {
            let mut c = match args.recipe.as_str() {
                "paper" => TrainConfig::paper(args.tokens, args.lr, args.batch),
                _ => TrainConfig::scratch(args.tokens, args.lr, args.batch),
            };
            c.seq_tokens = args.seq_tokens;
            c.micro_batch = args.micro_batch;
            c.memory_span = args.memory_span;
            c.attention = args.attention;
            c.gist_loss = args.gist_loss;
            c.checkpoint_every = args.checkpoint_every;
            c.seed = args.seed;
            c.max_seconds = args.max_seconds;
            anyhow::ensure!(
                args.qa_text_weight.is_finite() && args.qa_text_weight >= 0.0,
                "--qa-text-weight {}: a weight of 0 or more",
                args.qa_text_weight
            );
            c.qa_text_weight = args.qa.is_some().then_some(args.qa_text_weight);
            if let Some(w) = args.warmup_steps {
                for st in &mut c.stages {
                    st.warmup_steps = w.min(st.warmup_steps);
                }
            }
            c
        };
        let mut trainee = match (&args.from, args.adapter_rank) {
            (Some(base), None) if args.init_adapter.is_some() => {
                let dir = args.init_adapter.as_ref().expect("checked");
                train::Trainee::from_adapter(base, dir, args.num_gists, args.seed, &device)
                    .with_context(|| format!("--init-adapter {}", dir.display()))?
            }
            (Some(base), Some(rank)) => {
                let config = crate::model::adapter::AdapterConfig {
                    rank,
                    alpha: args.adapter_alpha,
                    targets: args.adapter_targets.clone(),
                    base: crate::model::adapter::BaseRef {
                        file: base
                            .file_name()
                            .context("--from names no file")?
                            .to_string_lossy()
                            .into_owned(),
                        sha256: crate::model::adapter::base_digest(base)?,
                    },
                };
                config.validate()?;
                train::Trainee::adapter(
                    base,
                    Err((args.num_gists_or_default(), args.positions)),
                    config,
                    args.seed,
                    &device,
                )?
            }
            (Some(dir), None) => {
                train::trainee_from_dir(dir, args.num_gists_or_default(), &device)?
            }
            (None, _) => {
                let tok = args
                    .tokenizer
                    .as_ref()
                    .context("a model trained from scratch needs --tokenizer (or --from DIR)")?;
                let spec = crate::model::random::RandomSpec {
                    hidden: args.hidden,
                    layers: args.layers,
                    heads: args.heads,
                    kv_heads: args.kv_heads,
                    intermediate: args.intermediate,
                    num_gists: args.num_gists_or_default(),
                    llama3_rope_scaling: false,
                    tie_embeddings: false,
                    scale: 0.02,
                    embed_scale: 0.02,
                    norm_noise: 0.0,
                    seed: args.seed,
                    ..crate::model::random::RandomSpec::default()
                };
                train::trainee_from_scratch(tok, &spec, &device)?
            }
        };
        if trainee.adapter.is_none() {
            trainee.model.gist.positions = args.positions;
        }
        if args.previous_sentence_visible {
            trainee.model.gist.previous_sentence_visible = true;
        }
        if args.keep_bos {
            anyhow::ensure!(
                trainee.model.llama.cfg.bos_token_id.is_some(),
                "--keep-bos: the model names no BOS token"
            );
            trainee.model.gist.add_bos = true;
            trainee.model.gist.bos_always_visible = true;
        }
        if let Some(d) = args.sink_distance {
            trainee.model.gist.sink_distance = Some(d);
            trainee.model.gist.validate().context("--sink-distance")?;
        }
        if let Some(d) = args.distance_decay {
            trainee.model.gist.distance_decay = Some(d);
            trainee.model.gist.validate().context("--distance-decay")?;
        }
        (trainee, cfg)
    };
    trainee.save_dtype = save_dtype;
    if let Some(dir) = &args.valid {
        let same = |a: &std::path::Path, b: &std::path::Path| {
            a.canonicalize()
                .ok()
                .is_some_and(|a| Some(a) == b.canonicalize().ok())
        };
        if args.data.as_deref().is_some_and(|data| same(dir, data)) {
            bail!(
                "--valid {} is the training folder: held-out text must not be trained on",
                dir.display()
            );
        }
        cfg.validation = Some(train::ValidationConfig {
            data: dir.clone(),
            every: args.valid_every.unwrap_or(cfg.checkpoint_every).max(1),
            tokens: args.valid_tokens,
        });
    }
    // --finish trains no step, so it reads no training text (tokenizing a corpus takes
    // about a minute).
    let texts = match &args.data {
        Some(data) if !args.finish => train::read_texts(data)?,
        _ => Vec::new(),
    };
    let bos = trainee.model.bos_token_id();
    // Training and held-out text are cut into sequences the same way.
    let cut = |texts: &[String]| {
        let m = &trainee.model;
        train::sequences(texts, &m.tokenizer, &m.gist, bos, cfg.seq_tokens)
    };
    let data = cut(&texts)?;
    let qa = match (&args.qa, cfg.qa_text_weight) {
        (Some(file), Some(_)) => {
            let records = train::qa::read_records(file)?;
            let mut seqs = Vec::with_capacity(records.len());
            for r in &records {
                seqs.extend(train::qa::encode(&trainee.model, r, cfg.seq_tokens)?);
            }
            eprintln!(
                "{} questions from {}, {} skipped (longer than {} tokens)",
                seqs.len(),
                file.display(),
                records.len() - seqs.len(),
                cfg.seq_tokens
            );
            seqs
        }
        (None, Some(_)) if !args.finish => {
            bail!(
                "the checkpoint in {} trains on questions: give them with --qa",
                args.out.display()
            )
        }
        (Some(_), None) => bail!(
            "--qa: the checkpoint in {} trains on text, not questions",
            args.out.display()
        ),
        _ => Vec::new(),
    };
    let valid = match &cfg.validation {
        Some(v) => {
            let seqs = cut(&train::read_texts(&v.data).context("--valid")?)?;
            let docs = train::validation::documents(&seqs, cfg.memory_span, bos, v.tokens);
            if docs.is_empty() {
                bail!(
                    "--valid {}: no document holds {} consecutive sequences of {} tokens",
                    v.data.display(),
                    cfg.memory_span.max(1),
                    cfg.seq_tokens
                );
            }
            docs
        }
        None => Vec::new(),
    };
    let total_steps: usize = (0..cfg.stages.len()).map(|i| cfg.steps(i)).sum();
    if !args.finish && qa.is_empty() {
        eprintln!(
            "{} sequences of up to {} tokens from {} documents; {} steps in {} stage(s)",
            data.len(),
            cfg.seq_tokens,
            texts.len(),
            total_steps,
            cfg.stages.len()
        );
    }
    let bar = indicatif::ProgressBar::new(total_steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps, {elapsed} (eta {eta}) {msg}",
        )
        .expect("a valid template"),
    );
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let on_event = |event: train::Event<'_>| {
        let (line, steps) = match event {
            train::Event::Step(line, steps) => (line, steps),
            train::Event::Validated(v) => {
                let msg = format!(
                    "validation at step {}: loss {:.4}, perplexity {:.2} ({} tokens of {} \
                         document{}, {:.0} s)",
                    v.step,
                    v.loss,
                    v.perplexity,
                    v.tokens,
                    v.documents,
                    if v.documents == 1 { "" } else { "s" },
                    v.seconds
                );
                if plain {
                    eprintln!("{msg}");
                } else {
                    bar.println(msg);
                }
                return;
            }
        };
        let msg = format!(
            "{} loss {:.4} lr {:.2e} {:.0} tok/s",
            line.stage, line.loss, line.lr, line.tokens_per_second
        );
        // A log file or pipe gets plain lines instead of the bar.
        if plain {
            if line.step % 10 == 0 || line.step <= 3 {
                eprintln!("step {} (stage plan {steps}): {msg}", line.step);
            }
        } else {
            bar.set_position(line.step as u64);
            bar.set_message(msg);
        }
    };
    let progress = if cfg.qa_text_weight.is_some() {
        train::run_qa(&mut trainee, &cfg, &qa, &valid, &args.out, resume, on_event)?
    } else {
        train::run(
            &mut trainee,
            &cfg,
            &data,
            &valid,
            &args.out,
            resume,
            on_event,
        )?
    };
    bar.finish();
    println!(
        "trained {} steps, {} tokens, final loss {:.4}: {}",
        progress.step,
        progress.tokens_seen,
        progress.last_loss,
        args.out.display()
    );
    Ok(())
}

/// `--distance-decay STRENGTH,FROM`.
fn parse_distance_decay(s: &str) -> Result<DistanceDecay, String> {
    let (strength, from) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not STRENGTH,FROM (for example 1,256)"))?;
    Ok(DistanceDecay {
        strength: strength
            .trim()
            .parse()
            .map_err(|e| format!("strength {strength:?}: {e}"))?,
        from: from
            .trim()
            .parse()
            .map_err(|e| format!("from {from:?}: {e}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_decay_parses_strength_and_from_and_names_what_is_wrong() {
        let d = parse_distance_decay("1.5, 256").unwrap();
        assert_eq!((d.strength, d.from), (1.5, 256));
        assert!(parse_distance_decay("1.5")
            .unwrap_err()
            .contains("STRENGTH,FROM"));
        assert!(parse_distance_decay("x,256")
            .unwrap_err()
            .contains("strength"));
        assert!(parse_distance_decay("1,-3").unwrap_err().contains("from"));
    }
}
