//! Sentence segmentation: where the gist tokens go.
//!
//! A gist model is trained with one segmentation rule and must be run with the same one, so
//! the rule ([`SegmentConfig`]) is part of the model's `gist.json`, never a caller's choice.
//!
//! Two modes:
//! - [`SegmentMode::Smart`]: UAX#29 sentence boundaries (unicode-segmentation) computed on a
//!   *view* of the text in which single newlines inside a paragraph read as spaces (so
//!   hard-wrapped lines join), then filtered: no boundary after common abbreviations
//!   ("Mr.", "e.g.", "U.S.") or single-letter initials. UAX#29 already keeps decimals and
//!   versions ("3.14", "v1.2.3") whole, keeps closing quotes and brackets with their full
//!   stop, continues after "..." when a lowercase word follows, and breaks after CJK full
//!   stops. Whitespace after a boundary belongs to the sentence before it.
//! - [`SegmentMode::Reference`]: the reference code's rule, byte for byte: a boundary after
//!   ". ", "? ", "! ", ".\n", "?\n", "!\n", and at the end of the text when it ends in
//!   '.', '?' or '!'. A tail without that punctuation stays open (no gists).
//!
//! Both modes force a boundary when a sentence reaches `max_sentence_bytes` (at the last
//! whitespace in its second half, else at a grapheme boundary), so unpunctuated text (code,
//! logs, tables, a 500-KB line) never grows one segment without bound. The token limit
//! (`max_sentence_tokens`) is applied after tokenization, in [`crate::text::tokenize`].
//!
//! Streaming: [`Segmenter`] takes text in arbitrary chunks and emits a sentence only once
//! its end is certain. Every decision is a pure function of the text from the sentence's
//! start to a fixed window beyond it (`max_sentence_bytes + LOOKAHEAD` bytes, or the end of
//! the text), so how the text was chunked never changes the result.

use serde::{Deserialize, Serialize};
use std::ops::Range;
use unicode_segmentation::UnicodeSegmentation;

/// Bytes of text beyond a candidate boundary that must be seen before it is decided.
/// UAX#29 looks ahead past spaces and punctuation to the next letter ("etc. and" does not
/// break, "etc. And" does); 256 bytes covers any realistic run of them.
pub const LOOKAHEAD: usize = 256;

/// Which boundary rule a model was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SegmentMode {
    /// UAX#29 with line joining, abbreviations and forced limits.
    #[default]
    Smart,
    /// The reference code's punctuation rule, exactly.
    Reference,
}

/// Segmentation settings; stored in the model's `gist.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    #[serde(default)]
    pub mode: SegmentMode,
    /// Force a boundary once a sentence holds this many tokens (0: no limit).
    #[serde(default = "default_max_tokens")]
    pub max_sentence_tokens: usize,
    /// Force a boundary once a sentence holds this many bytes. 0 means no limit in reference
    /// mode (the streaming buffer is then unbounded on unpunctuated text) and the default
    /// (2048) in smart mode, whose decisions need a bounded window to be chunk-invariant.
    #[serde(default = "default_max_bytes")]
    pub max_sentence_bytes: usize,
    /// Words that end with a full stop without ending the sentence, beside the built-in
    /// list (compared without the final '.', case-insensitively).
    #[serde(default)]
    pub extra_abbreviations: Vec<String>,
}

fn default_max_tokens() -> usize {
    128
}
fn default_max_bytes() -> usize {
    2048
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            mode: SegmentMode::Smart,
            max_sentence_tokens: default_max_tokens(),
            max_sentence_bytes: default_max_bytes(),
            extra_abbreviations: Vec::new(),
        }
    }
}

impl SegmentConfig {
    /// The reference code's rule with no limits: what its checkpoints were trained with.
    pub fn reference() -> Self {
        Self {
            mode: SegmentMode::Reference,
            max_sentence_tokens: 0,
            max_sentence_bytes: 0,
            extra_abbreviations: Vec::new(),
        }
    }
}

