//! The tokenizer conformance corpus: strings on which the engine's
//! tokenizer must give, id for id, what the model's reference tokenizer
//! gives (llama.cpp's for a GGUF file, Hugging Face `tokenizers` for a
//! model directory's `tokenizer.json`).
//!
//! The corpus is built here and nowhere else: `kvembed-lab tokenize
//! --corpus` writes it for `scripts/tokenizer_goldens.py`, which records the
//! reference's ids, and the test `tokenizer_conformance` rebuilds it and
//! compares. Two parts:
//! - every sentence of the development STS sets, wrapped in one of the
//!   methods' prompt templates (taken in turn), so that the junctions
//!   between a text and its prompt (`."`, `?"`, `\n`) are covered;
//! - generated strings from a fixed seed: punctuation runs, numbers,
//!   contractions in both cases, URLs, code, emoji, combining marks, CJK,
//!   right-to-left text, special-token lookalikes, repeated whitespace and
//!   newlines, alone and in the same prompts.
//!
//! The golden files hold hashes only ([`fnv1a`] of each string and of its
//! ids), never the strings: the evaluation text is not committed.

use kvembed_core::method::{Method, Template, METHOD_NAMES};
use std::path::Path;

/// Generated strings in the corpus (the golden files are made with it).
pub const DEFAULT_SYNTHETIC: usize = 4000;

/// Every distinct prompt template of the built-in methods (document and
/// query), in a fixed order.
pub fn templates() -> Vec<Template> {
    let mut out: Vec<Template> = Vec::new();
    for name in METHOD_NAMES {
        let m = Method::from_name(name).expect("built-in method");
        // The first template of each prompt: the prompt ensembles' other
        // templates end like PromptEOL's (`: "{text}" means in one
        // word:"`), so their junction with the text is covered by it, and
        // the corpus (and its golden files) stays as it was made.
        for t in [m.document.first(), m.query.first()] {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
    }
    out
}

/// Generated strings made of the pieces that tokenizers disagree on.
pub fn synthetic(n: usize, seed: u64) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "The",
        "THE",
        "guitar",
        "stage",
        "man",
        "woman",
        "playing",
        "is",
        "a",
        "A",
        "Paris",
        "naïve",
        "café",
        "résumé",
        "über",
        "Straße",
        "jalapeño",
        "zoë",
        "état",
        "x",
        "I",
        "y'all",
    ];
    const CONTRACTIONS: &[&str] = &[
        "it's",
        "IT'S",
        "It'S",
        "isn't",
        "ISN'T",
        "we're",
        "WE'RE",
        "they've",
        "THEY'VE",
        "I'm",
        "I'M",
        "you'll",
        "YOU'LL",
        "he'd",
        "HE'D",
        "don't",
        "Don'T",
        "'s",
        "'S",
        "o'clock",
        "rock'n'roll",
    ];
    const PUNCT: &[&str] = &[
        ".", ",", "!", "?", ";", ":", "...", "?!", "!!!", "\"", "'", "(", ")", "[", "]", "{", "}",
        "-", "--", "—", "–", "…", "«", "»", "„", "“", "”", "‘", "’", "·", "/", "\\", "|", "@", "#",
        "$", "%", "^", "&", "*", "_", "=", "+", "<", ">", "~", "`", ".\"", "?\"", "!\"", ".'",
        ").", "\".", "','",
    ];
    const NUMBERS: &[&str] = &[
        "0",
        "7",
        "42",
        "1990",
        "2024",
        "12345",
        "1234567890",
        "3.14159",
        "-17",
        "+33",
        "1,000,000",
        "10%",
        "$9.99",
        "€5",
        "1st",
        "2nd",
        "3rd",
        "4th",
        "1e-5",
        "0x1F",
        "١٢٣",
        "४२",
        "½",
        "²",
        "Ⅻ",
    ];
    const URLS: &[&str] = &[
        "https://example.com/a/b?c=1&d=2#frag",
        "http://www.example.org/index.html",
        "ftp://files.example.net/pub/file.tar.gz",
        "user.name+tag@example.co.uk",
        "www.example.com",
        "C:\\Program Files\\app.exe",
        "/usr/local/bin/kvembed",
    ];
    const CODE: &[&str] = &[
        "fn main() { println!(\"hi\"); }",
        "def f(x):\n    return x ** 2",
        "SELECT kv_embed(body) FROM docs WHERE id = 42;",
        "if (a && b || !c) { x += 1; }",
        "for i in range(10):\n\tprint(i)",
        "<div class=\"a\">text</div>",
        "{\"key\": [1, 2, 3], \"null\": null}",
        "x->y = *p; a[i] != b[j];",
        "#include <stdio.h>",
        "let s = `template ${x}`;",
    ];
    const SCRIPTS: &[&str] = &[
        "東京は日本の首都です。",
        "我喜欢吃苹果",
        "한국어 문장입니다",
        "こんにちは、世界！",
        "مرحبا بالعالم",
        "שלום עולם",
        "Привет, мир!",
        "Γειά σου Κόσμε",
        "नमस्ते दुनिया",
        "สวัสดีครับ",
        "ﷺ",
        "e\u{301}",
        "a\u{308}\u{323}",
        "\u{1100}\u{1161}\u{11a8}",
        "Å",
        "ﬁ",
        "ℌ",
        "Ⓐ",
        "ｆｕｌｌ",
        "\u{200b}",
        "\u{200d}",
        "\u{feff}",
        "\u{00a0}",
        "\u{202e}abc",
        "\u{2028}",
    ];
    const EMOJI: &[&str] = &[
        "😀",
        "👍🏽",
        "👨‍👩‍👧‍👦",
        "🇫🇷",
        "❤️",
        "🎸",
        "✨✨",
        "🤖",
        "☕",
        "🏳️‍🌈",
        "1️⃣",
    ];
    const SPECIAL: &[&str] = &[
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<s>",
        "</s>",
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<|fim_prefix|>",
        "<tool_call>",
        "[INST]",
        "<mask>",
    ];
    const SPACE: &[&str] = &[
        " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\n\n\n", "    ", "\t\t", " \t\n",
    ];
    let classes: [&[&str]; 9] = [
        WORDS,
        CONTRACTIONS,
        PUNCT,
        NUMBERS,
        URLS,
        CODE,
        SCRIPTS,
        EMOJI,
        SPECIAL,
    ];
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = String::new();
        // Mostly one class with words and spaces around it, sometimes a mix.
        let focus = classes[i % classes.len()];
        let parts = 1 + rng.below(8);
        for p in 0..parts {
            if p > 0 || rng.below(4) == 0 {
                s.push_str(if rng.below(5) == 0 {
                    rng.pick(SPACE)
                } else {
                    " "
                });
            }
            let class = if rng.below(3) == 0 {
                classes[rng.below(classes.len())]
            } else {
                focus
            };
            s.push_str(rng.pick(class));
            if rng.below(3) == 0 {
                // Glued punctuation, as at the end of a sentence.
                s.push_str(rng.pick(PUNCT));
            }
        }
        if rng.below(6) == 0 {
            s.push_str(rng.pick(SPACE));
        }
        out.push(s);
    }
    out
}

