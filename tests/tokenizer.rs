//! Tokenizer parity with the Hugging Face stack: for every awkward string in
//! tests/fixtures/tokenizer/reference.json (made by scripts/make_tokenizer_fixtures.py), our ids
//! and decodes equal those of `transformers`, for
//! - two tiny tokenizer.json files committed beside it (byte-level and SentencePiece-style BPE),
//!   which need nothing fetched;
//! - GPT-2 built from its original encoder.json + vocab.bpe, and SmolLM2's vocabulary read from
//!   its GGUF file: these need scripts/fetch-assets.sh, and are skipped with a message when the
//!   files are absent, unless TINYTUNE_REQUIRE_ASSETS=1, where a missing file fails the test.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use tinytune::io::{ChatTemplate, Tokenizer};
use tinytune::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Every reference case: ids with and without special tokens, both decodes, the round trip, the
/// special tokens and the vocabulary size.
fn check_against(tok: &Tokenizer, name: &str) {
    let r = &reference()[name];
    assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap(), "{name}: vocab size");
    let special = |s: Option<&tinytune::io::SpecialToken>| s.map(|t| (t.token.clone(), t.id));
    for (field, got) in [("bos", special(tok.bos())), ("eos", special(tok.eos())), ("pad", special(tok.pad())), ("unk", special(tok.unk()))]
    {
        let want = &r["special"][field];
        let want = (!want.is_null()).then(|| (want["token"].as_str().unwrap().to_string(), want["id"].as_u64().unwrap() as u32));
        assert_eq!(got, want, "{name}: {field} token");
    }
    let want_added: Vec<(u32, String, bool)> = r["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap() as u32, t["content"].as_str().unwrap().to_string(), t["special"].as_bool().unwrap()))
        .collect();
    assert_eq!(tok.added_tokens(), want_added, "{name}: added tokens");

    let mut failures = Vec::new();
    for case in r["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let with = tok.encode(text, true).unwrap();
        let without = tok.encode(text, false).unwrap();
        if with != ids(&case["ids"]) {
            failures.push(format!("{text:?}: ids {with:?}, transformers {:?}", ids(&case["ids"])));
        }
        if without != ids(&case["ids_no_special"]) {
            failures.push(format!("{text:?}: ids without special tokens {without:?}, transformers {:?}", ids(&case["ids_no_special"])));
        }
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special")] {
            let got = tok.decode(&with, skip).unwrap();
            let want = case[key].as_str().unwrap();
            if got != want {
                failures.push(format!("{text:?}: decode(skip_special={skip}) {got:?}, transformers {want:?}"));
            }
            // Where transformers round-trips, so do we.
            if want == text {
                assert_eq!(got, text, "{name}: round trip");
            }
        }
    }
    assert!(failures.is_empty(), "{name}: {} mismatches with transformers:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn tiny_bytelevel_tokenizer_json_matches_transformers() {
    let tok = Tokenizer::from_hf_json(fixtures().join("tiny-bytelevel.json")).unwrap();
    // No tokenizer_config.json beside it: special-token names are set as the reference set them.
    let tok = with_names(tok);
    check_against(&tok, "tiny_bytelevel");
    // The added special tokens are matched whole inside text, also next to other characters.
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let ids = tok.encode("x<|im_start|>y", false).unwrap();
    assert!(ids.contains(&im_start) && ids.len() == 3, "{ids:?}");
}