/// Why a sentence ended where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// A sentence boundary of the mode's rule (or the end of the text in smart mode).
    Boundary,
    /// The length limit forced it.
    Forced,
    /// The text ended without a boundary (reference mode): no gists follow it.
    Open,
}

/// One sentence: a byte range of the document and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sentence {
    pub range: Range<usize>,
    pub end: End,
}

impl Sentence {
    /// Whether gist tokens follow this sentence.
    pub fn closed(&self) -> bool {
        self.end != End::Open
    }
}

/// Invalid UTF-8 in a byte stream given to [`Segmenter::push_bytes`].
#[derive(Debug, thiserror::Error)]
#[error("text is not valid UTF-8 at byte {offset} of the document")]
pub struct Utf8Error {
    pub offset: usize,
}

/// Streaming segmenter: push chunks, collect sentences as they become certain, finish.
#[derive(Debug, Clone)]
pub struct Segmenter {
    cfg: SegmentConfig,
    abbreviations: Vec<String>,
    /// Text not yet emitted; starts at document byte `base`.
    buf: String,
    base: usize,
    /// Trailing bytes of an incomplete UTF-8 sequence from `push_bytes`.
    pending_bytes: Vec<u8>,
}

/// Built-in abbreviations (lowercase, without the final '.').
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "prof", "sr", "jr", "rev", "gen", "col", "capt", "lt", "sgt",
    "gov", "sen", "rep", "hon", "mt", "ft", "ave", "blvd", "rd", "no", "vol", "vols", "fig",
    "figs", "eq", "ch", "sec", "art", "pp", "ed", "eds", "inc", "ltd", "co", "corp", "vs", "cf",
    "approx", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec", "e.g", "i.e", "u.s", "u.k", "u.n", "a.m", "p.m", "ph.d", "viz", "al",
];

impl Segmenter {
    pub fn new(cfg: SegmentConfig) -> Self {
        let mut abbreviations: Vec<String> = ABBREVIATIONS.iter().map(|s| s.to_string()).collect();
        abbreviations.extend(
            cfg.extra_abbreviations
                .iter()
                .map(|a| a.trim_end_matches('.').to_lowercase()),
        );
        Self {
            cfg,
            abbreviations,
            buf: String::new(),
            base: 0,
            pending_bytes: Vec::new(),
        }
    }

    /// A segmenter that goes on from a carry ([`Segmenter::carry`]) taken from another,
    /// as if it had seen the whole document so far: every decision is made on the text
    /// after the last emitted sentence, which is all a carry holds. This is how a document
    /// that arrives in parts is segmented across processes.
    pub fn resume(cfg: SegmentConfig, text: &str, offset: usize) -> Self {
        let mut s = Self::new(cfg);
        s.buf.push_str(text);
        s.base = offset;
        s
    }

    /// Text not yet emitted as a sentence, and its document byte offset. None while a
    /// UTF-8 sequence is split (a carry must be text).
    pub fn carry(&self) -> Option<(&str, usize)> {
        self.pending_bytes
            .is_empty()
            .then_some((self.buf.as_str(), self.base))
    }

    /// Bytes of the document seen so far.
    pub fn consumed(&self) -> usize {
        self.base + self.buf.len() + self.pending_bytes.len()
    }

    /// Adds text; returns the sentences whose end is now certain.
    pub fn push(&mut self, chunk: &str) -> Vec<Sentence> {
        self.buf.push_str(chunk);
        self.drain(false)
    }

