//! The umT5 tokenizer wrapper: a tiny SentencePiece-Unigram `tokenizer.json` built here (the
//! layout HF writes for T5: Metaspace pre-tokenizer, Unigram model, `</s>` post-processor), then
//! ids, EOS, padding, truncation, the prompt cleaning and the checkpoint search paths.

use nabla::wan::tokenizer::{
    DEFAULT_NEGATIVE_PROMPT, DEFAULT_TEXT_LEN, EOS_ID, PAD_ID, T5Tokenizer, clean_text,
    find_tokenizer_json,
};
use serde_json::json;
use std::path::{Path, PathBuf};

fn tmp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("tokenizer_tests")
        .join(format!("{}_{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The pieces of the tiny vocabulary, in id order, with their log-probabilities.
const PIECES: &[(&str, f64)] = &[
    ("<pad>", 0.0),
    ("</s>", 0.0),
    ("<unk>", 0.0),
    ("▁", -2.0),
    ("▁a", -3.0),
    ("▁cat", -3.0),
    ("▁dog", -3.0),
    ("▁&", -4.0),
    ("▁<", -4.0),
    ("▁\"", -4.0),
    ("\"", -4.0),
    ("'", -4.0),
    (",", -4.0),
    ("s", -6.0),
    ("c", -6.0),
    ("a", -6.0),
    ("t", -6.0),
    ("▁runs", -3.5),
];

fn id(piece: &str) -> u32 {
    PIECES.iter().position(|(p, _)| *p == piece).unwrap() as u32
}

fn tokenizer_json(pieces: &[(&str, f64)]) -> serde_json::Value {
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst",
                       "stride": 0},
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                          "split": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                    "split": true},
        "model": {"type": "Unigram", "unk_id": 2, "byte_fallback": false,
                  "vocab": pieces.iter().map(|(p, s)| json!([p, s])).collect::<Vec<_>>()}
    })
}