/// The whole corpus: `sentences` (the development STS sentences, or none)
/// each in one prompt template, in turn; then `n_synthetic` generated
/// strings, alone and in the templates in turn.
pub fn corpus(sentences: &[String], n_synthetic: usize) -> Vec<String> {
    let templates = templates();
    let mut out: Vec<String> = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        out.push(templates[i % templates.len()].render(s));
    }
    for (i, s) in synthetic(n_synthetic, 0x6b76_656d_6265_64)
        .into_iter()
        .enumerate()
    {
        if i % 2 == 0 {
            out.push(templates[(i / 2) % templates.len()].render(&s));
        }
        out.push(s);
    }
    out
}

/// The distinct sentences of the STS sets under `root` (as
/// [`crate::eval::load_sts_root`] reads them), in their order of appearance.
pub fn sts_sentences(root: &Path) -> std::io::Result<Vec<String>> {
    let sets = crate::eval::load_sts_root(root)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in sets.iter().flat_map(|s| &s.pairs) {
        for s in [&p.a, &p.b] {
            if seen.insert(s.as_str()) {
                out.push(s.clone());
            }
        }
    }
    Ok(out)
}

/// 64-bit FNV-1a, the golden files' hash (the same in the Python script).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The hash of a token id sequence: [`fnv1a`] of the ids as little-endian
/// 32-bit integers.
pub fn ids_hash(ids: &[u32]) -> u64 {
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    fnv1a(&bytes)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_reference_values() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn the_corpus_is_fixed_and_covers_every_template() {
        let a = corpus(&["One.".into(), "Two?".into()], 200);
        assert_eq!(a, corpus(&["One.".into(), "Two?".into()], 200));
        assert_eq!(a.len(), 2 + 200 + 100);
        for t in templates() {
            assert!(a
                .iter()
                .any(|s| s.starts_with(&t.pieces[0]) && s.ends_with(t.pieces.last().unwrap())));
        }
    }
}
