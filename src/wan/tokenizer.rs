//! The umT5 tokenizer of Wan 2.1 (spec §6.1): the prompt cleaning of the original pipeline, the
//! HF `tokenizer.json` (SentencePiece Unigram) through the `tokenizers` crate, the EOS, the
//! truncation to `text_len` (512) and the padding that the [`crate::wan::t5::T5Encoder`] expects.
//!
//! ```text
//! prompt ─ clean_text ─ tokenizer.json ─ ids ─ [..text_len−1] + EOS(1) ─ pad with 0 to text_len
//!                                                mask: 1 for real tokens incl. EOS, 0 for padding
//! ```
//!
//! ```no_run
//! use nabla::wan::tokenizer::{T5Tokenizer, DEFAULT_NEGATIVE_PROMPT};
//! # fn main() -> nabla::Result<()> {
//! let tok = T5Tokenizer::from_checkpoint_dir("Wan2.1-T2V-1.3B")?;
//! let (ids, mask, truncated) = tok.encode("A cat walks on the grass, realistic style.")?;
//! if truncated {
//!     eprintln!("warning: the prompt was cut to {} tokens", tok.text_len());
//! }
//! let (neg_ids, neg_mask, _) = tok.encode(DEFAULT_NEGATIVE_PROMPT)?;
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Id of the padding token `<pad>` (the HF UMT5 `pad_token_id`).
pub const PAD_ID: u32 = 0;

/// Id of the end-of-sequence token `</s>` (the HF UMT5 `eos_token_id`), appended to every prompt.
pub const EOS_ID: u32 = 1;

/// The fixed text length of Wan 2.1 (`text_len` in the model config): prompts are truncated and
/// padded to exactly this many tokens.
pub const DEFAULT_TEXT_LEN: usize = 512;

/// The negative prompt the original t2v pipeline uses when none is given (spec §5.2,
/// `sample_neg_prompt`), with its full-width commas (U+FF0C).
pub const DEFAULT_NEGATIVE_PROMPT: &str = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/// Where [`find_tokenizer_json`] looks for `tokenizer.json`, relative to the checkpoint
/// directory: the official Wan layout, the diffusers layout, and the directory itself.
pub const TOKENIZER_PATHS: [&str; 3] = [
    "google/umt5-xxl/tokenizer.json",
    "tokenizer/tokenizer.json",
    "tokenizer.json",
];

/// The umT5 tokenizer: a HF `tokenizer.json` plus the pipeline's cleaning, EOS, truncation and
/// padding to a fixed length.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    text_len: usize,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("path", &self.path)
            .field("text_len", &self.text_len)
            .finish()
    }
}

