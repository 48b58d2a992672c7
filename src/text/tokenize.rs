//! Tokenization aligned to sentences.
//!
//! Each sentence is tokenized on its own, so no token ever crosses a sentence boundary
//! (the reference code gets the same effect by inserting gist tokens, which are special
//! tokens, into the text before tokenizing). A sentence over the model's
//! `max_sentence_tokens` is cut into pieces of at most that many tokens, each closed by
//! gists, at token boundaries that are also byte boundaries.

use crate::text::segment::Sentence;
use anyhow::{anyhow, Context};
use std::ops::Range;
use std::path::Path;
use tokenizers::{AddedToken, Tokenizer};

/// Byte range (start, end) of each token.
pub type Offsets = Vec<(usize, usize)>;

/// The model's tokenizer, with its gist tokens registered as special tokens.
#[derive(Clone)]
pub struct GistTokenizer {
    inner: Tokenizer,
    /// The same tokenizer reading special-token names as ordinary text
    /// (`encode_special_tokens`), for [`GistTokenizer::encode_text`].
    plain: Tokenizer,
}

impl GistTokenizer {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        Ok(Self::from_tokenizer(inner))
    }

    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Self { inner, plain }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Ids of these tokens, adding each missing one as a special token (appended after the
    /// current vocabulary, as the reference code does).
    pub fn ensure_special_tokens(&mut self, names: &[String]) -> anyhow::Result<Vec<u32>> {
        names
            .iter()
            .map(|name| {
                if let Some(id) = self.inner.token_to_id(name) {
                    return Ok(id);
                }
                for t in [&mut self.inner, &mut self.plain] {
                    t.add_special_tokens([AddedToken::from(name.clone(), true)])
                        .map_err(|e| anyhow!("adding special token {name:?}: {e}"))?;
                }
                self.inner
                    .token_to_id(name)
                    .with_context(|| format!("special token {name:?} has no id after adding it"))
            })
            .collect()
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, name: &str) -> Option<u32> {
        self.inner.token_to_id(name)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids and byte offsets (start, end) of `text`, with no special tokens added; the
    /// names of special tokens in it (`<|im_end|>`, a gist token) are read as those tokens.
    /// For text the program writes: a rendered chat template.
    pub fn encode(&self, text: &str) -> anyhow::Result<(Vec<u32>, Offsets)> {
        encode_with(&self.inner, text)
    }

    /// Like [`GistTokenizer::encode`], but special-token names in `text` are ordinary text.
    /// For documents: a stranger's text must not open a chat turn or write a gist token
    /// into a state that others' questions read (as `split_special_tokens` in HF
    /// tokenizers, `parse_special = false` in llama.cpp).
    pub fn encode_text(&self, text: &str) -> anyhow::Result<(Vec<u32>, Offsets)> {
        encode_with(&self.plain, text)
    }

    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }
}

fn encode_with(t: &Tokenizer, text: &str) -> anyhow::Result<(Vec<u32>, Offsets)> {
    let enc = t
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

/// Trains a byte-level BPE of `vocab_size` tokens on `files` and writes its tokenizer.json
/// to `out`. `special` (BOS, EOS, gist tokens...) get the first ids. Byte-level means every
/// byte has a token, so no text is ever unknown; no normalizer and no post-processor, so
/// offsets stay exact byte offsets of the input.
pub fn train_bpe(
    files: &[std::path::PathBuf],
    vocab_size: usize,
    special: &[String],
    out: &Path,
) -> anyhow::Result<GistTokenizer> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::TokenizerBuilder;

    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            special
                .iter()
                .map(|s| AddedToken::from(s.clone(), true))
                .collect(),
        )
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer: tokenizers::TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .build()
        .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    tokenizer
        .train_from_files(&mut trainer, files)
        .map_err(|e| anyhow!("training BPE: {e}"))?;
    tokenizer
        .save(out, true)
        .map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
    GistTokenizer::from_file(out)
}

/// One model segment: the tokens of a sentence (or of a piece of a long one), followed by
/// the gist tokens when `close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub tokens: Vec<u32>,
    /// Bytes of the document the tokens cover.
    pub bytes: Range<usize>,
    pub close: bool,
}