/// The tiny byte-level fixture has no config file; give it the names the reference used.
fn with_names(tok: Tokenizer) -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("tinytune-tok-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("tiny-bytelevel.json"), dir.join("tokenizer.json")).unwrap();
    let config = r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"}"#;
    std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
    let named = Tokenizer::from_hf_json(dir.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(named.vocab_size(), tok.vocab_size());
    assert!(tok.bos().is_none(), "no config beside the file, so no names");
    // The file's own template, with the special tokens it names.
    match named.chat_template() {
        ChatTemplate::Jinja { source, special, .. } => {
            assert!(source.starts_with("{% for message in messages %}"), "{source}");
            assert!(special.contains(&("bos_token".to_string(), "<|im_start|>".to_string())), "{special:?}");
        }
        other => panic!("expected the file's Jinja template, got {other:?}"),
    }
    named
}

#[test]
fn sentencepiece_gguf_vocabulary_matches_transformers() {
    // A LLaMA-family GGUF vocabulary (tokenizer.ggml.model = "llama"): tokens, scores and
    // types but no merges (recovered from the scores), byte fallback, a user-defined token,
    // add_space_prefix, BOS added. Trained by the sentencepiece library.
    let tok = Tokenizer::from_gguf(fixtures().join("tiny-sentencepiece.gguf")).unwrap();
    check_against(&tok, "tiny_sentencepiece_gguf");
    let tool = tok.token_to_id("<tool>").unwrap();
    assert!(tok.encode("x<tool>y", false).unwrap().contains(&tool), "a user-defined token is matched whole");
}

#[test]
fn tiny_sentencepiece_tokenizer_json_matches_transformers() {
    // Llama 2 style: "▁" for spaces, byte fallback, BOS added by the post-processor; the names
    // come from tiny-sentencepiece_config.json beside it.
    let tok = Tokenizer::from_hf_json(fixtures().join("tiny-sentencepiece.json")).unwrap();
    check_against(&tok, "tiny_sentencepiece");
    assert_eq!(tok.encode("Hello", true).unwrap()[0], tok.bos_id().unwrap());
    // A chat template that writes BOS itself: the conversation's ids hold it once, as
    // transformers' apply_chat_template(tokenize=True) gives them (the post-processor does not
    // add a second); the ChatML fallback, which writes none, gets the tokenizer's.
    let bos = tok.bos().unwrap().token.clone();
    let mut chat = tok.clone();
    chat.set_chat_template(ChatTemplate::Jinja {
        source: "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}".into(),
        origin: "test".into(),
        special: vec![("bos_token".into(), bos)],
    });
    let ids = chat.encode_chat(&[("user", "Hello")], true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == tok.bos_id().unwrap()).count(), 1, "{ids:?}");
    assert_eq!(ids[0], tok.bos_id().unwrap());
    let mut chatml = tok.clone();
    chatml.set_chat_template(ChatTemplate::ChatMl { default_system: None });
    assert_eq!(chatml.encode_chat(&[("user", "Hello")], true).unwrap()[0], tok.bos_id().unwrap());
}

#[test]
fn gpt2_from_original_files_matches_transformers() {
    let (Some(enc), Some(bpe)) = (common::asset("gpt2/encoder.json"), common::asset("gpt2/vocab.bpe")) else { return };
    let tok = Tokenizer::from_gpt2_files(enc, bpe).unwrap();
    check_against(&tok, "gpt2");
    assert_eq!(tok.encode("Hello world", true).unwrap(), [15496, 995]);
}