fn write_tokenizer(dir: &Path, pieces: &[(&str, f64)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("tokenizer.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&tokenizer_json(pieces)).unwrap(),
    )
    .unwrap();
    p
}

fn tiny(tag: &str) -> T5Tokenizer {
    let dir = tmp_dir(tag);
    T5Tokenizer::from_file(write_tokenizer(&dir, PIECES)).unwrap()
}

#[test]
fn ids_eos_and_padding() {
    let tok = tiny("ids").with_text_len(8).unwrap();
    assert_eq!(tok.text_len(), 8);
    let (ids, mask, truncated) = tok.encode("a cat runs").unwrap();
    let want = [id("▁a"), id("▁cat"), id("▁runs"), EOS_ID, 0, 0, 0, 0];
    assert_eq!(ids, want);
    assert_eq!(mask, [1, 1, 1, 1, 0, 0, 0, 0]);
    assert!(!truncated);
    assert_eq!(EOS_ID, 1);
    assert_eq!(PAD_ID, 0);
    // the raw pieces: the unigram prefers whole words over characters
    assert_eq!(tok.tokenize("a cat").unwrap(), [id("▁a"), id("▁cat")]);
    assert_eq!(tok.tokenize("cats").unwrap(), [id("▁cat"), id("s")]);
    assert_eq!(
        tok.tokenize("tacs").unwrap(),
        [id("▁"), id("t"), id("a"), id("c"), id("s")]
    );
    // an empty prompt is the EOS alone
    let (ids, mask, truncated) = tok.encode("").unwrap();
    assert_eq!(ids, [EOS_ID, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(mask, [1, 0, 0, 0, 0, 0, 0, 0]);
    assert!(!truncated);
    // the default length is 512, whatever tokenizer.json says about truncation
    let tok = tiny("ids512");
    let (ids, mask, truncated) = tok.encode("a cat runs a dog").unwrap();
    assert_eq!(DEFAULT_TEXT_LEN, 512);
    assert_eq!((ids.len(), mask.len()), (512, 512));
    assert_eq!(&ids[..6], [4, 5, 17, 4, 6, EOS_ID]);
    assert!(ids[6..].iter().all(|&i| i == PAD_ID));
    assert_eq!(mask.iter().sum::<u32>(), 6);
    assert!(!truncated);
}

#[test]
fn truncation_keeps_room_for_eos_and_reports_it() {
    let tok = tiny("trunc").with_text_len(3).unwrap();
    // exactly fits: 2 tokens + EOS
    let (ids, mask, truncated) = tok.encode("a cat").unwrap();
    assert_eq!(ids, [id("▁a"), id("▁cat"), EOS_ID]);
    assert_eq!(mask, [1, 1, 1]);
    assert!(!truncated);
    // one token too many: cut before the EOS, which is always last
    let (ids, mask, truncated) = tok.encode("a cat runs").unwrap();
    assert_eq!(ids, [id("▁a"), id("▁cat"), EOS_ID]);
    assert_eq!(mask, [1, 1, 1]);
    assert!(truncated);
    // length 1: only the EOS fits
    let tok = tok.with_text_len(1).unwrap();
    let (ids, mask, truncated) = tok.encode("dog").unwrap();
    assert_eq!((ids, mask, truncated), (vec![EOS_ID], vec![1], true));
    let e = tok.with_text_len(0).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    // 600 words at the default 512
    let tok = tiny("trunc512");
    let long = "a cat ".repeat(300);
    let (ids, mask, truncated) = tok.encode(&long).unwrap();
    assert!(truncated);
    assert_eq!(ids.len(), 512);
    assert_eq!(ids[511], EOS_ID);
    assert_eq!(ids[510], id("▁a"));
    assert_eq!(ids[509], id("▁cat"));
    assert!(mask.iter().all(|&m| m == 1));
}

#[test]
fn cleaning_html_and_whitespace() {
    let tok = tiny("clean").with_text_len(8).unwrap();
    let plain = tok.encode("a cat").unwrap();
    for messy in [
        "  a   cat  ",
        "\ta\n\ncat\r\n",
        "a&nbsp;cat",
        "a&#160;cat",
        "a&amp;nbsp;cat",
        "a\u{3000}cat",
        "\u{feff}a cat\u{7}",
    ] {
        assert_eq!(tok.encode(messy).unwrap(), plain, "{messy:?}");
    }
    // entities unescaped twice: &amp;amp; → & (not &amp;), &amp;lt; → <
    assert_eq!(
        tok.encode("a &amp;amp; cat &amp;lt; dog").unwrap().0[..6],
        [id("▁a"), id("▁&"), id("▁cat"), id("▁<"), id("▁dog"), EOS_ID]
    );
    // curly quotes are straightened and full-width commas made ASCII, as ftfy does
    assert_eq!(
        tok.encode("“a”，cat").unwrap().0[..6],
        [id("▁\""), id("a"), id("\""), id(","), id("c"), id("a")]
    );
}

#[test]
fn clean_text_matches_the_reference() {
    // expected values: the original pipeline's cleaning (ftfy 6.3.1 `fix_text`,
    // `html.unescape` twice, strip, `re.sub(r"\s+", " ")`, strip) run on these inputs
    let cases: &[(&str, &str)] = &[
        (
            "  A cat\t walks \n\n on   the grass.  ",
            "A cat walks on the grass.",
        ),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),
        ("1 &lt; 2 &gt; 0", "1 < 2 > 0"),
        ("caf&eacute; &#233; &#x4e2d;&#25991;", "café é 中文"),
        ("non&nbsp;breaking&#160;space", "non breaking space"),
        (
            "\u{201c}quoted\u{201d} and \u{2018}single\u{2019}",
            "\"quoted\" and 'single'",
        ),
        ("don\u{2bc}t", "don't"),
        ("ideographic\u{3000}space", "ideographic space"),
        ("\u{1b}[31mred\u{1b}[0m text", "red text"),
        ("bell\u{7} and\u{b}vt and \u{feff}bom", "bell andvt and bom"),
        ("a\u{1c}b\u{1f}c", "abc"),
        ("&ampnot; &copy 2024", "¬ © 2024"),
        ("&unknown; stays", "&unknown; stays"),
        ("", ""),
        ("   ", ""),
        ("line\r\nbreak\u{2028}sep", "line break sep"),
        ("色调，过曝", "色调,过曝"),
        ("\u{fb01}ne \u{fb02}ower", "fine flower"),
        ("\u{149}", "'n"),
        ("ＡＢＣ！", "ABC!"),
        ("\u{201c}&amp;\u{201d}", "\"&\""),
        ("&ldquo;hi&rdquo;", "\"hi\""),
        ("a\u{a0}\u{a0}b", "a b"),
        ("tab\tand\u{2003}em", "tab and em"),
    ];
    for (input, want) in cases {
        assert_eq!(clean_text(input), *want, "{input:?}");
    }
}

#[test]
fn default_negative_prompt() {
    let p = DEFAULT_NEGATIVE_PROMPT;
    assert_eq!(p.chars().count(), 137);
    assert_eq!(p.matches('\u{ff0c}').count(), 27);
    assert!(!p.contains(','));
    assert!(p.starts_with("色调艳丽，过曝，静态，"));
    assert!(p.ends_with("，背景人很多，倒着走"));
    assert!(p.contains("，JPEG压缩残留，"));
    // cleaning turns the full-width commas into ASCII ones, as ftfy does in the original
    let c = clean_text(p);
    assert_eq!(c.matches(',').count(), 27);
    assert_eq!(c.chars().count(), 137);
}

#[test]
fn finds_tokenizer_json_in_both_layouts() {
    // official: <ckpt>/google/umt5-xxl/tokenizer.json
    let ckpt = tmp_dir("official");
    let want = write_tokenizer(&ckpt.join("google/umt5-xxl"), PIECES);
    assert_eq!(find_tokenizer_json(&ckpt).unwrap(), want);
    let tok = T5Tokenizer::from_checkpoint_dir(&ckpt).unwrap();
    assert_eq!(tok.path(), want);
    // diffusers: <ckpt>/tokenizer/tokenizer.json
    let ckpt = tmp_dir("diffusers");
    let want = write_tokenizer(&ckpt.join("tokenizer"), PIECES);
    assert_eq!(find_tokenizer_json(&ckpt).unwrap(), want);
    // the file itself
    assert_eq!(find_tokenizer_json(&want).unwrap(), want);
    // missing: the error names every path tried
    let ckpt = tmp_dir("missing");
    let e = T5Tokenizer::from_checkpoint_dir(&ckpt)
        .unwrap_err()
        .to_string();
    for p in ["google/umt5-xxl/tokenizer.json", "tokenizer/tokenizer.json"] {
        assert!(e.contains(&ckpt.join(p).display().to_string()), "{e}");
    }
    // only spiece.model: say that tokenizer.json is needed
    std::fs::create_dir_all(ckpt.join("google/umt5-xxl")).unwrap();
    std::fs::write(ckpt.join("google/umt5-xxl/spiece.model"), b"x").unwrap();
    let e = find_tokenizer_json(&ckpt).unwrap_err().to_string();
    assert!(
        e.contains("spiece.model") && e.contains("tokenizer.json"),
        "{e}"
    );
    // a checkpoint directory that does not exist
    let e = find_tokenizer_json(ckpt.join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn bad_tokenizer_files() {
    let dir = tmp_dir("bad");
    // not JSON
    let p = dir.join("garbage.json");
    std::fs::write(&p, "{ not json").unwrap();
    let e = T5Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("garbage.json") && e.contains("tokenizer.json"),
        "{e}"
    );
    // </s> at another id: not the umT5 tokenizer
    let mut swapped = PIECES.to_vec();
    swapped.swap(1, 3);
    let mut j = tokenizer_json(&swapped);
    j["added_tokens"][1]["id"] = json!(3);
    j["post_processor"]["special_tokens"]["</s>"]["ids"] = json!([3]);
    let p = dir.join("swapped.json");
    std::fs::write(&p, j.to_string()).unwrap();
    let e = T5Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("</s>") && e.contains("id 3"), "{e}");
    // a missing file
    let e = T5Tokenizer::from_file(dir.join("none.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}
