//! Turns generated token ids into text pieces: never half a character, never part of a stop string.

use tokenizers::Tokenizer;

/// Incremental detokeniser (the prefix-window method of TGI and candle's examples): a piece is
/// released only when decoding no longer ends in U+FFFD, so multi-byte characters split across
/// byte tokens (Chinese, emoji) arrive whole.
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.tokens.push(id);
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.tokens[self.prefix_offset..]);
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Some(piece)
        } else {
            None
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self) -> Option<String> {
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.tokens[self.prefix_offset..]);
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        (full.len() > prefix.len() && full.is_char_boundary(prefix.len()))
            .then(|| full[prefix.len()..].to_string())
    }
}

/// Holds back text that could be the start of a stop string, and finds stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What `StopMatcher::push` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to emit (may be empty).
    Continue(String),
    /// A stop string was found: emit this text (everything before it) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> StopOutcome {
        self.pending.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let out = self.pending[..keep].to_string();
        self.pending.drain(..keep);
        StopOutcome::Continue(out)
    }

    /// The held-back tail, released when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pieces_is_caught_and_withheld() {
        let mut m = StopMatcher::new(&["\nUser:".to_string()]);
        assert_eq!(m.push("Hello"), StopOutcome::Continue("Hello".into()));
        assert_eq!(m.push(" there\nUs"), StopOutcome::Continue(" there".into()));
        assert_eq!(m.push("er: hi"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("ab ST"), StopOutcome::Continue("ab ".into()));
        assert_eq!(m.push("AR"), StopOutcome::Continue("STAR".into()));
        assert_eq!(m.push("x S"), StopOutcome::Continue("x ".into()));
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("你好"), StopOutcome::Continue("你好".into()));
        assert_eq!(m.finish(), "");
    }
}
