//! Token-aware chunking (`kv_chunk()` in SQL): a long text cut into pieces
//! of at most `max_tokens` tokens of the loaded model, preferring paragraph,
//! then line, then sentence, then word boundaries, with an optional overlap.
//!
//! The cut points come from the model's own tokenization of the text, and
//! every chunk is counted again alone (as `kv_embed` will count it): a chunk
//! never exceeds `max_tokens`. Without overlap the chunks cover the text:
//! between two chunks there is only whitespace. The result depends only on
//! the text, the tokenizer and the two numbers.

/// Smallest `max_tokens` accepted: room for the longest run of tokens that
/// cannot be cut (one character as byte tokens after a word-start marker).
pub const MIN_CHUNK_TOKENS: usize = 8;

/// Texts are tokenized in segments of about this many bytes, each ending at
/// a paragraph (else line, sentence, word) break, so memory stays bounded for
/// any text; chunks never span two segments.
pub const SEGMENT_BYTES: usize = 256 << 10;

/// One chunk: bytes `start..end` of the text (no leading or trailing
/// whitespace) and its length in tokens, counted alone.
pub use kvembed_proto::ChunkSpan as Span;

/// Checks `kv_chunk`'s numbers; the message says what is wrong.
pub fn check_args(max_tokens: usize, overlap: usize) -> Result<(), String> {
    if max_tokens < MIN_CHUNK_TOKENS {
        return Err(format!(
            "max_tokens must be at least {MIN_CHUNK_TOKENS}, got {max_tokens}"
        ));
    }
    if overlap > max_tokens / 2 {
        return Err(format!(
            "overlap must be at most half of max_tokens ({}), got {overlap}",
            max_tokens / 2
        ));
    }
    Ok(())
}

/// How good a place to cut, from a cut in the middle of a word (0) to a
/// paragraph break (4).
fn level(text: &str, at: usize) -> u8 {
    let before = &text[..at];
    let after = &text[at..];
    let ws_before = before.len() - before.trim_end().len();
    let ws_after = after.len() - after.trim_start().len();
    let gap = &text[at - ws_before..at + ws_after];
    let newlines = gap.matches('\n').count();
    if newlines >= 2 {
        return 4;
    }
    if newlines == 1 {
        return 3;
    }
    let last = before.trim_end().chars().rev().find(|c| !is_closing(*c));
    let sentence_end = matches!(last, Some('.' | '!' | '?' | '…'));
    let cjk_end = matches!(last, Some('。' | '！' | '？'));
    if (sentence_end && !gap.is_empty()) || (cjk_end && ws_before == 0) {
        return 2;
    }
    u8::from(!gap.is_empty())
}

fn is_closing(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | ')' | ']' | '}' | '»' | '”' | '’' | '」' | '』' | '）'
    )
}

/// Cuts `text` into chunks. `tokenize` returns the byte span of each token of
/// a string (the model's tokenization, without special tokens), `count` the
/// number of tokens of a string alone. `max_tokens >= MIN_CHUNK_TOKENS`,
/// `overlap <= max_tokens / 2` (checked by the caller).
pub fn chunk_text<E>(
    text: &str,
    max_tokens: usize,
    overlap: usize,
    tokenize: impl Fn(&str) -> Result<Vec<(usize, usize)>, E>,
    count: impl Fn(&str) -> Result<usize, E>,
) -> Result<Vec<Span>, E> {
    let mut out = Vec::new();
    let mut from = 0;
    for seg_end in segments(text, SEGMENT_BYTES) {
        let segment = &text[from..seg_end];
        for span in chunk_segment(segment, max_tokens, overlap, &tokenize, &count)? {
            out.push(Span {
                start: span.start + from,
                end: span.end + from,
                ..span
            });
        }
        from = seg_end;
    }
    Ok(out)
}