    /// Adds raw bytes, which may split a UTF-8 sequence between calls.
    pub fn push_bytes(&mut self, chunk: &[u8]) -> Result<Vec<Sentence>, Utf8Error> {
        let mut bytes = std::mem::take(&mut self.pending_bytes);
        bytes.extend_from_slice(chunk);
        let valid = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => {
                return Err(Utf8Error {
                    offset: self.base + self.buf.len() + e.valid_up_to(),
                })
            }
        };
        self.pending_bytes = bytes.split_off(valid);
        // Checked just above.
        let text = std::str::from_utf8(&bytes).expect("validated prefix");
        Ok(self.push(text))
    }

    /// Ends the text; returns the remaining sentences.
    pub fn finish(&mut self) -> Result<Vec<Sentence>, Utf8Error> {
        if !self.pending_bytes.is_empty() {
            return Err(Utf8Error {
                offset: self.base + self.buf.len(),
            });
        }
        Ok(self.drain(true))
    }

    fn drain(&mut self, finished: bool) -> Vec<Sentence> {
        let mut out = Vec::new();
        loop {
            let next = match self.cfg.mode {
                SegmentMode::Smart => self.next_smart(finished),
                SegmentMode::Reference => self.next_reference(finished),
            };
            let Some((len, end)) = next else { break };
            debug_assert!(len > 0 && len <= self.buf.len());
            out.push(Sentence {
                range: self.base..self.base + len,
                end,
            });
            self.buf.drain(..len);
            self.base += len;
        }
        out
    }

    /// The window every decision about the next sentence is made on, or None if more text
    /// is needed before deciding.
    fn window(&self, finished: bool) -> Option<&str> {
        if self.buf.is_empty() {
            return None;
        }
        let cap = self.cap();
        if cap == 0 {
            return Some(&self.buf);
        }
        let want = cap + LOOKAHEAD;
        if self.buf.len() < want {
            return finished.then_some(self.buf.as_str());
        }
        Some(&self.buf[..floor_char_boundary(&self.buf, want)])
    }

    /// The byte cap in force (see [`SegmentConfig::max_sentence_bytes`]).
    fn cap(&self) -> usize {
        match (self.cfg.mode, self.cfg.max_sentence_bytes) {
            (SegmentMode::Smart, 0) => default_max_bytes(),
            (_, cap) => cap,
        }
    }

    fn next_smart(&self, finished: bool) -> Option<(usize, End)> {
        let w = self.window(finished)?;
        let whole = finished && w.len() == self.buf.len();
        let cap = self.cap();
        let view = join_wrapped_lines(w);
        let mut found = None;
        for (start, piece) in view.split_sentence_bound_indices() {
            let b = start + piece.len();
            if b == view.len() && !whole {
                break; // the window's end is not a boundary
            }
            if w[..b].trim().is_empty() || self.ends_with_abbreviation(&w[..b]) {
                continue;
            }
            found = Some(b);
            break;
        }
        match found {
            Some(b) if b <= cap => Some((b + whitespace_run(&w[b..]), End::Boundary)),
            _ if w.len() > cap => Some((forced_cut(w, cap), End::Forced)),
            // No boundary in a window shorter than the cap: the text ended.
            _ if whole => Some((w.len(), End::Boundary)),
            _ => None,
        }
    }

    fn next_reference(&self, finished: bool) -> Option<(usize, End)> {
        let w = self.window(finished)?;
        let whole = finished && w.len() == self.buf.len();
        let cap = self.cap();
        let bytes = w.as_bytes();
        let found = bytes
            .windows(2)
            .position(|p| matches!(p[0], b'.' | b'?' | b'!') && matches!(p[1], b' ' | b'\n'))
            .map(|i| i + 2);
        match found {
            Some(b) if cap == 0 || b <= cap => Some((b, End::Boundary)),
            _ if cap > 0 && w.len() > cap => Some((forced_cut(w, cap), End::Forced)),
            _ if whole => {
                let end = match bytes.last() {
                    Some(b'.' | b'?' | b'!') => End::Boundary,
                    _ => End::Open,
                };
                Some((w.len(), end))
            }
            _ => None,
        }
    }

    /// Whether `text` (a sentence candidate) ends in an abbreviation's full stop, so the
    /// boundary after it is not a sentence end.
    fn ends_with_abbreviation(&self, text: &str) -> bool {
        let t = text.trim_end();
        let Some(stem) = t.strip_suffix('.') else {
            return false;
        };
        if stem.ends_with('.') {
            return false; // "...": an ellipsis
        }
        let word = stem
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("")
            .trim_start_matches(|c: char| !c.is_alphanumeric());
        if word.is_empty() {
            return false;
        }
        let mut chars = word.chars();
        // A single capital letter: an initial ("J. R. R. Tolkien").
        if let (Some(c), None) = (chars.next(), chars.next()) {
            if c.is_uppercase() {
                return true;
            }
        }
        let lower = word.to_lowercase();
        self.abbreviations.contains(&lower)
    }
}