#[test]
fn smollm2_from_gguf_matches_transformers() {
    let Some(path) = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let tok = Tokenizer::from_gguf(&path).unwrap();
    check_against(&tok, "smollm2");
    // No BOS is added for SmolLM2, as transformers does.
    assert_eq!(tok.encode("Hi", true).unwrap(), tok.encode("Hi", false).unwrap());
    let r = &reference()["smollm2"];
    assert_eq!(tok.chat_template_source(), r["chat_template"].as_str());
    for chat in r["chats"].as_array().unwrap() {
        let msgs: Vec<(&str, &str)> =
            chat["messages"].as_array().unwrap().iter().map(|m| (m[0].as_str().unwrap(), m[1].as_str().unwrap())).collect();
        let gen = chat["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(tok.apply_chat_template(&msgs, gen).unwrap(), chat["rendered"].as_str().unwrap(), "chat {msgs:?}");
    }
}

/// Chat templates rendered byte for byte as transformers renders them
/// (`scripts/make_chat_fixtures.py`: SmolLM2's own template, a Gemma-style and a Llama-3-style
/// one with whitespace control, namespaces, loop controls, Python string methods, `tojson` and
/// `raise_exception`), for a system message, multi-turn and assistant-last conversations, with
/// and without the generation prompt; a conversation a template refuses is an error with the
/// template's own message; a template that does not compile names where it came from and the
/// line.
#[test]
fn jinja_chat_templates_render_as_transformers_renders_them() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/templates.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let conversations = &fixture["conversations"];
    for t in fixture["templates"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let special: Vec<(String, String)> =
            t["special"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        let chat = ChatTemplate::Jinja { source: t["template"].as_str().unwrap().to_string(), origin: name.to_string(), special };
        for case in t["cases"].as_array().unwrap() {
            let conv = case["conversation"].as_str().unwrap();
            let msgs: Vec<(&str, &str)> = conversations[conv]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = chat.render(&msgs, gen);
            match case["text"].as_str() {
                Some(want) => assert_eq!(got.unwrap(), want, "{name} / {conv} / generation prompt {gen}"),
                None => {
                    let e = got.unwrap_err().to_string();
                    let want = case["error"].as_str().unwrap();
                    assert!(e.contains(want) && e.contains(name), "{name} / {conv}: {e} (transformers: {want})");
                }
            }
        }
    }
    // SmolLM2's template from its GGUF file through the tokenizer equals the fixture's.
    if let Some(p) = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf") {
        let tok = Tokenizer::from_gguf(&p).unwrap();
        let smol = &fixture["templates"][0];
        assert_eq!(tok.chat_template_source(), smol["template"].as_str());
        let case = &smol["cases"][1];
        assert_eq!(tok.apply_chat_template(&[("user", "Hi there!")], true).unwrap(), case["text"].as_str().unwrap());
    }
    // A template that does not compile: the origin, the line and its text.
    let broken = ChatTemplate::Jinja {
        source: "{% for m in messages %}\n{{ m['content'] }}\n{% if %}\n{% endfor %}".into(),
        origin: "model/tokenizer_config.json: chat template".into(),
        special: vec![],
    };
    let e = broken.render(&[("user", "x")], false).unwrap_err().to_string();
    assert!(e.contains("model/tokenizer_config.json: chat template") && e.contains("line 3") && e.contains("{% if %}"), "{e}");
    // A model without a template renders ChatML.
    let chatml = ChatTemplate::ChatMl { default_system: None };
    assert_eq!(chatml.render(&[("user", "Hi")], true).unwrap(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tinytune-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn assert_format_naming(r: Result<Tokenizer, Error>, path: &Path, what: &str) {
    match r {
        Err(Error::Format { path: p, msg }) => {
            assert_eq!(p, path.display().to_string());
            assert!(msg.contains(what), "message {msg:?} should mention {what:?}");
        }
        other => panic!("expected a format error naming {}, got {other:?}", path.display()),
    }
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    // tokenizer.json: not JSON, truncated, an unknown model type.
    let p = tmp("garbage.json", b"not json at all");
    assert_format_naming(Tokenizer::from_hf_json(&p), &p, "tokenizer.json");
    let good = std::fs::read(fixtures().join("tiny-bytelevel.json")).unwrap();
    let p = tmp("truncated.json", &good[..good.len() / 2]);
    assert_format_naming(Tokenizer::from_hf_json(&p), &p, "tokenizer.json");
    let text = String::from_utf8(good.clone()).unwrap().replacen("\"type\":\"BPE\"", "\"type\":\"NoSuchModel\"", 1);
    let p = tmp("unknown-model.json", text.as_bytes());
    assert_format_naming(Tokenizer::from_hf_json(&p), &p, "tokenizer.json");
    // A missing file is an I/O error naming it.
    let missing = fixtures().join("no-such-tokenizer.json");
    assert!(matches!(Tokenizer::from_hf_json(&missing), Err(Error::Io { path, .. }) if path == missing.display().to_string()));
    // A tokenizer_config.json naming a token that is not in the vocabulary.
    let dir = std::env::temp_dir().join(format!("tinytune-tok-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), &good).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), br#"{"bos_token": "<nope>"}"#).unwrap();
    assert_format_naming(Tokenizer::from_hf_json(dir.join("tokenizer.json")), &dir.join("tokenizer.json"), "bos_token");
    std::fs::write(dir.join("tokenizer_config.json"), b"{broken").unwrap();
    assert_format_naming(Tokenizer::from_hf_json(dir.join("tokenizer.json")), &dir.join("tokenizer_config.json"), "JSON");

    // GPT-2 files: an encoder.json that is not a map of ids, a merges line that is not a pair,
    // a merge of tokens the vocabulary lacks, no <|endoftext|>.
    let enc = tmp("encoder.json", br#"{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}"#);
    let bpe = tmp("vocab.bpe", b"#version: 0.2\na b\n");
    let tok = Tokenizer::from_gpt2_files(&enc, &bpe).unwrap();
    assert_eq!(tok.encode("ab<|endoftext|>", false).unwrap(), [2, 3]);
    let bad_enc = tmp("bad-encoder.json", br#"{"a": "zero"}"#);
    assert_format_naming(Tokenizer::from_gpt2_files(&bad_enc, &bpe), &bad_enc, "token");
    let bad_bpe = tmp("bad-vocab.bpe", b"#version: 0.2\na b c\n");
    assert_format_naming(Tokenizer::from_gpt2_files(&enc, &bad_bpe), &bad_bpe, "line 2");
    let oov_bpe = tmp("oov-vocab.bpe", b"#version: 0.2\na z\n");
    assert_format_naming(Tokenizer::from_gpt2_files(&enc, &oov_bpe), &oov_bpe, "BPE");
    let no_eot = tmp("no-eot.json", br#"{"a": 0, "b": 1, "ab": 2}"#);
    assert_format_naming(Tokenizer::from_gpt2_files(&no_eot, &bpe), &no_eot, "<|endoftext|>");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(enc.parent().unwrap()).ok();
}

#[test]
fn bad_gguf_vocabularies_give_errors_naming_the_field() {
    use tinytune::io::GgufTokenizer;
    let path = Path::new("model.gguf");
    let good = GgufTokenizer {
        model: "gpt2".into(),
        tokens: ["a", "b", "ab", "<|endoftext|>"].map(String::from).to_vec(),
        token_types: Some(vec![1, 1, 1, 3]),
        merges: vec!["a b".into()],
        bos_id: Some(3),
        eos_id: Some(3),
        ..Default::default()
    };
    let tok = Tokenizer::from_gguf_tokenizer(&good, path).unwrap();
    assert_eq!(tok.encode("abab<|endoftext|>", true).unwrap(), [2, 2, 3]);
    assert_eq!(tok.special_ids(), [3]);
    let with_bos = GgufTokenizer { add_bos: Some(true), ..good.clone() };
    assert_eq!(Tokenizer::from_gguf_tokenizer(&with_bos, path).unwrap().encode("ab", true).unwrap(), [3, 2]);

    let sp = GgufTokenizer { model: "bert".into(), ..good.clone() };
    assert_format_naming(Tokenizer::from_gguf_tokenizer(&sp, path), path, "tokenizer.ggml.model");
    let bos = GgufTokenizer { bos_id: Some(99), ..good.clone() };
    assert_format_naming(Tokenizer::from_gguf_tokenizer(&bos, path), path, "tokenizer.ggml.bos_token_id");
    let pad = GgufTokenizer { pad_id: Some(4), ..good.clone() };
    assert_format_naming(Tokenizer::from_gguf_tokenizer(&pad, path), path, "tokenizer.ggml.padding_token_id");
    let merge = GgufTokenizer { merges: vec!["ab".into()], ..good.clone() };
    assert_format_naming(Tokenizer::from_gguf_tokenizer(&merge, path), path, "tokenizer.ggml.merges[0]");
    let oov = GgufTokenizer { merges: vec!["a q".into()], ..good };
    assert_format_naming(Tokenizer::from_gguf_tokenizer(&oov, path), path, "BPE");
}

#[test]
fn ids_out_of_range_are_errors() {
    let tok = Tokenizer::from_hf_json(fixtures().join("tiny-bytelevel.json")).unwrap();
    let n = tok.vocab_size() as u32;
    assert!(tok.decode(&[0, n - 1], false).is_ok());
    for bad in [n, u32::MAX] {
        match tok.decode(&[5, bad], false) {
            Err(Error::InvalidArgument { msg, .. }) => assert!(msg.contains(&bad.to_string()), "{msg}"),
            other => panic!("decode of id {bad}: expected InvalidArgument, got {other:?}"),
        }
    }
    assert_eq!(tok.encode("", true).unwrap(), Vec::<u32>::new());
    assert_eq!(tok.decode(&[], true).unwrap(), "");
}

/// Random byte edits of a valid tokenizer.json give an error or a tokenizer that encodes and
/// decodes without panicking (a deterministic xorshift, so a failure reproduces).
#[test]
fn corrupted_tokenizer_json_never_panics() {
    let good = std::fs::read(fixtures().join("tiny-bytelevel.json")).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut parsed = 0;
    for _ in 0..1500 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = b"0123456789{}[]\":,-ab\\ "[(next() % 22) as usize];
        }
        let r = std::panic::catch_unwind(|| {
            if let Ok(tok) = Tokenizer::from_hf_json_bytes(&bytes, "corrupt.json") {
                let ids = tok.encode("Hello world <|im_start|> 123 😀", true).unwrap_or_default();
                let _ = tok.decode(&ids, false);
                let _ = tok.decode(&[0, 1, 2, 500, u32::MAX], true);
                return true;
            }
            false
        });
        match r {
            Ok(ok) => parsed += ok as usize,
            Err(_) => panic!("panic on a corrupted tokenizer.json:\n{}", String::from_utf8_lossy(&bytes)),
        }
    }
    assert!(parsed > 0, "no corrupted file parsed at all; the test is not testing encode/decode");
}

#[test]
fn lossy_decoding_drops_ids_outside_the_vocabulary() {
    let tok = Tokenizer::from_hf_json(fixtures().join("tiny-bytelevel.json")).unwrap();
    let ids = tok.encode("hello", false).unwrap();
    let beyond = tok.vocab_size() as u32 + 3;
    assert!(tok.decode(&[ids.clone(), vec![beyond]].concat(), true).is_err());
    let mut with_pad = ids.clone();
    with_pad.insert(1, beyond);
    assert_eq!(tok.decode_lossy(&with_pad, true).unwrap(), tok.decode(&ids, true).unwrap());
}

#[test]
fn chat_template_jinja_beside_the_tokenizer_is_the_template() {
    // transformers ≥ 4.43 saves the template as chat_template.jinja and prefers it to the
    // config's chat_template key.
    let dir = std::env::temp_dir().join(format!("tinytune-tok-jinja-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("tiny-bytelevel.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>", "chat_template": "from the config"}"#).unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::from_hf_json(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.apply_chat_template(&[("user", "Hi")], false).unwrap(), "[user] Hi<|im_end|>");
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    let tok = Tokenizer::from_hf_json(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.apply_chat_template(&[("user", "Hi")], false).unwrap(), "from the config");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_vocabularies_whose_sizes_disagree_are_errors_naming_the_field() {
    use tinytune::io::gguf_write::GgufWriter;
    use tinytune::io::GgufValue;
    let dir = std::env::temp_dir().join(format!("tinytune-tok-sizes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = GgufValue::Array(["<unk>", "<s>", "▁a"].iter().map(|t| GgufValue::String(t.to_string())).collect());
    for (key, value) in [
        ("tokenizer.ggml.scores", GgufValue::Array(vec![GgufValue::F32(0.0); 2])),
        ("tokenizer.ggml.token_type", GgufValue::Array(vec![GgufValue::I32(1); 4])),
    ] {
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama");
        w.set_str("tokenizer.ggml.model", "llama");
        w.set("tokenizer.ggml.tokens", tokens.clone());
        w.set(key, value);
        let p = dir.join("vocab.gguf");
        w.write(&p).unwrap();
        let msg = Tokenizer::from_gguf(&p).err().unwrap_or_else(|| panic!("{key}: accepted")).to_string();
        assert!(msg.contains("vocab.gguf") && msg.contains(key) && msg.contains("3 tokens"), "{key}: {msg}");
    }
    // A token id past the vocabulary.
    let mut w = GgufWriter::new();
    w.set_str("tokenizer.ggml.model", "llama");
    w.set("tokenizer.ggml.tokens", tokens);
    w.set("tokenizer.ggml.bos_token_id", GgufValue::U32(7));
    let p = dir.join("vocab.gguf");
    w.write(&p).unwrap();
    let msg = Tokenizer::from_gguf(&p).err().unwrap().to_string();
    assert!(msg.contains("tokenizer.ggml.bos_token_id") && msg.contains("outside the vocabulary"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}