/// Where segments of at most about `size` bytes end: at the best break in
/// the second half of each window, else at a character boundary.
fn segments(text: &str, size: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut from = 0;
    while text.len() - from > size {
        let window_end = floor_char_boundary(text, from + size);
        let half = floor_char_boundary(text, from + size / 2);
        let half = if half <= from {
            next_char_boundary(text, from)
        } else {
            half
        };
        let mut best: Option<(u8, usize)> = None;
        // Only places between characters where whitespace starts or ends are
        // worth looking at (every level above 0 has whitespace at the cut,
        // but for CJK full stops, handled by the fallback).
        for (i, c) in text[half..window_end].char_indices() {
            let at = half + i;
            if c.is_whitespace() && !text[..at].ends_with(char::is_whitespace) {
                let l = level(text, at);
                if best.is_none_or(|(bl, _)| l >= bl) {
                    best = Some((l, at));
                }
            }
        }
        let end = best.map_or(window_end, |(_, at)| at);
        let end = if end <= from {
            next_char_boundary(text, from)
        } else {
            end
        };
        ends.push(end);
        from = end;
    }
    ends.push(text.len());
    ends
}

fn chunk_segment<E>(
    text: &str,
    max_tokens: usize,
    overlap: usize,
    tokenize: &impl Fn(&str) -> Result<Vec<(usize, usize)>, E>,
    count: &impl Fn(&str) -> Result<usize, E>,
) -> Result<Vec<Span>, E> {
    let offsets = tokenize(text)?;
    let n = offsets.len();
    // Token i may start a chunk if it starts at or after the end of the
    // previous one (byte tokens of one character share its span) and on a
    // character boundary; `cut[i]` is then its level, else None. cut[n] is
    // the end of the text.
    let mut cut: Vec<Option<u8>> = Vec::with_capacity(n + 1);
    let mut starts: Vec<usize> = Vec::with_capacity(n + 1);
    for (i, &(s, _)) in offsets.iter().enumerate() {
        let s = s.min(text.len());
        starts.push(s);
        cut.push(if i == 0 {
            Some(5)
        } else if text.is_char_boundary(s) && s > starts[i - 1] {
            Some(level(text, s))
        } else {
            None
        });
    }
    starts.push(text.len());
    cut.push(Some(5));
    let span_of = |a: usize, b: usize| -> (usize, usize) {
        let piece = &text[starts[a]..starts[b]];
        let lead = piece.len() - piece.trim_start().len();
        (starts[a] + lead, starts[a] + piece.trim_end().len())
    };
    let mut out = Vec::new();
    let mut a = 0;
    // The previous chunk's end: the next one ends after it.
    let mut prev_b = 0;
    while a < n {
        // The latest best cut in the second half of the window, else the
        // latest cut anywhere in it, else the first one after it.
        let limit = (a + max_tokens).min(n);
        let mut b = if limit == n {
            n
        } else {
            let half = (a + max_tokens.div_ceil(2)).max(prev_b + 1);
            best_cut(&cut, half, limit)
                .or_else(|| best_cut(&cut, (a + 1).max(prev_b + 1), limit))
                .or_else(|| best_cut(&cut, a + 1, limit))
                .or_else(|| (limit + 1..=n).find(|&i| cut[i].is_some()))
                .unwrap_or(n)
        };
        // Counted alone, the chunk must fit: step back while it does not.
        loop {
            let (s, e) = span_of(a, b);
            let tokens = if s < e { count(&text[s..e])? } else { 0 };
            if tokens <= max_tokens || b == a + 1 {
                if s < e {
                    out.push(Span {
                        start: s,
                        end: e,
                        tokens,
                    });
                }
                break;
            }
            match (a + 1..b).rev().find(|&i| cut[i].is_some()) {
                Some(earlier) => b = earlier,
                None => {
                    if s < e {
                        out.push(Span {
                            start: s,
                            end: e,
                            tokens,
                        });
                    }
                    break;
                }
            }
        }
        if b >= n {
            break;
        }
        prev_b = b;
        // The next chunk starts up to `overlap` tokens back: at the earliest
        // sentence start within them, else the earliest word start, never
        // before this chunk's second token.
        a = if overlap == 0 {
            b
        } else {
            let from = b.saturating_sub(overlap).max(a + 1);
            let mut best: Option<(u8, usize)> = None;
            for i in from..b {
                // A start with only whitespace before `b` overlaps nothing.
                if text[starts[i]..starts[b]].trim().is_empty() {
                    continue;
                }
                if let Some(l) = cut[i] {
                    if best.is_none_or(|(bl, _)| l.min(2) > bl) {
                        best = Some((l.min(2), i));
                    }
                }
            }
            best.map_or(b, |(_, i)| i)
        };
    }
    Ok(out)
}