/// Segments a whole text at once (the same result as streaming it in any chunks).
pub fn split(text: &str, cfg: &SegmentConfig) -> Vec<Sentence> {
    let mut seg = Segmenter::new(cfg.clone());
    let mut out = seg.push(text);
    out.extend(seg.finish().expect("a &str is valid UTF-8"));
    out
}

/// The text with each newline that does not end a paragraph replaced by a space, byte for
/// byte the same length, so UAX#29 (which breaks at every newline) reads wrapped lines as
/// one paragraph. A paragraph ends at a blank line.
fn join_wrapped_lines(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            // Is the next line blank (only spaces/tabs/CR before another newline)?
            let mut j = i + 1;
            while j < bytes.len() && matches!(bytes[j], b' ' | b'\t' | b'\r') {
                j += 1;
            }
            let blank_next = j < bytes.len() && bytes[j] == b'\n';
            // Is this line itself blank (the newline closes a blank line)?
            let mut k = i;
            while k > 0 && matches!(bytes[k - 1], b' ' | b'\t' | b'\r') {
                k -= 1;
            }
            let blank_this = k == 0 || bytes[k - 1] == b'\n';
            if !blank_next && !blank_this {
                out[i] = b' ';
                if i > 0 && bytes[i - 1] == b'\r' {
                    out[i - 1] = b' ';
                }
            }
        }
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes.
    String::from_utf8(out).expect("ASCII-for-ASCII replacement keeps UTF-8 valid")
}

fn whitespace_run(text: &str) -> usize {
    text.len() - text.trim_start().len()
}

