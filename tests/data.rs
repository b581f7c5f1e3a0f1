//! Training data from JSONL (src/train/data.rs): each format against the tokenizer's own encoding
//! of its pieces, the loss masks, packing, padding, labels, seeded shuffles and splits, the errors
//! bad files give (naming the line), and the real data sets of scripts/fetch-data.sh when fetched.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use tinytune::io::Tokenizer;
use tinytune::train::data::{Batch, DataFormat, DataKind, DataOptions, Dataset, Holdout, IGNORE_INDEX};
use tinytune::{Device, Error};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

/// The tiny byte-level tokenizer fixture (ChatML special tokens at ids 0..3) with EOS
/// `<|endoftext|>` = 0 and, when `pad`, PAD `<|im_end|>` = 2, from a config written beside a copy.
fn tokenizer_with(pad: bool) -> Tokenizer {
    // One directory per call: tests run in parallel threads of one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tinytune-data-tok-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tiny-bytelevel.json");
    std::fs::copy(src, dir.join("tokenizer.json")).unwrap();
    let pad = if pad { r#", "pad_token": "<|im_end|>""# } else { "" };
    std::fs::write(dir.join("tokenizer_config.json"), format!(r#"{{"eos_token": "<|endoftext|>"{pad}}}"#)).unwrap();
    let tok = Tokenizer::from_hf_json(dir.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    tok
}

fn tok() -> Tokenizer {
    let t = tokenizer_with(false);
    assert_eq!(t.eos_id(), Some(0));
    t
}

/// Llama 2 style: a BOS is added to every encoded text.
fn sentencepiece() -> Tokenizer {
    Tokenizer::from_hf_json(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tiny-sentencepiece.json")).unwrap()
}

fn opts(seq_len: usize) -> DataOptions {
    DataOptions { seq_len, ..DataOptions::default() }
}

fn rows_i32(b: &Batch) -> Vec<Vec<i32>> {
    let t = b.targets.shape()[1];
    b.targets.to_vec::<i32>().unwrap().chunks(t).map(|c| c.to_vec()).collect()
}

fn rows_u32(b: &Batch) -> Vec<Vec<u32>> {
    let t = b.ids.shape()[1];
    b.ids.to_vec::<u32>().unwrap().chunks(t).map(|c| c.to_vec()).collect()
}

fn jsonl(lines: &[&str]) -> String {
    lines.join("\n")
}

/// The error's message, checking it is a Format error naming `path`.
fn format_msg(r: Result<Dataset, Error>, path: &str) -> String {
    match r {
        Err(Error::Format { path: p, msg }) => {
            assert_eq!(p, path, "the error names the file");
            msg
        }
        Err(e) => panic!("expected a Format error naming {path}, got {e}"),
        Ok(d) => panic!("expected a Format error naming {path}, got {} examples", d.len()),
    }
}

#[test]
fn text_documents_are_tokenized_with_eos_and_loss_everywhere() {
    let tok = tok();
    let path = fixture("text.jsonl");
    let ds = Dataset::load(&path, &tok, &opts(512)).unwrap();
    assert_eq!((ds.format(), ds.kind(), ds.len(), ds.num_classes()), (DataFormat::Text, DataKind::Lm, 4, None));
    let texts = [
        (1, "The cat sat on the mat."),
        (2, "A second, longer document: it has a few more words in it than the first one."),
        (4, "Short."),
        (6, "Fourth line of text, the last."),
    ];
    for (e, (line, text)) in ds.examples().iter().zip(texts) {
        let mut want = tok.encode(text, true).unwrap();
        want.push(0);
        assert_eq!(e.ids, want, "line {line}");
        assert_eq!(e.line, line, "blank lines are skipped but counted");
        assert!(!e.is_target[0] && e.is_target[1..].iter().all(|&t| t), "loss on every token after the first");
        assert_eq!(e.label, None);
    }
    assert_eq!(ds.stats().lines, 4);
    assert_eq!(ds.n_target_tokens(), ds.n_tokens() - 4);

    // Without EOS; and the targets of a batch are the next tokens everywhere.
    let no_eos = Dataset::load(&path, &tok, &DataOptions { add_eos: false, ..opts(512) }).unwrap();
    assert_eq!(no_eos.example(2).ids, tok.encode("Short.", true).unwrap());
    let b = ds.batch(&[0], &Device::Cpu).unwrap();
    let ids = &ds.example(0).ids;
    let mut want: Vec<i32> = ids[1..].iter().map(|&x| x as i32).collect();
    want.push(IGNORE_INDEX);
    assert_eq!(rows_i32(&b)[0], want);
    assert_eq!((b.n_tokens, b.n_target_tokens, b.keep.is_none(), b.labels.is_none()), (ids.len(), ids.len() - 1, true, true));
}

#[test]
fn prompt_completion_has_loss_on_the_completion_and_eos_only() {
    // CRLF line ends and an unknown key ("id") in the fixture.
    for tok in [tok(), sentencepiece()] {
        let ds = Dataset::load(fixture("prompt_completion.jsonl"), &tok, &opts(512)).unwrap();
        assert_eq!((ds.format(), ds.len()), (DataFormat::PromptCompletion, 3));
        let eos = tok.eos_id().unwrap();
        let pairs = [("Q: What is the capital of France?\nA:", " Paris."), ("Translate to French: cat", " chat"), ("2 + 2 =", " 4")];
        let b = ds.batch(&[0, 1, 2], &Device::Cpu).unwrap();
        let (ids, targets) = (rows_u32(&b), rows_i32(&b));
        let mut n_targets = 0;
        for (i, (p, c)) in pairs.iter().enumerate() {
            let prompt = tok.encode(p, true).unwrap();
            let completion = tok.encode(c, false).unwrap();
            let mut want = prompt.clone();
            want.extend(&completion);
            want.push(eos);
            assert_eq!(ds.example(i).ids, want, "line {}", i + 1);
            if tok.bos_id().is_some() {
                assert_eq!(want[0], tok.bos_id().unwrap(), "the prompt is encoded with the tokenizer's BOS");
            }
            // Position t predicts token t+1: targets exactly from the last prompt position to the
            // position before the EOS, and they are the completion + EOS.
            let n = want.len();
            let (first, last) = (prompt.len() - 1, n - 2);
            for (t, &target) in targets[i].iter().enumerate() {
                if (first..=last).contains(&t) {
                    assert_eq!(target, ids[i][t + 1] as i32, "example {i} position {t}");
                } else {
                    assert_eq!(target, IGNORE_INDEX, "example {i} position {t}: no loss on the prompt or padding");
                }
            }
            let predicted: Vec<u32> = targets[i].iter().filter(|&&x| x != IGNORE_INDEX).map(|&x| x as u32).collect();
            assert_eq!(predicted, [completion.as_slice(), &[eos]].concat());
            n_targets += completion.len() + 1;
        }
        assert_eq!(b.n_target_tokens, n_targets);
    }
}

/// The tokens a batch row predicts, as text.
fn predicted_text(tok: &Tokenizer, targets: &[i32]) -> String {
    let ids: Vec<u32> = targets.iter().filter(|&&x| x != IGNORE_INDEX).map(|&x| x as u32).collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn messages_have_loss_on_the_assistant_turns_only() {
    let tok = tok();
    let ds = Dataset::load(fixture("messages.jsonl"), &tok, &opts(512)).unwrap();
    // Line 3 has no assistant turn: nothing to learn from it, dropped and counted.
    assert_eq!((ds.format(), ds.len(), ds.stats().no_targets), (DataFormat::Messages, 2, 1));
    let conv: [&[(&str, &str)]; 2] = [
        &[("user", "What is the capital of France?"), ("assistant", "Paris.")],
        &[("system", "You are terse."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "Count to 3."), ("assistant", "1, 2, 3.")],
    ];
    for (i, msgs) in conv.iter().enumerate() {
        assert_eq!(ds.example(i).ids, tok.encode(&tok.apply_chat_template(msgs, false).unwrap(), true).unwrap(), "conversation {i}");
    }
    let b = ds.batch(&[0, 1], &Device::Cpu).unwrap();
    let targets = rows_i32(&b);
    assert_eq!(predicted_text(&tok, &targets[0]), "Paris.<|im_end|>\n");
    assert_eq!(predicted_text(&tok, &targets[1]), "Hello.<|im_end|>\n1, 2, 3.<|im_end|>\n");
    // Each assistant span starts right after "<|im_start|>assistant\n": the token before the
    // first target is the newline of the generation prompt.
    let ids = &ds.example(1).ids;
    let first = ds.example(1).is_target.iter().position(|&t| t).unwrap();
    let prompt = tok.encode(&tok.apply_chat_template(&conv[1][..2], true).unwrap(), true).unwrap();
    assert_eq!(first, prompt.len());
    assert_eq!(&ids[..first], &prompt[..]);
}

#[test]
fn messages_with_smollm2s_template_and_default_system() {
    let Some(path) = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let ds = Dataset::load(fixture("messages.jsonl"), &tok, &opts(512)).unwrap();
    let targets = rows_i32(&ds.batch(&[0, 1], &Device::Cpu).unwrap());
    assert_eq!(predicted_text(&tok, &targets[0]), "Paris.<|im_end|>\n");
    assert_eq!(predicted_text(&tok, &targets[1]), "Hello.<|im_end|>\n1, 2, 3.<|im_end|>\n");
    // The default system message is in the tokens but not in the loss.
    let text = tok.decode(&ds.example(0).ids, false).unwrap();
    assert!(text.starts_with("<|im_start|>system\n") && text.contains("<|im_start|>user\nWhat is"), "{text}");
}

#[test]
fn packing_fills_windows_exactly_and_keeps_the_token_order() {
    let tok = tok();
    let path = fixture("text.jsonl");
    let docs = ["The cat sat on the mat.", "A second, longer document: it has a few more words in it than the first one.", "Short."];
    let last = "Fourth line of text, the last.";
    let mut stream: Vec<u32> = Vec::new();
    for d in docs.iter().chain([&last]) {
        stream.extend(tok.encode(d, true).unwrap());
        stream.push(0);
    }
    for seq_len in [5, 8, 13] {
        let ds = Dataset::load(&path, &tok, &DataOptions { pack: true, add_eos: false, ..opts(seq_len) }).unwrap();
        let n = stream.len() / seq_len;
        assert_eq!(ds.len(), n, "seq_len {seq_len}");
        assert_eq!(ds.stats().packed_remainder, stream.len() - n * seq_len);
        let flat: Vec<u32> = ds.examples().iter().flat_map(|e| e.ids.clone()).collect();
        assert_eq!(flat, stream[..n * seq_len], "windows are the document stream, in order");
        assert!(ds.examples().iter().all(|e| e.ids.len() == seq_len && e.is_target[1..].iter().all(|&t| t)));
        assert_eq!(ds.example(0).line, 1);
        let b = ds.batch(&[1, 0], &Device::Cpu).unwrap();
        assert!(b.keep.is_none(), "no padding");
        assert_eq!(b.ids.shape(), &[2, seq_len]);
        assert_eq!((b.n_tokens, b.n_target_tokens), (2 * seq_len, 2 * (seq_len - 1)));
    }
    let ds = Dataset::load(&path, &tok, &DataOptions { pack: true, ..opts(8) }).unwrap();
    let first_doc = tok.encode(docs[0], true).unwrap().len() + 1;
    let window_of_line2 = first_doc / 8;
    assert_eq!(ds.example(window_of_line2 + 1).line, 2, "a window starting inside document 2 names line 2");
}

#[test]
fn padding_is_on_the_right_with_a_keep_mask() {
    for (pad, want_pad) in [(false, 0u32), (true, 2)] {
        let tok = tokenizer_with(pad);
        let ds = Dataset::load(fixture("text.jsonl"), &tok, &opts(512)).unwrap();
        assert_eq!(ds.pad_id(), want_pad, "pad token, else EOS");
        let order = [2, 1, 0];
        let b = ds.batch(&order, &Device::Cpu).unwrap();
        let lens: Vec<usize> = order.iter().map(|&i| ds.example(i).ids.len()).collect();
        let t = *lens.iter().max().unwrap();
        assert_eq!(b.ids.shape(), &[3, t]);
        assert_eq!(b.lengths, lens);
        let keep = b.keep.as_ref().expect("padded, so a mask").to_vec::<f32>().unwrap();
        let (ids, targets) = (rows_u32(&b), rows_i32(&b));
        for (r, &i) in order.iter().enumerate() {
            let e = &ds.example(i).ids;
            assert_eq!(&ids[r][..e.len()], &e[..]);
            assert!(ids[r][e.len()..].iter().all(|&x| x == want_pad));
            for p in 0..t {
                assert_eq!(keep[r * t + p], if p < e.len() { 1.0 } else { 0.0 });
                let want = if p + 1 < e.len() { e[p + 1] as i32 } else { IGNORE_INDEX };
                assert_eq!(targets[r][p], want, "row {r} position {p}");
            }
        }
        assert_eq!(b.n_tokens, lens.iter().sum::<usize>());
        assert_eq!(b.n_target_tokens, lens.iter().map(|l| l - 1).sum::<usize>());
    }
}

/// The documented use, `logits.cross_entropy(&targets, -100, Mean)` on logits `[b, T, vocab]`,
/// is the mean of `−log softmax(logits[i, t])[ids[i, t + 1]]` over exactly the loss positions.
fn check_loss_convention(device: &Device) {
    let tok = tok();
    let ds = Dataset::load(fixture("prompt_completion.jsonl"), &tok, &opts(512)).unwrap();
    let b = ds.batch(&[0, 1, 2], device).unwrap();
    let (rows, t, v) = (3, b.ids.shape()[1], tok.vocab_size());
    let mut rng = tinytune::Rng::new(5);
    let logits = tinytune::Tensor::randn(&[rows, t, v], 0.0, 1.0, tinytune::DType::F32, device, &mut rng).unwrap();
    let loss = logits.cross_entropy(&b.targets, IGNORE_INDEX as i64, tinytune::CrossEntropyReduction::Mean).unwrap();
    let x = logits.to_vec::<f32>().unwrap();
    let mut total = 0.0;
    for i in 0..rows {
        let e = ds.example(i);
        for p in 0..e.ids.len() - 1 {
            if e.is_target[p + 1] {
                let row = &x[(i * t + p) * v..(i * t + p + 1) * v];
                let lse = row.iter().map(|&z| (z as f64).exp()).sum::<f64>().ln();
                total += lse - row[e.ids[p + 1] as usize] as f64;
            }
        }
    }
    let want = total / b.n_target_tokens as f64;
    let got = loss.to_vec::<f32>().unwrap()[0] as f64;
    assert!((got - want).abs() < 1e-4, "{device}: loss {got}, reference {want}");
    assert_eq!(b.ids.device().to_string(), device.to_string());
}

#[test]
fn batch_targets_give_the_next_token_loss_on_the_cpu() {
    check_loss_convention(&Device::Cpu);
}

#[test]
fn batch_targets_give_the_next_token_loss_on_the_gpu() {
    let Some(gpu) = common::gpu_device() else { return };
    check_loss_convention(&gpu);
    let ds = Dataset::load(fixture("classification.jsonl"), &tok(), &opts(512)).unwrap();
    let b = ds.batch(&[0, 4], &gpu).unwrap();
    assert_eq!(b.labels.unwrap().to_vec::<i32>().unwrap(), vec![1, 2]);
    assert_eq!(b.keep.unwrap().to_vec::<f32>().unwrap().iter().filter(|&&k| k == 1.0).count(), b.n_tokens);
}

#[test]
fn classification_labels_ints_and_bools() {
    let tok = tok();
    let ds = Dataset::load(fixture("classification.jsonl"), &tok, &opts(512)).unwrap();
    assert_eq!((ds.format(), ds.kind(), ds.len()), (DataFormat::Classification, DataKind::Classification, 5));
    let labels: Vec<Option<u32>> = ds.examples().iter().map(|e| e.label).collect();
    assert_eq!(labels, [Some(1), Some(0), Some(1), Some(0), Some(2)]);
    assert_eq!(ds.examples().iter().map(|e| e.line).collect::<Vec<_>>(), [1, 2, 3, 5, 6]);
    assert_eq!(ds.num_classes(), Some(3));
    assert_eq!(ds.example(0).ids, tok.encode("A wonderful, moving film.", true).unwrap(), "no EOS for classification");
    assert!(ds.check_labels(3).is_ok());
    let b = ds.batch(&[4, 0, 1], &Device::Cpu).unwrap();
    assert_eq!(b.labels.as_ref().unwrap().to_vec::<i32>().unwrap(), vec![2, 1, 0]);
    assert_eq!(b.labels.as_ref().unwrap().shape(), &[3]);
    assert_eq!(b.n_target_tokens, 0);
    assert!(b.targets.to_vec::<i32>().unwrap().iter().all(|&x| x == IGNORE_INDEX), "no next-token loss for classification");

    // Truncation keeps the start.
    let short = Dataset::load(fixture("classification.jsonl"), &tok, &opts(4)).unwrap();
    assert_eq!(short.example(0).ids, tok.encode("A wonderful, moving film.", true).unwrap()[..4]);
    assert_eq!(short.stats().truncated, 5);

    // Out of range for 2 classes: the error names line 6, where the label 2 is.
    let msg = match ds.check_labels(2) {
        Err(Error::Format { path, msg }) if path == fixture("classification.jsonl").display().to_string() => msg,
        other => panic!("expected a Format error, got {other:?}"),
    };
    assert!(msg.contains("line 6") && msg.contains("label 2"), "{msg}");
    let lm = Dataset::load(fixture("text.jsonl"), &tok, &opts(512)).unwrap();
    assert!(matches!(lm.check_labels(2), Err(Error::InvalidArgument { .. })));
}

#[test]
fn truncation_and_examples_left_without_targets() {
    let tok = tok();
    let text =
        jsonl(&[r#"{"prompt": "a long prompt that fills the window", "completion": " x"}"#, r#"{"prompt": "p", "completion": " done"}"#]);
    let ds = Dataset::from_jsonl_str(&text, "mem.jsonl", &tok, &opts(6)).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!((ds.stats().truncated, ds.stats().no_targets), (1, 1));
    assert_eq!(ds.example(0).line, 2);
    let lm = Dataset::from_jsonl_str(r#"{"text": "a text of more than eight tokens for sure"}"#, "m", &tok, &opts(8)).unwrap();
    assert_eq!(lm.example(0).ids, tok.encode("a text of more than eight tokens for sure", true).unwrap()[..8]);
    assert_eq!(lm.stats().truncated, 1);
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let tok = tok();
    let lines: Vec<String> = (0..50).map(|i| format!(r#"{{"text": "document {i}"}}"#)).collect();
    let ds = Dataset::from_jsonl_str(&lines.join("\n"), "m", &tok, &opts(64)).unwrap();
    let a = ds.epoch_order(3, 42);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "a permutation");
    assert_eq!(a, ds.epoch_order(3, 42), "same (epoch, seed), same order");
    assert_ne!(a, ds.epoch_order(3, 43), "another seed");
    assert_ne!(a, ds.epoch_order(4, 42), "another epoch");
    assert_ne!(a, (0..50).collect::<Vec<_>>());
    // Pinned: the order must not change between versions or machines (resuming depends on it).
    // The value is from an independent Python transcription of the documented layout (Philox
    // key = seed, counter [k, k_hi ^ "EPOC", epoch_lo, epoch_hi], Fisher–Yates from the top).
    let ten = Dataset::from_jsonl_str(&lines[..10].join("\n"), "m", &tok, &opts(64)).unwrap();
    assert_eq!(ten.epoch_order(0, 0), [5, 1, 7, 4, 3, 8, 2, 6, 0, 9]);

    // Uniform: each of the 24 orders of 4 items about equally often over 4800 seeds (expected 200
    // each, standard deviation ≈ 14; a biased shuffle such as swapping with any j misses this).
    let four = Dataset::from_jsonl_str(&lines[..4].join("\n"), "m", &tok, &opts(64)).unwrap();
    let mut counts = std::collections::HashMap::new();
    for seed in 0..4800 {
        *counts.entry(four.epoch_order(0, seed)).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 24);
    assert!(counts.values().all(|&c| (140..=260).contains(&c)), "{counts:?}");
}

#[test]
fn holdout_split_is_deterministic_disjoint_and_complete() {
    let tok = tok();
    let lines: Vec<String> = (0..40).map(|i| format!(r#"{{"text": "doc {i}", "label": {}}}"#, i % 3)).collect();
    let ds = Dataset::from_jsonl_str(&lines.join("\n"), "m", &tok, &opts(64)).unwrap();
    let lines_of = |d: &Dataset| d.examples().iter().map(|e| e.line).collect::<Vec<_>>();
    let (train, eval) = ds.split_holdout(Holdout::Fraction(0.25), 7).unwrap();
    assert_eq!((train.len(), eval.len()), (30, 10));
    let (tl, el) = (lines_of(&train), lines_of(&eval));
    let all: HashSet<usize> = tl.iter().chain(&el).copied().collect();
    assert_eq!(all.len(), 40, "disjoint and complete");
    assert!(tl.windows(2).all(|w| w[0] < w[1]) && el.windows(2).all(|w| w[0] < w[1]), "file order kept");
    assert_eq!(eval.kind(), DataKind::Classification);
    let (train2, eval2) = ds.split_holdout(Holdout::Fraction(0.25), 7).unwrap();
    assert_eq!((lines_of(&train2), lines_of(&eval2)), (tl.clone(), el.clone()), "same seed, same split");
    let (_, eval3) = ds.split_holdout(Holdout::Count(10), 8).unwrap();
    assert_ne!(lines_of(&eval3), el, "another seed, another split");
    assert_eq!(ds.split_holdout(Holdout::Count(1), 0).unwrap().1.len(), 1);
    for bad in [Holdout::Fraction(0.0), Holdout::Fraction(1.0), Holdout::Count(0), Holdout::Count(40)] {
        assert!(matches!(ds.split_holdout(bad, 0), Err(Error::InvalidArgument { .. })), "{bad:?}");
    }
}

#[test]
fn bad_files_name_the_line_and_the_problem() {
    let tok = tok();
    let p = |name: &str| fixture(name).display().to_string();
    let msg = format_msg(Dataset::load(fixture("empty.jsonl"), &tok, &opts(64)), &p("empty.jsonl"));
    assert!(msg.contains("no examples"), "{msg}");
    let msg = format_msg(Dataset::load(fixture("malformed.jsonl"), &tok, &opts(64)), &p("malformed.jsonl"));
    assert!(msg.contains("line 3") && msg.contains("not valid JSON"), "{msg}");
    let msg = format_msg(Dataset::load(fixture("missing_key.jsonl"), &tok, &opts(64)), &p("missing_key.jsonl"));
    assert!(msg.contains("line 2") && msg.contains("'completion'"), "{msg}");
    let missing = fixture("no-such-file.jsonl");
    assert!(matches!(Dataset::load(&missing, &tok, &opts(64)), Err(Error::Io { path, .. }) if path == missing.display().to_string()));

    let mem = |lines: &[&str], o: &DataOptions| format_msg(Dataset::from_jsonl_str(&jsonl(lines), "bad.jsonl", &tok, o), "bad.jsonl");
    let o = opts(64);
    let cases: &[(&[&str], &[&str])] = &[
        (&[""], &["no examples"]),
        (&[r#"{"text": "a"}"#, "[1, 2]"], &["line 2", "JSON object", "an array"]),
        (&[r#"{"text": 5}"#], &["line 1", "'text' must be a string", "a number"]),
        (&[r#"{"title": "x"}"#], &["line 1", "match no format"]),
        (&[r#"{"text": "a"}"#, r#"{"text": "b", "label": 1}"#], &["line 2", "\"label\"", "another format"]),
        (&[r#"{"text": "a", "label": 0}"#, r#"{"text": "b"}"#], &["line 2", "missing key 'label'"]),
        (&[r#"{"text": "a", "label": 0}"#, r#"{"text": "b", "label": -1}"#], &["line 2", "non-negative integer", "-1"]),
        (&[r#"{"text": "a", "label": 1.5}"#], &["line 1", "label", "1.5"]),
        (&[r#"{"text": "a", "label": "pos"}"#], &["line 1", "label", "a string"]),
        (&[r#"{"messages": {"role": "user"}}"#], &["line 1", "'messages' must be an array"]),
        (&[r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}"#], &["line 1", "messages[1]", "'content'"]),
        (&[r#"{"prompt": "a", "completion": null}"#], &["line 1", "'completion' must be a string", "null"]),
    ];
    for (lines, want) in cases {
        let msg = mem(lines, &o);
        assert!(want.iter().all(|w| msg.contains(w)), "{lines:?}: {msg:?} should name {want:?}");
    }

    // Longer than the model's context: with seq_len above it, a long line is an error naming it;
    // short lines are fine.
    let ctx = DataOptions { context: Some(8), ..opts(64) };
    let msg = mem(&[r#"{"text": "ok"}"#, r#"{"text": "this line is much longer than eight tokens"}"#], &ctx);
    assert!(msg.contains("line 2") && msg.contains("context of 8"), "{msg}");
    assert_eq!(Dataset::from_jsonl_str(r#"{"text": "ok"}"#, "m", &tok, &ctx).unwrap().len(), 1);
    assert!(Dataset::from_jsonl_str(
        r#"{"text": "this line is much longer than eight tokens"}"#,
        "m",
        &tok,
        &DataOptions { context: Some(8), ..opts(8) }
    )
    .is_ok());

    // Options that cannot apply.
    let invalid = |text: &str, o: &DataOptions, tok: &Tokenizer, want: &str| match Dataset::from_jsonl_str(text, "m", tok, o) {
        Err(Error::InvalidArgument { msg, .. }) => assert!(msg.contains(want), "{msg}"),
        other => panic!("expected InvalidArgument for {want}, got {other:?}"),
    };
    invalid(r#"{"text": "a"}"#, &DataOptions { pack: true, context: Some(8), ..opts(64) }, &tok, "context of 8");
    invalid(r#"{"prompt": "a", "completion": "b"}"#, &DataOptions { pack: true, ..opts(64) }, &tok, "packing");
    invalid(r#"{"text": "a"}"#, &opts(0), &tok, "seq_len");
    let no_eos =
        Tokenizer::from_hf_json(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tiny-bytelevel.json")).unwrap();
    invalid(r#"{"text": "a"}"#, &opts(64), &no_eos, "EOS");
    assert!(Dataset::from_jsonl_str(r#"{"text": "ab"}"#, "m", &no_eos, &DataOptions { add_eos: false, ..opts(64) }).is_ok());

    // Packing too little text for one window.
    let msg = format_msg(Dataset::from_jsonl_str(r#"{"text": "ab"}"#, "m", &tok, &DataOptions { pack: true, ..opts(64) }), "m");
    assert!(msg.contains("one window"), "{msg}");

    // Bad batch requests.
    let ds = Dataset::load(fixture("text.jsonl"), &tok, &opts(64)).unwrap();
    assert!(matches!(ds.batch(&[0, 4], &Device::Cpu), Err(Error::IndexOutOfRange { index: 4, size: 4, .. })));
    assert!(matches!(ds.batch(&[], &Device::Cpu), Err(Error::InvalidArgument { .. })));
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = std::env::temp_dir().join(format!("tinytune-data-utf8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("latin1.jsonl");
    std::fs::write(&path, b"{\"text\": \"fine\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let msg = format_msg(Dataset::load(&path, &tok(), &opts(64)), &path.display().to_string());
    std::fs::remove_dir_all(&dir).ok();
    assert!(msg.contains("line 2") && msg.contains("UTF-8"), "{msg}");
}

/// The real data sets of scripts/fetch-data.sh, tokenized with SmolLM2's tokenizer.
#[test]
fn real_movie_reviews_and_austen_load() {
    let (Some(reviews), Some(model)) = (common::asset("data/movie_reviews.jsonl"), common::asset("SmolLM2-135M-Instruct.Q4_1.gguf")) else {
        return;
    };
    let tok = Tokenizer::from_gguf(&model).unwrap();
    let o = opts(128);
    let ds = Dataset::load(&reviews, &tok, &o).unwrap();
    assert_eq!((ds.len(), ds.kind(), ds.num_classes()), (10_605, DataKind::Classification, Some(2)));
    let positive = ds.examples().iter().filter(|e| e.label == Some(1)).count();
    assert_eq!(positive, 5_242);
    ds.check_labels(2).unwrap();
    let train = Dataset::load(reviews.with_file_name("movie_reviews.train.jsonl"), &tok, &o).unwrap();
    let eval = Dataset::load(reviews.with_file_name("movie_reviews.eval.jsonl"), &tok, &o).unwrap();
    assert_eq!((train.len(), eval.len()), (9_545, 1_060));
    let mean = ds.n_tokens() as f64 / ds.len() as f64;
    println!("movie reviews: {} sentences, {mean:.1} tokens each on average, {} truncated to 128", ds.len(), ds.stats().truncated);
    assert!((10.0..60.0).contains(&mean), "mean length {mean}");

    let Some(austen) = common::asset("data/austen.jsonl") else { return };
    let ds = Dataset::load(&austen, &tok, &DataOptions { pack: true, ..opts(256) }).unwrap();
    assert_eq!(ds.stats().lines, 10_298);
    assert!(ds.examples().iter().all(|e| e.ids.len() == 256));
    println!("austen: {} paragraphs packed into {} windows of 256 tokens", ds.stats().lines, ds.len());
    assert!(ds.len() > 3_000, "about 900k tokens: {} windows", ds.len());
}

#[test]
fn special_tokens_can_be_left_out() {
    let tok = sentencepiece();
    let bos = tok.bos_id().expect("a BOS");
    let text = "{\"text\": \"hello world\", \"label\": 1}\n{\"text\": \"world\", \"label\": 0}\n";
    let with = Dataset::from_jsonl_str(text, "with.jsonl", &tok, &opts(16)).unwrap();
    let without = Dataset::from_jsonl_str(text, "without.jsonl", &tok, &DataOptions { add_special_tokens: false, ..opts(16) }).unwrap();
    for (a, b) in with.examples().iter().zip(without.examples()) {
        assert_eq!(a.ids[0], bos, "by default the tokenizer's BOS starts every text");
        assert_eq!(&a.ids[1..], &b.ids[..], "without special tokens: the same ids, no BOS");
    }
}

/// The ids of one row of a batch without its padding (by the keep mask's length).
fn row_ids(b: &Batch, row: usize) -> Vec<u32> {
    rows_u32(b)[row][..b.lengths[row]].to_vec()
}

#[test]
fn preference_pairs_with_a_prompt_have_loss_on_each_completion_and_eos() {
    let tok = tok();
    let text = jsonl(&[
        r#"{"prompt": "Q: is it good?", "chosen": " yes, very", "rejected": " no"}"#,
        r#"{"prompt": "Say hi", "chosen": " hi!", "rejected": " go away", "source": "ignored"}"#,
    ]);
    let ds = Dataset::from_jsonl_str(&text, "pairs.jsonl", &tok, &opts(64)).unwrap();
    assert_eq!((ds.format(), ds.kind(), ds.len()), (DataFormat::Preference, DataKind::Preference, 2));
    let enc = |s: &str, special: bool| tok.encode(s, special).unwrap();
    let e = ds.example(0);
    assert_eq!(e.ids, [enc("Q: is it good?", true), enc(" yes, very", false), vec![0]].concat());
    let r = e.rejected.as_ref().unwrap();
    assert_eq!(r.ids, [enc("Q: is it good?", true), enc(" no", false), vec![0]].concat());
    let n_prompt = enc("Q: is it good?", true).len();
    assert!(e.is_target[..n_prompt].iter().all(|t| !t) && e.is_target[n_prompt..].iter().all(|&t| t));
    // A batch holds the chosen rows, then the rejected ones in the same order.
    let b = ds.batch(&[1, 0], &Device::Cpu).unwrap();
    assert_eq!((b.pairs, b.lengths.len(), b.reference.is_none()), (Some(2), 4, true));
    let targets = rows_i32(&b);
    let want = [" hi!<|endoftext|>", " yes, very<|endoftext|>", " go away<|endoftext|>", " no<|endoftext|>"];
    for (row, w) in want.iter().enumerate() {
        assert_eq!(predicted_text(&tok, &targets[row]), *w, "row {row}");
    }
    assert_eq!(row_ids(&b, 1), ds.example(0).ids);
    assert_eq!(row_ids(&b, 3), ds.example(0).rejected.as_ref().unwrap().ids);
    assert_eq!(b.n_target_tokens, want.iter().map(|w| enc(w, false).len()).sum::<usize>());
    // Reference log-probabilities, once set, ride along with the pairs.
    let mut ds = ds;
    ds.set_reference_log_probs(&[(-1.5, -2.5), (-3.0, -4.0)]).unwrap();
    assert_eq!(ds.batch(&[1, 0], &Device::Cpu).unwrap().reference, Some(vec![(-3.0, -4.0), (-1.5, -2.5)]));
    assert!(ds.set_reference_log_probs(&[(0.0, 0.0)]).is_err(), "one value per pair");
}

#[test]
fn preference_pairs_without_a_prompt_share_their_common_start() {
    let tok = tok();
    let text = r#"{"chosen": "The answer is yes.", "rejected": "The answer is no."}"#;
    let ds = Dataset::from_jsonl_str(text, "implicit.jsonl", &tok, &opts(64)).unwrap();
    let (c, r) = (ds.example(0), ds.example(0).rejected.as_ref().unwrap());
    let n = c.ids.iter().zip(&r.ids).take_while(|(a, b)| a == b).count();
    assert!(n > 0 && n < c.ids.len().min(r.ids.len()));
    for s in [(&c.ids, &c.is_target), (&r.ids, &r.is_target)] {
        assert!(s.1[..n].iter().all(|t| !t) && s.1[n..].iter().all(|&t| t), "loss from the first token that differs");
    }
}

#[test]
fn preference_pairs_of_messages_go_through_the_chat_template() {
    let tok = tok();
    let explicit = r#"{"prompt": [{"role": "user", "content": "Hi!"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go."}]}"#;
    let implicit = r#"{"chosen": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}], "rejected": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Go."}]}"#;
    for text in [explicit, implicit] {
        let ds = Dataset::from_jsonl_str(text, "chat.jsonl", &tok, &opts(128)).unwrap();
        let e = ds.example(0);
        assert_eq!(e.ids, tok.encode(&tok.apply_chat_template(&[("user", "Hi!"), ("assistant", "Hello.")], false).unwrap(), true).unwrap());
        let targets = rows_i32(&ds.batch(&[0], &Device::Cpu).unwrap());
        assert_eq!(predicted_text(&tok, &targets[0]), "Hello.<|im_end|>\n", "{text}");
        assert_eq!(predicted_text(&tok, &targets[1]), "Go.<|im_end|>\n", "{text}");
    }
}

#[test]
fn preference_pairs_bad_input_names_the_line() {
    let tok = tok();
    let mem = |lines: &[&str], o: &DataOptions| format_msg(Dataset::from_jsonl_str(&jsonl(lines), "bad.jsonl", &tok, o), "bad.jsonl");
    let ok = r#"{"prompt": "a", "chosen": " b", "rejected": " c"}"#;
    let cases: &[(&[&str], &[&str])] = &[
        (&[ok, r#"{"prompt": "a", "chosen": " b"}"#], &["line 2", "missing key 'rejected'"]),
        (&[ok, r#"{"prompt": "a", "chosen": 3, "rejected": " c"}"#], &["line 2", "'chosen' must be a string or a list", "a number"]),
        (
            &[r#"{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": " c"}"#],
            &["line 1", "all be strings or all lists"],
        ),
        (&[ok, r#"{"text": "x", "chosen": " b", "rejected": " c"}"#], &["line 2", "\"text\"", "another format"]),
        (&[r#"{"chosen": [], "rejected": " c"}"#], &["line 1", "'chosen' is empty"]),
    ];
    for (lines, want) in cases {
        let msg = mem(lines, &opts(64));
        assert!(want.iter().all(|w| msg.contains(w)), "{lines:?}: {msg:?} should name {want:?}");
    }
    // A prompt that fills the model's context leaves no completion: an error naming the line.
    let long = r#"{"prompt": "a prompt of many many tokens", "chosen": " b", "rejected": " c"}"#;
    let msg = mem(&[ok, long], &DataOptions { context: Some(8), ..opts(8) });
    assert!(msg.contains("line 2") && msg.contains("context of 8"), "{msg}");
    // A pair whose completions are the same tokens says nothing: dropped and counted.
    let same = r#"{"prompt": "a", "chosen": " same", "rejected": " same"}"#;
    let ds = Dataset::from_jsonl_str(&jsonl(&[ok, same, same]), "same.jsonl", &tok, &opts(64)).unwrap();
    assert_eq!((ds.len(), ds.stats().identical_pairs, ds.stats().first_identical_line), (1, 2, Some(2)));
    // An only-identical file has no examples.
    let msg = format_msg(Dataset::from_jsonl_str(same, "same.jsonl", &tok, &opts(64)), "same.jsonl");
    assert!(msg.contains("no examples"), "{msg}");
}

#[test]
fn prompt_only_files_are_prompts_for_online_methods() {
    let tok = tok();
    let ds = Dataset::from_jsonl_str(&jsonl(&[r#"{"prompt": "The film was"}"#, r#"{"prompt": "I"}"#]), "p.jsonl", &tok, &opts(64)).unwrap();
    assert_eq!((ds.format(), ds.kind(), ds.len()), (DataFormat::Prompt, DataKind::Prompts, 2));
    assert_eq!(ds.example(0).ids, tok.encode("The film was", true).unwrap());
    let b = ds.batch(&[0, 1], &Device::Cpu).unwrap();
    assert_eq!((b.n_target_tokens, b.pairs, b.lengths.clone()), (0, None, vec![ds.example(0).ids.len(), 1]));
    let msg =
        format_msg(Dataset::from_jsonl_str(&jsonl(&[r#"{"prompt": "a"}"#, r#"{"prompt": ""}"#]), "p.jsonl", &tok, &opts(64)), "p.jsonl");
    assert!(msg.contains("line 2") && msg.contains("no tokens"), "{msg}");
    let msg = format_msg(
        Dataset::from_jsonl_str(&jsonl(&[r#"{"prompt": "a"}"#, r#"{"prompt": "b", "completion": "c"}"#]), "p.jsonl", &tok, &opts(64)),
        "p.jsonl",
    );
    assert!(msg.contains("line 2") && msg.contains("another format"), "{msg}");
}