/// Finds `tokenizer.json` for a checkpoint: `ckpt` itself when it is a file, else the first of
/// [`TOKENIZER_PATHS`] under `ckpt` that exists. The error lists every path tried.
pub fn find_tokenizer_json(ckpt: impl AsRef<Path>) -> Result<PathBuf> {
    let ckpt = ckpt.as_ref();
    if ckpt.is_file() {
        return Ok(ckpt.to_path_buf());
    }
    if !ckpt.exists() {
        return Err(Error::file(
            ckpt,
            "does not exist; expected the Wan checkpoint directory (with google/umt5-xxl/ or \
             tokenizer/ holding tokenizer.json) or a tokenizer.json file",
        ));
    }
    let tried: Vec<PathBuf> = TOKENIZER_PATHS.iter().map(|p| ckpt.join(p)).collect();
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let spiece: Vec<String> = tried
        .iter()
        .filter_map(|p| p.parent().map(|d| d.join("spiece.model")))
        .filter(|p| p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    let hint = if spiece.is_empty() {
        "download the tokenizer files of google/umt5-xxl (tokenizer.json) into \
         <checkpoint>/google/umt5-xxl/"
            .to_string()
    } else {
        format!(
            "only the SentencePiece model {} is there; this reader needs the HF tokenizer.json \
             next to it (it comes with google/umt5-xxl, or save it once with transformers' \
             AutoTokenizer.from_pretrained(dir).save_pretrained(dir))",
            spiece.join(", ")
        )
    };
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(Error::file(
        ckpt,
        format!(
            "holds no umT5 tokenizer.json; tried {}. To fix: {hint}",
            tried.join(", ")
        ),
    ))
}

impl T5Tokenizer {
    /// Loads the tokenizer of a Wan checkpoint directory (see [`find_tokenizer_json`]) with
    /// `text_len` = [`DEFAULT_TEXT_LEN`].
    pub fn from_checkpoint_dir(ckpt: impl AsRef<Path>) -> Result<T5Tokenizer> {
        T5Tokenizer::from_file(find_tokenizer_json(ckpt)?)
    }

    /// Loads a HF `tokenizer.json` with `text_len` = [`DEFAULT_TEXT_LEN`]. Its own truncation
    /// and padding settings are ignored (this type applies the pipeline's). A tokenizer whose
    /// `<pad>` or `</s>` has another id than [`PAD_ID`] / [`EOS_ID`] is refused: it is not the
    /// umT5 tokenizer the text encoder was trained with.
    pub fn from_file(path: impl AsRef<Path>) -> Result<T5Tokenizer> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::file(
                &path,
                "does not exist; expected the HF tokenizer.json of google/umt5-xxl",
            ));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            Error::file(
                &path,
                format!(
                    "is not a valid HF tokenizer.json ({e}); expected the one of google/umt5-xxl"
                ),
            )
        })?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::file(&path, e))?;
        inner.with_padding(None);
        for (token, want) in [("<pad>", PAD_ID), ("</s>", EOS_ID)] {
            let found = inner.token_to_id(token);
            if let Some(id) = found.filter(|&id| id != want) {
                return Err(Error::file(
                    &path,
                    format!(
                        "maps {token} to id {id}, but the umT5 text encoder expects {want}; \
                         this is not the google/umt5-xxl tokenizer"
                    ),
                ));
            }
        }
        Ok(T5Tokenizer {
            inner,
            path,
            text_len: DEFAULT_TEXT_LEN,
        })
    }

    /// The same tokenizer with another fixed length (≥ 1; the released models use 512).
    pub fn with_text_len(mut self, text_len: usize) -> Result<T5Tokenizer> {
        if text_len == 0 {
            return Err(Error::Invalid(
                "text length 0: it must be at least 1 (room for the EOS token); Wan 2.1 uses 512"
                    .into(),
            ));
        }
        self.text_len = text_len;
        Ok(self)
    }

    /// The fixed length every encoding has.
    pub fn text_len(&self) -> usize {
        self.text_len
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` as given: no cleaning, no EOS, no truncation, no padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            Error::Invalid(format!(
                "tokenizing {text:?} with {} failed: {e}",
                self.path.display()
            ))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes a prompt as the original pipeline does: [`clean_text`], tokenize, keep at most
    /// `text_len − 1` tokens, append [`EOS_ID`], pad with [`PAD_ID`] to exactly `text_len`.
    ///
    /// Returns `(ids, mask, truncated)`: `ids` and `mask` have `text_len` entries, `mask` is 1 for
    /// the real tokens (EOS included) and 0 for the padding, and `truncated` says that tokens
    /// were dropped (the caller should warn: the end of the prompt has no effect).
    pub fn encode(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>, bool)> {
        let mut ids = self.tokenize(&clean_text(prompt))?;
        let keep = self.text_len - 1;
        let truncated = ids.len() > keep;
        ids.truncate(keep);
        ids.push(EOS_ID);
        let real = ids.len();
        ids.resize(self.text_len, PAD_ID);
        let mut mask = vec![1u32; real];
        mask.resize(self.text_len, 0);
        Ok((ids, mask, truncated))
    }
}

/// Whitespace as Python's `str.isspace` (and so `re`'s `\s` and `str.strip`) sees it: Rust's
/// `char::is_whitespace` plus the information separators U+001C–U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The control characters `ftfy.remove_control_chars` deletes.
fn is_ftfy_control(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

/// Removes ANSI terminal escapes `ESC [ digits-and-semicolons letter`, as
/// `ftfy.remove_terminal_escapes` does.
fn remove_terminal_escapes(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        if b[i] == 0x1b && b.get(i + 1) == Some(&b'[') {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b';') {
                j += 1;
            }
            if j < b.len() && b[j].is_ascii_alphabetic() {
                out.push_str(&s[copied..i]);
                i = j + 1;
                copied = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&s[copied..]);
    out
}

/// ftfy's `fix_latin_ligatures` table.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{132}' => "IJ",
        '\u{133}' => "ij",
        '\u{149}' => "'n", // ʼn, then uncurled
        '\u{1c4}' => "D\u{17d}",
        '\u{1c5}' => "D\u{17e}",
        '\u{1c6}' => "d\u{17e}",
        '\u{1c7}' => "LJ",
        '\u{1c8}' => "Lj",
        '\u{1c9}' => "lj",
        '\u{1ca}' => "NJ",
        '\u{1cb}' => "Nj",
        '\u{1cc}' => "nj",
        '\u{1f1}' => "DZ",
        '\u{1f2}' => "Dz",
        '\u{1f3}' => "dz",
        '\u{fb00}' => "ff",
        '\u{fb01}' => "fi",
        '\u{fb02}' => "fl",
        '\u{fb03}' => "ffi",
        '\u{fb04}' => "ffl",
        '\u{fb05}' => "\u{17f}t",
        '\u{fb06}' => "st",
        _ => return None,
    })
}

/// The prompt cleaning of the original pipeline (`whitespace_clean(basic_clean(text))`, spec
/// §6.1: `ftfy.fix_text`, `html.unescape` twice, strip, whitespace runs → one space, strip), as
/// far as it can be done without `ftfy`:
///
/// 1. HTML entities unescaped twice (Python's `html.unescape`, HTML5 rules: `&amp;`, `&lt;`,
///    `&nbsp;`, `&#39;`, `&#x4e2d;`, legacy names without `;` such as `&copy`, …);
/// 2. the character-level fixes of `ftfy.fix_text`'s defaults: ANSI terminal escapes removed
///    (`remove_terminal_escapes`), the control characters of `remove_control_chars` (U+0000–08,
///    U+000B, U+000E–1F, U+007F, U+206A–6F, U+FEFF, U+FFF9–FC) removed, Latin ligatures
///    expanded (`fix_latin_ligatures`: ﬁ → fi, …), full-width ASCII U+FF01–FF5E made ASCII
///    (`fix_character_width`: `，` → `,`), curly quotes straightened (`uncurl_quotes`:
///    U+2018–201B, U+02BC → `'`; U+201C–201F → `"`);
/// 3. every run of whitespace (Python's `\s`: Unicode whitespace and U+001C–1F, so U+00A0
///    and U+3000 too) replaced by one space, the ends stripped.
///
/// ftfy runs before the unescaping in the original, but it decodes (once-escaped) entities
/// itself first, so fixing after the unescaping gives the same result for them.
///
/// Not done: ftfy's mojibake repair (`fix_encoding` and friends, e.g. `Ã©` → `é`), C1-control
/// decoding, the NFC normalisation and the half-width katakana/Hangul forms; the last two are
/// covered by the umT5 tokenizer's own NFKC normaliser. Text with more than one level of HTML
/// escaping can keep one more level than the original. For ordinary prompts this equals the
/// original exactly.
pub fn clean_text(text: &str) -> String {
    let once = htmlize::unescape(text);
    let twice = htmlize::unescape(once.as_ref());
    let s = remove_terminal_escapes(&twice);
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if is_ftfy_control(c) {
            continue;
        }
        if is_py_space(c) {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        if let Some(l) = ligature(c) {
            out.push_str(l);
            continue;
        }
        out.push(match c {
            '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xfee0).unwrap_or(c),
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            c => c,
        });
    }
    out
}