/// Where a sentence over `cap` bytes is cut: after the last whitespace in its second half,
/// else at the last grapheme boundary within the cap (never inside a character or a
/// combining sequence), else after the first grapheme.
fn forced_cut(w: &str, cap: usize) -> usize {
    let limit = floor_char_boundary(w, cap);
    let head = &w[..limit];
    if let Some(i) = head.rfind(char::is_whitespace) {
        let after = i + head[i..].chars().next().map_or(1, char::len_utf8);
        if after > cap / 2 {
            return after;
        }
    }
    let mut last = 0;
    for (i, g) in w.grapheme_indices(true) {
        let end = i + g.len();
        if end > cap {
            break;
        }
        last = end;
    }
    if last == 0 {
        // One grapheme longer than the cap: take it whole.
        w.graphemes(true).next().map_or(w.len(), str::len)
    } else {
        last
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn texts(text: &str, cfg: &SegmentConfig) -> Vec<String> {
        split(text, cfg)
            .iter()
            .map(|s| text[s.range.clone()].to_string())
            .collect()
    }

    #[test]
    fn splits_plain_sentences_and_keeps_trailing_space() {
        let cfg = SegmentConfig::default();
        assert_eq!(
            texts("One two. Three four! Five?", &cfg),
            vec!["One two. ", "Three four! ", "Five?"]
        );
    }

    #[test]
    fn joins_hard_wrapped_lines_but_not_paragraphs() {
        let cfg = SegmentConfig::default();
        let t = "This sentence is\nwrapped across\nlines. Next one\nhere.\n\nNew paragraph";
        assert_eq!(
            texts(t, &cfg),
            vec![
                "This sentence is\nwrapped across\nlines. ",
                "Next one\nhere.\n\n",
                "New paragraph"
            ]
        );
    }

    #[test]
    fn keeps_abbreviations_decimals_and_versions() {
        let cfg = SegmentConfig::default();
        let t =
            "Mr. Smith met Dr. Jones at St. Paul's, e.g. at noon. Pi is 3.14 and v1.2.3 shipped. \
                 J. R. R. Tolkien wrote in the U.S. Army? No.";
        assert_eq!(
            texts(t, &cfg),
            vec![
                "Mr. Smith met Dr. Jones at St. Paul's, e.g. at noon. ",
                "Pi is 3.14 and v1.2.3 shipped. ",
                "J. R. R. Tolkien wrote in the U.S. Army? ",
                "No."
            ]
        );
    }

    #[test]
    fn closing_quotes_ellipses_and_cjk() {
        let cfg = SegmentConfig::default();
        assert_eq!(
            texts("He said \"Stop.\" Then he left. Well... maybe not.", &cfg),
            vec!["He said \"Stop.\" ", "Then he left. ", "Well... maybe not."]
        );
        assert_eq!(
            texts("(It rained.) We stayed.", &cfg),
            vec!["(It rained.) ", "We stayed."]
        );
        assert_eq!(
            texts("今日は雨です。明日は晴れ。", &cfg),
            vec!["今日は雨です。", "明日は晴れ。"]
        );
    }

    #[test]
    fn forces_a_boundary_in_unpunctuated_text() {
        let cfg = SegmentConfig {
            max_sentence_bytes: 100,
            ..SegmentConfig::default()
        };
        let line = "word ".repeat(100_000); // 500 KB, no punctuation
        let s = split(&line, &cfg);
        assert!(s.len() >= 5000, "{} sentences", s.len());
        assert!(s.iter().all(|s| s.range.len() <= 100));
        assert!(s[..s.len() - 1].iter().all(|s| s.end == End::Forced));
        let no_space = "x".repeat(500_000);
        let s = split(&no_space, &cfg);
        assert_eq!(s.len(), 5000);
    }

    #[test]
    fn reference_mode_is_the_reference_rule() {
        let cfg = SegmentConfig::reference();
        assert_eq!(
            texts("Mr. Smith left. Pi is 3.14! Why?\nBecause", &cfg),
            vec!["Mr. ", "Smith left. ", "Pi is 3.14! ", "Why?\n", "Because"]
        );
        let s = split("A. B", &cfg);
        assert_eq!(s[1].end, End::Open);
        let s = split("A. B.", &cfg);
        assert_eq!(s[1].end, End::Boundary);
    }

    #[test]
    fn leading_whitespace_joins_the_first_sentence() {
        let cfg = SegmentConfig::default();
        assert_eq!(
            texts("\n\n  Hello there. Bye.", &cfg),
            vec!["\n\n  Hello there. ", "Bye."]
        );
        assert!(split("", &cfg).is_empty());
        assert_eq!(texts("   ", &cfg), vec!["   "]);
    }

    #[test]
    fn utf8_split_across_byte_chunks_and_invalid_bytes() {
        let text = "Ünïcödé text. Ça va? 日本語。";
        let mut seg = Segmenter::new(SegmentConfig::default());
        let mut got = Vec::new();
        for b in text.as_bytes().chunks(1) {
            got.extend(seg.push_bytes(b).unwrap());
        }
        got.extend(seg.finish().unwrap());
        assert_eq!(got, split(text, &SegmentConfig::default()));
        let mut seg = Segmenter::new(SegmentConfig::default());
        let err = seg.push_bytes(b"ok \xff bad").unwrap_err();
        assert_eq!(err.offset, 3);
        let mut seg = Segmenter::new(SegmentConfig::default());
        seg.push_bytes(b"cut \xc3").unwrap();
        assert!(seg.finish().is_err());
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "Mr.", "Dr.", "e.g.", "U.S.", "3.14", "v1.2", "...", "…", ".", "?", "!", " ", "  ",
            "\n", "\n\n", "\r\n", "\"", ")", "(", "word", "Word", "the", "THE", "。", "日本", "é",
            "x\u{301}", "🙂", "\t", "a", "B", "12", ",", ";",
        ]);
        prop::collection::vec(pieces, 0..120).prop_map(|v| v.concat())
    }

    fn configs() -> impl Strategy<Value = SegmentConfig> {
        (
            prop::bool::ANY,
            prop::sample::select(vec![0usize, 7, 40, 300]),
        )
            .prop_map(|(reference, cap)| SegmentConfig {
                mode: if reference {
                    SegmentMode::Reference
                } else {
                    SegmentMode::Smart
                },
                max_sentence_bytes: cap,
                ..SegmentConfig::default()
            })
    }

    proptest! {
        #[test]
        fn sentences_concatenate_to_the_input(text in text_strategy(), cfg in configs()) {
            let s = split(&text, &cfg);
            let mut pos = 0;
            for sent in &s {
                prop_assert_eq!(sent.range.start, pos);
                prop_assert!(sent.range.end > sent.range.start);
                pos = sent.range.end;
            }
            prop_assert_eq!(pos, text.len());
            if cfg.max_sentence_bytes > 0 {
                for sent in &s {
                    // A cut never splits a grapheme, so one grapheme may exceed a tiny cap.
                    let g = text[sent.range.clone()].graphemes(true).count();
                    prop_assert!(sent.range.len() <= cfg.max_sentence_bytes || g == 1
                        || sent.end != End::Forced);
                }
            }
        }

        #[test]
        fn chunking_never_changes_the_result(
            text in text_strategy(),
            cfg in configs(),
            cuts in prop::collection::vec(0usize..2000, 0..12),
        ) {
            let whole = split(&text, &cfg);
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort();
            let mut seg = Segmenter::new(cfg.clone());
            let mut got = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(seg.push_bytes(&bytes[prev..c]).unwrap());
                prev = c;
            }
            got.extend(seg.finish().unwrap());
            prop_assert_eq!(got, whole);
        }

        #[test]
        fn resuming_from_a_carry_equals_one_segmenter(
            text in text_strategy(),
            cfg in configs(),
            cuts in prop::collection::vec(0usize..2000, 0..6),
        ) {
            // Each part goes to a fresh segmenter resumed from the previous one's carry:
            // how a document arriving in parts is segmented across processes.
            let whole = split(&text, &cfg);
            let mut cuts: Vec<usize> = cuts
                .into_iter()
                .map(|c| floor_char_boundary(&text, c % (text.len() + 1)))
                .collect();
            cuts.sort();
            let mut got = Vec::new();
            let (mut carry, mut offset, mut prev) = (String::new(), 0, 0);
            for c in cuts.into_iter().chain([text.len()]) {
                let mut seg = Segmenter::resume(cfg.clone(), &carry, offset);
                got.extend(seg.push(&text[prev..c]));
                prev = c;
                let (t, o) = seg.carry().unwrap();
                (carry, offset) = (t.to_string(), o);
            }
            got.extend(Segmenter::resume(cfg, &carry, offset).finish().unwrap());
            prop_assert_eq!(got, whole);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            cfg in configs(),
        ) {
            let mut seg = Segmenter::new(cfg);
            for chunk in bytes.chunks(37) {
                if seg.push_bytes(chunk).is_err() {
                    return Ok(());
                }
            }
            let _ = seg.finish();
        }

        #[test]
        fn never_panics_on_arbitrary_strings(text in ".{0,400}", cfg in configs()) {
            let s = split(&text, &cfg);
            prop_assert_eq!(s.last().map_or(0, |s| s.range.end), text.len());
        }
    }
}
