//! The document encoder: text arriving in parts becomes model segments (sentences,
//! tokenized on their own, BOS first) as soon as each sentence end is certain. Its
//! [`Carry`] is what a later part, perhaps in another process, resumes from.

use crate::text::segment::{End, SegmentConfig, SegmentMode, Segmenter, Sentence};
use crate::text::tokenize::{sentence_segments, GistTokenizer, Segment};
use serde::{Deserialize, Serialize};

/// Where a document's encoding stands between two of its parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    /// Text after the last sentence emitted (no sentence end is certain in it yet).
    pub text: String,
    /// Document byte offset of `text`.
    pub offset: usize,
    /// Whether the first sentence (the one that gets BOS) was emitted.
    pub started: bool,
}

/// Text in, model segments out, as sentences become certain.
pub struct DocumentEncoder<'m> {
    tokenizer: &'m GistTokenizer,
    max_tokens: usize,
    /// Reference segmentation (adds the reference code's final space, see `finish`).
    reference: bool,
    bos: Option<u32>,
    segmenter: Segmenter,
    /// Text not yet covered by an emitted sentence, starting at document byte `text_base`.
    text: String,
    text_base: usize,
    first: bool,
    /// Special-token names are read as tokens (see `reading_special_tokens`).
    specials: bool,
}

impl<'m> DocumentEncoder<'m> {
    /// An encoder with segmentation `seg`; `bos` starts the document.
    pub fn new(tokenizer: &'m GistTokenizer, seg: &SegmentConfig, bos: Option<u32>) -> Self {
        Self {
            tokenizer,
            max_tokens: seg.max_sentence_tokens,
            reference: seg.mode == SegmentMode::Reference,
            bos,
            segmenter: Segmenter::new(seg.clone()),
            text: String::new(),
            text_base: 0,
            first: true,
            specials: false,
        }
    }

    /// Reads special-token names in the text as those tokens: for text the program
    /// rendered (a chat template around a question), never for a document.
    pub fn reading_special_tokens(mut self) -> Self {
        self.specials = true;
        self
    }

    /// An encoder that goes on where the one that wrote `carry` stopped (a document that
    /// arrives in parts: each part may be encoded by another process).
    pub fn resume(
        tokenizer: &'m GistTokenizer,
        seg: &SegmentConfig,
        bos: Option<u32>,
        carry: &Carry,
    ) -> Self {
        let mut enc = Self::new(tokenizer, seg, bos);
        enc.segmenter = Segmenter::resume(seg.clone(), &carry.text, carry.offset);
        enc.text = carry.text.clone();
        enc.text_base = carry.offset;
        enc.first = !carry.started;
        enc
    }

    /// What a later [`DocumentEncoder::resume`] needs: the text after the last sentence
    /// emitted, where it starts, and whether the document has begun.
    pub fn carry(&self) -> Carry {
        Carry {
            text: self.text.clone(),
            offset: self.text_base,
            started: !self.first,
        }
    }

    pub fn push(&mut self, chunk: &str) -> anyhow::Result<Vec<Segment>> {
        self.text.push_str(chunk);
        let sentences = self.segmenter.push(chunk);
        self.encode(sentences)
    }

    pub fn finish(&mut self) -> anyhow::Result<Vec<Segment>> {
        let sentences = self.segmenter.finish()?;
        let n = sentences.len();
        let mut out = self.encode(sentences[..n.saturating_sub(1)].to_vec())?;
        if let Some(last) = sentences.last() {
            let text =
                &self.text[last.range.start - self.text_base..last.range.end - self.text_base];
            if self.reference && last.end == End::Boundary && text.ends_with('.') {
                out.extend(self.encode_reference_last(last.clone())?);
            } else {
                out.extend(self.encode(vec![last.clone()])?);
            }
        }
        Ok(out)
    }

    /// The reference code rewrites a "." that ends the text into ". " before the gists
    /// (its `\.$` rule); its checkpoints saw that space, so reference mode adds it to the
    /// tokens (tokenized with the sentence: BPE may merge ". "), not to the text.
    fn encode_reference_last(&mut self, s: Sentence) -> anyhow::Result<Vec<Segment>> {
        let local = s.range.start - self.text_base..s.range.end - self.text_base;
        let mut text = self.text[local.clone()].to_string();
        text.push(' ');
        let spaced = Sentence {
            range: 0..text.len(),
            end: s.end,
        };
        let bos = if self.first { self.bos } else { None };
        self.first = false;
        let mut segs = sentence_segments(
            self.tokenizer,
            &text,
            &spaced,
            bos,
            self.max_tokens,
            self.specials,
        )?;
        for seg in &mut segs {
            seg.bytes = (s.range.start + seg.bytes.start).min(s.range.end)
                ..(s.range.start + seg.bytes.end).min(s.range.end);
        }
        self.text.drain(..local.end);
        self.text_base = s.range.end;
        Ok(segs)
    }

    fn encode(&mut self, sentences: Vec<Sentence>) -> anyhow::Result<Vec<Segment>> {
        let mut out = Vec::new();
        for s in sentences {
            // Re-base the sentence onto the text still held.
            let local = Sentence {
                range: s.range.start - self.text_base..s.range.end - self.text_base,
                end: s.end,
            };
            let bos = if self.first { self.bos } else { None };
            self.first = false;
            let mut segs = sentence_segments(
                self.tokenizer,
                &self.text,
                &local,
                bos,
                self.max_tokens,
                self.specials,
            )?;
            for seg in &mut segs {
                seg.bytes = seg.bytes.start + self.text_base..seg.bytes.end + self.text_base;
            }
            out.extend(segs);
            self.text.drain(..local.range.end);
            self.text_base = s.range.end;
        }
        Ok(out)
    }
}