/// The latest cut of the highest level in `from..=to`.
fn best_cut(cut: &[Option<u8>], from: usize, to: usize) -> Option<usize> {
    let mut best: Option<(u8, usize)> = None;
    for (i, c) in cut.iter().enumerate().take(to + 1).skip(from) {
        if let Some(l) = *c {
            if best.is_none_or(|(bl, _)| l >= bl) {
                best = Some((l, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn next_char_boundary(s: &str, i: usize) -> usize {
    let mut i = (i + 1).min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in tokenizer for the algorithm's tests: a token is a run of
    /// whitespace followed by up to 4 letters or digits, or one other
    /// character; non-ASCII characters become one token per byte (as byte
    /// fallback does), all sharing the character's span.
    fn toy(text: &str) -> Result<Vec<(usize, usize)>, ()> {
        let mut out = Vec::new();
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut i = 0;
        while i < chars.len() {
            let start = chars[i].0;
            while i < chars.len() && chars[i].1.is_whitespace() {
                i += 1;
            }
            if i == chars.len() {
                out.push((start, text.len()));
                break;
            }
            let (at, c) = chars[i];
            if !c.is_ascii() {
                for _ in 0..c.len_utf8() {
                    out.push((at, at + c.len_utf8()));
                }
                i += 1;
                continue;
            }
            let mut j = i;
            if c.is_ascii_alphanumeric() {
                while j < chars.len() && j - i < 4 && chars[j].1.is_ascii_alphanumeric() {
                    j += 1;
                }
            } else {
                j += 1;
            }
            let end = chars.get(j).map_or(text.len(), |c| c.0);
            out.push((start, end));
            i = j;
        }
        Ok(out)
    }

    fn count(text: &str) -> Result<usize, ()> {
        toy(text).map(|t| t.len())
    }

    fn chunks(text: &str, max: usize, overlap: usize) -> Vec<&str> {
        chunk_text(text, max, overlap, toy, count)
            .unwrap()
            .iter()
            .map(|s| &text[s.start..s.end])
            .collect()
    }

    fn doc() -> String {
        let mut s = String::new();
        for p in 0..6 {
            for k in 0..5 {
                s.push_str(&format!("Paragraph {p} has sentence number {k} in it. "));
            }
            s.push_str("\n\n");
        }
        s
    }

    #[test]
    fn a_short_text_is_one_chunk_and_empty_text_none() {
        assert_eq!(chunks("  A short text.\n", 32, 4), vec!["A short text."]);
        assert!(chunks("", 32, 0).is_empty());
        assert!(chunks(" \n\t ", 32, 0).is_empty());
    }

    #[test]
    fn chunks_never_exceed_the_limit_and_cover_the_text() {
        let text = doc();
        for max in [8, 13, 40, 100] {
            let spans = chunk_text(&text, max, 0, toy, count).unwrap();
            assert!(spans.len() > 1);
            for s in &spans {
                assert!(s.tokens <= max, "{s:?} over {max}");
                assert_eq!(s.tokens, count(&text[s.start..s.end]).unwrap());
            }
            // Without overlap, only whitespace lies outside or between chunks.
            let mut at = 0;
            for s in &spans {
                assert!(
                    s.start >= at && text[at..s.start].trim().is_empty(),
                    "gap before {s:?}"
                );
                at = s.end;
            }
            assert!(text[at..].trim().is_empty());
        }
    }

    #[test]
    fn cuts_prefer_paragraphs_then_sentences() {
        let text = doc();
        // A sentence is 13 tokens, a paragraph 65: 70 tokens hold one
        // paragraph, 25 one sentence.
        for c in chunks(&text, 70, 0) {
            assert!(c.starts_with("Paragraph") && c.ends_with("it."), "{c:?}");
            assert!(!c.contains('\n'), "{c:?}");
        }
        for c in chunks(&text, 25, 0) {
            assert!(c.starts_with("Paragraph") && c.ends_with("it."), "{c:?}");
        }
    }

    #[test]
    fn overlap_repeats_the_end_of_the_previous_chunk() {
        let text = doc();
        let plain = chunks(&text, 25, 0);
        let over = chunks(&text, 25, 10);
        assert!(over.len() >= plain.len());
        for c in &over {
            assert!(c.ends_with("it."), "{c:?}");
        }
        for pair in over.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let (a_start, b_start) = (a.as_ptr() as usize, b.as_ptr() as usize);
            assert!(b_start > a_start, "no progress");
            // The next chunk starts inside the previous one, at a word.
            assert!(b_start < a_start + a.len(), "{a:?} then {b:?}");
        }
    }

    /// The toy tokenizer with whitespace as tokens of its own (as some
    /// vocabularies have for newlines).
    fn toy_ws(text: &str) -> Result<Vec<(usize, usize)>, ()> {
        let mut out = Vec::new();
        for (s, e) in toy(text)? {
            let piece = &text[s..e];
            let ws = piece.len() - piece.trim_start().len();
            if ws > 0 && ws < piece.len() {
                out.push((s, s + ws));
                out.push((s + ws, e));
            } else {
                out.push((s, e));
            }
        }
        Ok(out)
    }

    #[test]
    fn overlap_is_never_only_whitespace() {
        let text = doc().replace("\n\n", "\n");
        let count_ws = |t: &str| toy_ws(t).map(|v| v.len());
        let spans = chunk_text(&text, 40, 12, toy_ws, count_ws).unwrap();
        for pair in spans.windows(2) {
            assert!(pair[1].start < pair[0].end, "{pair:?}");
        }
    }

    #[test]
    fn no_boundaries_still_cuts_between_characters() {
        let text = "x".repeat(1000) + &"é".repeat(300) + "日本語の文章。次の文。";
        let spans = chunk_text(&text, 8, 0, toy, count).unwrap();
        let mut joined = String::new();
        for s in &spans {
            assert!(s.tokens <= 8);
            joined.push_str(&text[s.start..s.end]);
        }
        assert_eq!(joined, text);
        // The CJK full stop is a sentence end, without a space after it.
        let cjk = "文章。次";
        assert_eq!(level(cjk, "文章。".len()), 2);
        assert_eq!(level(cjk, "文".len()), 0);
        assert_eq!(level("end. Next", 4), 2);
        assert_eq!(level("end.\" Next", 6), 2);
        assert_eq!(level("end.\nNext", 4), 3);
        assert_eq!(level("e.g.x", 2), 0);
    }

    #[test]
    fn deterministic() {
        let text = doc().repeat(3);
        assert_eq!(chunks(&text, 30, 6), chunks(&text, 30, 6));
    }

    #[test]
    fn long_texts_are_segmented_at_paragraphs() {
        let text = doc().repeat(800); // ~1 MB
        let ends = segments(&text, SEGMENT_BYTES);
        assert!(ends.len() > 2);
        assert_eq!(*ends.last().unwrap(), text.len());
        for &e in &ends[..ends.len() - 1] {
            assert_eq!(level(&text, e), 4, "segment cut not at a paragraph");
        }
        // A text without any whitespace is still segmented.
        let flat = "é".repeat(SEGMENT_BYTES);
        let ends = segments(&flat, SEGMENT_BYTES);
        assert!(ends.len() >= 2 && ends.iter().all(|&e| flat.is_char_boundary(e)));
        let spans = chunk_text(&text, 200, 0, toy, count).unwrap();
        assert!(spans.iter().all(|s| s.tokens <= 200));
    }
}