/// Tokenizes one sentence of `doc` into segments. `bos` is prepended (the document's first
/// sentence); `max_tokens` (0: none) cuts long sentences. `specials`: special-token names
/// in the text are those tokens ([`GistTokenizer::encode`]), else ordinary text
/// ([`GistTokenizer::encode_text`]).
pub fn sentence_segments(
    tok: &GistTokenizer,
    doc: &str,
    sentence: &Sentence,
    bos: Option<u32>,
    max_tokens: usize,
    specials: bool,
) -> anyhow::Result<Vec<Segment>> {
    let text = &doc[sentence.range.clone()];
    let base = sentence.range.start;
    let (mut ids, offsets) = if specials {
        tok.encode(text)?
    } else {
        tok.encode_text(text)?
    };
    // Byte where each token starts, relative to the document; a token that shares bytes
    // with the previous one (a character split by byte-level BPE) cannot start a piece.
    let mut starts: Vec<Option<usize>> = Vec::with_capacity(ids.len());
    let mut prev_end = 0;
    for &(s, e) in &offsets {
        starts.push((s >= prev_end).then_some(base + s));
        prev_end = prev_end.max(e);
    }
    if let Some(b) = bos {
        ids.insert(0, b);
        starts.insert(0, Some(base));
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut a = 0;
    while a < ids.len() {
        let mut b = ids.len();
        if max_tokens > 0 && b - a > max_tokens {
            // The latest cut at or before a + max_tokens where a token starts a character.
            b = (a + 1..=a + max_tokens)
                .rev()
                .find(|&i| starts[i].is_some())
                .unwrap_or(a + max_tokens);
        }
        let byte_start = if a == 0 {
            base
        } else {
            starts[a].unwrap_or(base)
        };
        let byte_end = if b == ids.len() {
            sentence.range.end
        } else {
            starts[b].unwrap_or(sentence.range.end)
        };
        out.push(Segment {
            tokens: ids[a..b].to_vec(),
            bytes: byte_start..byte_end,
            close: b < ids.len() || sentence.closed(),
        });
        a = b;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::encoder::DocumentEncoder;
    use crate::text::segment::{split, SegmentConfig};

    /// A byte-level tokenizer with no merges: one token per byte (ids 0..256), plus BOS.
    pub fn byte_tokenizer() -> GistTokenizer {
        let mut t = GistTokenizer::from_tokenizer(crate::model::random::byte_level_tokenizer());
        t.ensure_special_tokens(&["<s>".to_string()]).unwrap();
        t
    }

    #[test]
    fn tokens_never_cross_sentences_and_long_ones_are_cut() {
        let tok = byte_tokenizer();
        let doc = "Short one. A much longer sentence here. End.";
        let sents = split(doc, &SegmentConfig::default());
        let mut all = Vec::new();
        for (i, s) in sents.iter().enumerate() {
            let bos = (i == 0).then(|| tok.token_to_id("<s>").unwrap());
            let segs = sentence_segments(&tok, doc, s, bos, 8, false).unwrap();
            for seg in &segs {
                assert!(seg.tokens.len() <= 8);
                assert!(seg.bytes.start >= s.range.start && seg.bytes.end <= s.range.end);
                assert!(seg.close);
            }
            all.extend(segs);
        }
        // Pieces tile the document.
        assert_eq!(all[0].bytes.start, 0);
        for w in all.windows(2) {
            assert_eq!(w[0].bytes.end, w[1].bytes.start);
        }
        assert_eq!(all.last().unwrap().bytes.end, doc.len());
        // One token per byte, plus BOS.
        let n: usize = all.iter().map(|s| s.tokens.len()).sum();
        assert_eq!(n, doc.len() + 1);
    }

    #[test]
    fn gist_tokens_are_added_once_as_special_tokens() {
        let mut tok = byte_tokenizer();
        let names = crate::model::config::GistConfig::reference_names(2);
        let ids = tok.ensure_special_tokens(&names).unwrap();
        assert_eq!(ids, tok.ensure_special_tokens(&names).unwrap());
        let (enc, _) = tok.encode("a<end_of_sentence_0>b").unwrap();
        assert_eq!(enc, vec![b'a' as u32, ids[0], b'b' as u32]);
        // A document's text never holds a gist token: the name is its bytes.
        let (plain, offsets) = tok.encode_text("a<end_of_sentence_0>b").unwrap();
        assert_eq!(plain.len(), "a<end_of_sentence_0>b".len());
        assert!(plain.iter().all(|t| !ids.contains(t)));
        assert_eq!(offsets.last(), Some(&(20, 21)));
    }

    /// A document naming a gist token gets its characters; text the program rendered gets
    /// the token.
    #[test]
    fn documents_read_special_token_names_as_text() {
        let mut tok = byte_tokenizer();
        let gist = tok
            .ensure_special_tokens(&["<end_of_sentence_0>".to_string()])
            .unwrap()[0];
        let text = "Before <end_of_sentence_0> after. The end.";
        let read = |enc: DocumentEncoder| -> Vec<u32> {
            let mut enc = enc;
            let mut segs = enc.push(text).unwrap();
            segs.extend(enc.finish().unwrap());
            segs.into_iter().flat_map(|s| s.tokens).collect()
        };
        let seg = SegmentConfig::default();
        let document = read(DocumentEncoder::new(&tok, &seg, None));
        assert!(!document.contains(&gist));
        assert_eq!(tok.decode(&document).unwrap(), text);
        let rendered = read(DocumentEncoder::new(&tok, &seg, None).reading_special_tokens());
        assert_eq!(rendered.iter().filter(|&&t| t == gist).count(), 1);
    }
}
