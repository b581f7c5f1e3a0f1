//! GGUF loading: dequantisation and metadata against gguf-py (tests/fixtures/gguf, made by
//! scripts/make_gguf_fixtures.py), malformed files (every one an error naming the file, never a
//! panic), tiny LLaMA checkpoints converted the way llama.cpp converts them (same logits as
//! transformers), and the real SmolLM2-135M-Instruct Q4_1 file when scripts/fetch-assets.sh
//! has fetched it.

mod common;

use std::path::{Path, PathBuf};

use tinytune::io::gguf::{llama_gguf_name, unpermute_rows, GgufLlamaWeights};
use tinytune::io::{Checkpoint, GgufFile, GgufValue, SafetensorsFile, Weights};
use tinytune::models::{self, llama::LlamaConfig};
use tinytune::quant::GgmlType;
use tinytune::{DType, Device, Error, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn types_path() -> PathBuf {
    fixture("gguf/types.gguf")
}

/// The error must be `Error::Format` and mention the file and `expect`.
fn assert_format_err<T>(r: tinytune::Result<T>, file: &str, expect: &str, what: &str) {
    match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, Error::Format { .. }), "{what}: not a format error: {msg}");
            assert!(msg.contains(file) && msg.contains(expect), "{what}: expected '{expect}' and '{file}' in: {msg}");
        }
    }
}

#[test]
fn dequantisation_matches_gguf_py() {
    let f = GgufFile::open(types_path()).unwrap();
    assert_eq!((f.version(), f.alignment()), (3, 64));
    assert_eq!(f.data_offset() % 64, 0);
    let reference = SafetensorsFile::open(fixture("gguf/types.reference.safetensors")).unwrap();
    let expect_types = [
        ("f32", GgmlType::F32),
        ("f16", GgmlType::F16),
        ("bf16", GgmlType::BF16),
        ("q8_0", GgmlType::Q8_0),
        ("q8_0_1d", GgmlType::Q8_0),
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q4_1_3d", GgmlType::Q4_1),
    ];
    assert_eq!(f.tensors().len(), expect_types.len());
    for (name, ty) in expect_types {
        let info = f.tensor_info(name).unwrap();
        assert_eq!(info.ty, ty, "{name}");
        assert_eq!(info.offset % 64, 0, "{name}");
        let want = reference.load(name, &Device::Cpu).unwrap();
        let got = f.load(name, &Device::Cpu).unwrap();
        assert_eq!(got.shape(), want.shape(), "{name}: shape (ne {:?})", info.ne);
        let (got, want) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
        // Bit-identical: the same f32 products gguf-py computes.
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{name}[{i}]: {a} vs gguf-py {b}");
        }
    }
    // The 3-D tensor's ne is the PyTorch shape reversed.
    assert_eq!(f.tensor_info("q4_1_3d").unwrap().ne, vec![64, 3, 2]);
    assert_eq!(f.tensor_info("q4_1_3d").unwrap().shape(), vec![2, 3, 64]);
}

#[test]
fn metadata_round_trips() {
    use GgufValue::*;
    let f = GgufFile::open(types_path()).unwrap();
    let s = |x: &str| String(x.to_string());
    let expect = [
        ("general.architecture", s("test")),
        ("general.alignment", U32(64)),
        ("test.u8", U8(200)),
        ("test.i8", I8(-100)),
        ("test.u16", U16(60000)),
        ("test.i16", I16(-30000)),
        ("test.u32", U32(4_000_000_000)),
        ("test.i32", I32(-2_000_000_000)),
        ("test.f32", F32(1.5)),
        ("test.bool", Bool(true)),
        ("test.string", s("héllo, 世界 🌍")),
        ("test.u64", U64((1 << 63) + 5)),
        ("test.i64", I64(-(1 << 62))),
        ("test.f64", F64(-2.25e-300)),
        ("test.array_i32", Array(vec![I32(1), I32(-2), I32(3)])),
        ("test.array_f32", Array(vec![F32(0.5), F32(-0.25)])),
        ("test.array_str", Array(vec![s("a"), s(""), s("ü")])),
        ("test.array_bool", Array(vec![Bool(true), Bool(false)])),
        ("test.array_nested", Array(vec![Array(vec![I32(1), I32(2)]), Array(vec![I32(3)])])),
    ];
    for (k, v) in &expect {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    // File order is kept, and there is nothing else.
    let keys: Vec<&str> = f.metadata().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), expect.len(), "{keys:?}");
    assert_eq!(keys[0], "general.architecture");
    // Typed getters convert what is convertible and name the key otherwise.
    assert_eq!(f.opt_usize("test.u32").unwrap(), Some(4_000_000_000));
    assert_eq!(f.opt_f64("test.f32").unwrap(), Some(1.5));
    assert_format_err(f.opt_usize("test.i8"), "types.gguf", "'test.i8' must be a non-negative integer", "negative as usize");
    assert_format_err(f.opt_str("test.u8"), "types.gguf", "'test.u8' must be a string", "int as str");
    assert_format_err(f.usize("test.missing"), "types.gguf", "missing metadata 'test.missing'", "missing key");
    assert_format_err(f.tokenizer(), "types.gguf", "tokenizer.ggml.tokens", "no vocabulary");
    // Loading a tensor that is not there.
    assert_format_err(f.load("nope", &Device::Cpu), "types.gguf", "no tensor named 'nope'", "missing tensor");
}

/// Where the last byte of tensor data lies: truncating before it must fail, after it must not.
fn data_end(f: &GgufFile) -> usize {
    f.tensors().iter().map(|t| f.data_offset() + (t.offset + t.n_bytes) as usize).max().unwrap_or(0)
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = std::fs::read(types_path()).unwrap();
    let end = data_end(&GgufFile::open(types_path()).unwrap());
    for cut in 0..bytes.len() {
        let r = GgufFile::from_bytes("cut.gguf", bytes[..cut].to_vec());
        if cut < end {
            assert_format_err(r, "cut.gguf", "", &format!("truncated at {cut}"));
        } else {
            r.unwrap_or_else(|e| panic!("cut at {cut} ≥ data end {end}: {e}"));
        }
    }
    // The tiny LLaMA file too, at a coarser step (it is 100 KB).
    let path = fixture("tiny-llama-gguf/tiny-llama.f32.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let end = data_end(&GgufFile::open(&path).unwrap());
    for cut in (0..end).step_by(97).chain([end - 1]) {
        assert_format_err(GgufFile::from_bytes("llama-cut.gguf", bytes[..cut].to_vec()), "llama-cut.gguf", "", &format!("cut at {cut}"));
    }
}

#[test]
fn versions() {
    let bytes = std::fs::read(types_path()).unwrap();
    let with_version = |v: [u8; 4]| {
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&v);
        GgufFile::from_bytes("v.gguf", b)
    };
    // v2 has the same layout as v3.
    let v2 = with_version(2u32.to_le_bytes()).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.load("q4_1", &Device::Cpu).unwrap().shape(), &[7, 32]);
    assert_format_err(with_version(1u32.to_le_bytes()), "v.gguf", "version 1", "v1");
    assert_format_err(with_version(4u32.to_le_bytes()), "v.gguf", "version 4 is not supported", "v4");
    assert_format_err(with_version(3u32.to_be_bytes()), "v.gguf", "big-endian", "big-endian");
    assert_format_err(GgufFile::from_bytes("m.gguf", b"GGML\x03\0\0\0".to_vec()), "m.gguf", "not a GGUF file", "magic");
    assert_format_err(GgufFile::from_bytes("e.gguf", vec![]), "e.gguf", "not a GGUF file", "empty");
    assert_format_err(
        GgufFile::open("/nonexistent/x.gguf").map(|_| ()).map_err(|e| match e {
            // A missing file is an I/O error naming it; map it so the helper can check the name.
            Error::Io { path, msg } => Error::Format { path, msg },
            e => e,
        }),
        "x.gguf",
        "",
        "missing file",
    );
}

/// Builds GGUF bytes field by field, so each test can corrupt exactly one field.
#[derive(Default)]
struct Builder {
    b: Vec<u8>,
}

impl Builder {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Builder {
        let mut b = Builder::default();
        b.b.extend_from_slice(b"GGUF");
        b.u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.b.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.b.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn raw(&mut self, x: &[u8]) -> &mut Self {
        self.b.extend_from_slice(x);
        self
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64).raw(s)
    }
    /// A u32-valued key.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key.as_bytes()).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name.as_bytes()).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pad to `align` and append `n` data bytes.
    fn data(&mut self, align: usize, n: usize) -> &mut Self {
        while self.b.len() % align != 0 {
            self.b.push(0);
        }
        self.b.extend(std::iter::repeat_n(0x11, n));
        self
    }
    fn parse(&self) -> tinytune::Result<GgufFile> {
        GgufFile::from_bytes("bad.gguf", self.b.clone())
    }
}

#[test]
fn malformed_files_are_errors_naming_the_field() {
    // A well-formed baseline first, so the failures below are due to the one corrupted field.
    let mut ok = Builder::header(3, 1, 1);
    ok.kv_u32("general.alignment", 32).tensor("w", &[32, 2], GgmlType::Q8_0.id(), 0).data(32, 68);
    let f = ok.parse().unwrap();
    assert_eq!(f.load("w", &Device::Cpu).unwrap().shape(), &[2, 32]);

    let cases: Vec<(&str, Builder, &str)> = vec![
        ("huge kv count", Builder::header(3, 0, u64::MAX), "metadata_kv_count"),
        ("huge tensor count", Builder::header(3, u64::MAX / 2, 0), "tensor_count"),
        (
            "key length past end",
            {
                let mut b = Builder::header(3, 0, 1);
                b.u64(1 << 40).raw(&[b'a'; 40]);
                b
            },
            "metadata key #0",
        ),
        (
            "string value past end",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"k").u32(8).u64(u64::MAX).raw(b"x");
                b
            },
            "metadata 'k'",
        ),
        (
            "huge array length",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"arr").u32(9).u32(4).u64(u64::MAX / 4).u32(1);
                b
            },
            "array length",
        ),
        (
            "huge string array",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"arr").u32(9).u32(8).u64(1 << 33);
                b.raw(&[0; 64]);
                b
            },
            "array length 8589934592",
        ),
        (
            "unknown value type",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"k").u32(13).u32(0);
                b
            },
            "unknown value type 13",
        ),
        (
            "unknown array element type",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"k").u32(9).u32(99).u64(1);
                b
            },
            "array element type",
        ),
        (
            "non-UTF-8 key",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"k\xff").u32(4).u32(1);
                b
            },
            "not valid UTF-8",
        ),
        (
            "non-UTF-8 string",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"name").u32(8).str(b"\xc3\x28");
                b
            },
            "metadata 'name'",
        ),
        (
            "bool byte 2",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"flag").u32(7).raw(&[2]);
                b
            },
            "neither 0 nor 1",
        ),
        (
            "duplicate key",
            {
                let mut b = Builder::header(3, 0, 2);
                b.kv_u32("a.b", 1).kv_u32("a.b", 2);
                b
            },
            "'a.b' appears twice",
        ),
        (
            "nesting too deep",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"deep").u32(9);
                for _ in 0..40 {
                    b.u32(9).u64(1);
                }
                b.u32(4).u64(1).u32(0);
                b
            },
            "nested deeper",
        ),
        (
            "alignment 0",
            {
                let mut b = Builder::header(3, 0, 1);
                b.kv_u32("general.alignment", 0);
                b
            },
            "general.alignment",
        ),
        (
            "alignment 48",
            {
                let mut b = Builder::header(3, 0, 1);
                b.kv_u32("general.alignment", 48);
                b
            },
            "power of two",
        ),
        (
            "alignment a string",
            {
                let mut b = Builder::header(3, 0, 1);
                b.str(b"general.alignment").u32(8).str(b"32");
                b
            },
            "general.alignment",
        ),
        (
            "too many dims",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[1, 1, 1, 1, 1], 0, 0).data(32, 4);
                b
            },
            "tensor 't' (info #0): n_dims",
        ),
        (
            "dims overflow",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[1 << 40, 1 << 40], 0, 0).data(32, 4);
                b
            },
            "overflow",
        ),
        (
            "unknown tensor type",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[4], 99, 0).data(32, 16);
                b
            },
            "unknown GGML tensor type 99",
        ),
        (
            "removed tensor type 4",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[32], 4, 0).data(32, 20);
                b
            },
            "tensor 't' (info #0): type",
        ),
        (
            "row not whole blocks",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[31, 2], GgmlType::Q8_0.id(), 0).data(32, 68);
                b
            },
            "not a multiple of the Q8_0 (8) block size 32",
        ),
        (
            "unaligned offset",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[4], 0, 8).data(32, 64);
                b
            },
            "8 is not a multiple of the alignment 32",
        ),
        (
            "offset past the data",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[4], 0, 64).data(32, 64);
                b
            },
            "tensor 't': data at offset 64 + 16 bytes lies outside",
        ),
        (
            "huge offset",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[4], 0, u64::MAX - 31).data(32, 64);
                b
            },
            "lies outside",
        ),
        (
            "data too short",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[32, 3], GgmlType::Q4_1.id(), 0).data(32, 59);
                b
            },
            "tensor 't'",
        ),
        (
            "no data section",
            {
                let mut b = Builder::header(3, 1, 0);
                b.tensor("t", &[4], 0, 0);
                b
            },
            "tensor 't'",
        ),
        (
            "duplicate tensor",
            {
                let mut b = Builder::header(3, 2, 0);
                b.tensor("t", &[4], 0, 0).tensor("t", &[4], 0, 32).data(32, 64);
                b
            },
            "'t' appears twice",
        ),
        (
            "tensor name past end",
            {
                let mut b = Builder::header(3, 1, 0);
                b.u64(1000).raw(&[b'b'; 40]);
                b
            },
            "tensor info #0: name",
        ),
    ];
    let mut failures = Vec::new();
    for (what, b, expect) in cases {
        if let Err(e) = std::panic::catch_unwind(|| assert_format_err(b.parse(), "bad.gguf", expect, what)) {
            failures.push(e.downcast_ref::<String>().cloned().unwrap_or_default());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A type GGML knows but tinytune does not dequantise: the file opens (its byte ranges are
    // checked), loading the tensor is the error.
    let mut b = Builder::header(3, 1, 0);
    b.tensor("blk.0.ffn_up.weight", &[256, 2], 23, 0).data(32, 272);
    let f = b.parse().unwrap();
    assert_format_err(
        f.load("blk.0.ffn_up.weight", &Device::Cpu),
        "bad.gguf",
        "'blk.0.ffn_up.weight': tensor type IQ4_XS (23) is not supported",
        "IQ4_XS",
    );
}

/// Deterministic byte corruption of the fixture: any outcome but a panic is fine, and whatever
/// opens must load (or refuse to load) every tensor without panicking.
#[test]
fn corrupted_bytes_never_panic() {
    let bytes = std::fs::read(types_path()).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let header_end = GgufFile::open(types_path()).unwrap().data_offset();
    let mut opened = 0;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            // Corrupt the header and directory mostly: that is where the parser reads.
            let i = (next() as usize) % header_end;
            b[i] = match next() % 4 {
                0 => 0xFF,
                1 => 0,
                2 => b[i] ^ (1 << (next() % 8)),
                _ => next() as u8,
            };
        }
        if let Ok(f) = GgufFile::from_bytes("fuzz.gguf", b) {
            opened += 1;
            for t in f.tensors().to_vec() {
                let _ = f.load(&t.name, &Device::Cpu);
            }
            let _ = f.tokenizer();
        }
    }
    assert!(opened > 0, "some corruptions (e.g. of string contents) leave a valid file");
}

#[test]
fn llama_names_and_unpermutation() {
    assert_eq!(llama_gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
    assert_eq!(llama_gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(), Some("blk.12.attn_q.weight"));
    assert_eq!(llama_gguf_name("model.layers.0.self_attn.o_proj.weight").as_deref(), Some("blk.0.attn_output.weight"));
    assert_eq!(llama_gguf_name("model.layers.3.mlp.down_proj.weight").as_deref(), Some("blk.3.ffn_down.weight"));
    assert_eq!(llama_gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(), Some("blk.3.ffn_norm.weight"));
    assert_eq!(llama_gguf_name("model.layers.3.input_layernorm.weight").as_deref(), Some("blk.3.attn_norm.weight"));
    assert_eq!(llama_gguf_name("model.norm.weight").as_deref(), Some("output_norm.weight"));
    assert_eq!(llama_gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
    assert_eq!(llama_gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    assert_eq!(llama_gguf_name("transformer.h.0.attn.c_attn.weight"), None);
    // One head of 4 rows: the GGUF rows [a0 b0 a1 b1] are HF rows [a0 a1 b0 b1].
    let gguf = [0., 0., 2., 2., 1., 1., 3., 3.];
    assert_eq!(unpermute_rows(&gguf, 4, 2, 1).unwrap(), vec![0., 0., 1., 1., 2., 2., 3., 3.]);
    assert!(unpermute_rows(&gguf, 4, 2, 3).is_none());
}

/// Max |a − b| over two equally long f32 slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// The tiny LLaMA checkpoints converted to GGUF (scripts/make_gguf_fixtures.py, q/k permuted
/// as llama.cpp does) give transformers' logits; the weights equal the safetensors ones.
fn check_tiny_llama(gguf_name: &str, hf_name: &str) -> f32 {
    let dev = Device::Cpu;
    let path = fixture("tiny-llama-gguf").join(gguf_name);
    let model = models::load(&path, &dev).unwrap_or_else(|e| panic!("{gguf_name}: {e}"));
    assert_eq!(model.architecture(), "llama");
    let reference = SafetensorsFile::open(fixture(hf_name).join("reference.safetensors")).unwrap();
    let ids = reference.load("ids", &dev).unwrap().to_dtype(DType::U32).unwrap();
    let want = reference.load("logits", &dev).unwrap().to_vec::<f32>().unwrap();
    let got = model.forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
    let worst = max_diff(&got, &want);
    assert!(worst < 1e-4, "{gguf_name}: logits differ from transformers by up to {worst}");

    // The config read from llama.* metadata equals the one from config.json (the epsilon is
    // stored as f32 in GGUF).
    let file = GgufFile::open(&path).unwrap();
    let from_gguf = LlamaConfig::from_gguf(&file).unwrap();
    let raw_path = fixture(hf_name).join("config.json");
    let raw = tinytune::io::config::RawConfig::read(&raw_path).unwrap();
    let from_hf = LlamaConfig::from_raw(&raw).unwrap();
    assert!((from_gguf.rms_norm_eps - from_hf.rms_norm_eps).abs() < 1e-12);
    assert_eq!(LlamaConfig { rms_norm_eps: from_hf.rms_norm_eps, ..from_gguf.clone() }, from_hf);

    // Every weight, q/k un-permuted, equals the checkpoint's (exactly: F32, or BF16 both sides).
    let ck = Checkpoint::open(fixture(hf_name)).unwrap();
    let st = SafetensorsFile::open(fixture(hf_name).join("model.safetensors")).unwrap();
    let w = GgufLlamaWeights::new(&file, from_gguf.num_attention_heads, from_gguf.num_key_value_heads);
    for name in ck.names() {
        let t = st.load(&name, &dev).unwrap();
        if name == "lm_head.weight" && from_gguf.tie_word_embeddings {
            assert!(!w.contains(&name));
            continue;
        }
        let got = w.get(&name, t.shape(), DType::F32, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = t.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got.to_vec::<f32>().unwrap(), want, "{gguf_name}: {name}");
    }
    worst
}

#[test]
fn tiny_llama_gguf_f32_matches_transformers() {
    let worst = check_tiny_llama("tiny-llama.f32.gguf", "tiny-llama");
    println!("tiny-llama.f32.gguf: max |logit diff| = {worst:e}");
}

#[test]
fn tiny_llama_gguf_tied_bf16_matches_transformers() {
    let worst = check_tiny_llama("tiny-llama-tied.bf16.gguf", "tiny-llama-tied-bf16");
    println!("tiny-llama-tied.bf16.gguf: max |logit diff| = {worst:e}");
}

#[test]
fn tokenizer_metadata_is_typed() {
    let f = GgufFile::open(fixture("tiny-llama-gguf/tiny-llama.f32.gguf")).unwrap();
    let t = f.tokenizer().unwrap();
    assert_eq!(t.model, "gpt2");
    assert_eq!(t.pre.as_deref(), Some("default"));
    assert_eq!(t.tokens.len(), 96);
    assert_eq!((t.tokens[1].as_str(), t.tokens[95].as_str()), ("<s>", "t95"));
    assert_eq!(t.token_types.as_ref().map(|v| (v.len(), v[0], v[3])), Some((96, 3, 1)));
    assert_eq!(t.merges, vec!["t 1", "t 2", "t1 0"]);
    assert_eq!((t.bos_id, t.eos_id, t.pad_id, t.unk_id), (Some(1), Some(2), Some(2), None));
    assert_eq!((t.add_bos, t.add_eos), (Some(false), None));
}

#[test]
fn gguf_model_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("tinytune-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Not llama.
    let p = dir.join("types.gguf");
    std::fs::copy(types_path(), &p).unwrap();
    let msg = models::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("types.gguf") && msg.contains("architecture 'test'"), "{msg}");
    // A llama file whose metadata disagrees with its tensors: a shape error naming the tensor.
    let bytes = std::fs::read(fixture("tiny-llama-gguf/tiny-llama.f32.gguf")).unwrap();
    let key = b"llama.feed_forward_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let mut b = bytes.clone();
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 4, "value type uint32");
    b[at + 4..at + 8].copy_from_slice(&65u32.to_le_bytes());
    let p = dir.join("bad-ffn.gguf");
    std::fs::write(&p, &b).unwrap();
    let msg = models::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("bad-ffn.gguf") && msg.contains("blk.0.ffn_gate.weight") && msg.contains("[65, 32]"), "{msg}");
    // A missing required field.
    let mut b = bytes.clone();
    let key = b"llama.block_count";
    let at = b.windows(key.len()).position(|w| w == key).unwrap();
    b[at..at + key.len()].copy_from_slice(b"llama.block_cnt__");
    let p = dir.join("no-blocks.gguf");
    std::fs::write(&p, &b).unwrap();
    let msg = models::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("no-blocks.gguf") && msg.contains("missing metadata 'llama.block_count'"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

use common::asset;

/// Mean of −log softmax(logits[t])[ids[t + 1]] over t, in f64.
fn mean_nll(logits: &[f32], vocab: usize, ids: &[u32]) -> f64 {
    let mut sum = 0.0;
    for t in 0..ids.len() - 1 {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        sum += lse - row[ids[t + 1] as usize] as f64;
    }
    sum / (ids.len() - 1) as f64
}

#[test]
fn smollm2_q4_1_nll_matches_transformers() {
    let Some(path) = asset("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    check_smollm2(&path);
}

fn check_smollm2(path: &Path) {
    let dev = Device::Cpu;
    let file = GgufFile::open(path).unwrap();
    let cfg = LlamaConfig::from_gguf(&file).unwrap();
    assert_eq!(
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size),
        (30, 576, 9, 3, 49152)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(file.tensor_info("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    assert_eq!(file.tensor_info("blk.0.attn_q.weight").unwrap().ty, GgmlType::Q4_1);
    let tok = file.tokenizer().unwrap();
    assert_eq!((tok.tokens.len(), tok.merges.len(), tok.bos_id, tok.eos_id), (49152, 48900, Some(1), Some(2)));
    assert_eq!(tok.model, "gpt2");

    // Token ids of "The quick brown fox jumps over the lazy dog. Rust is a systems programming
    // language that runs blazingly fast and prevents segfaults." (first 20), from the tokenizer
    // transformers builds from this GGUF; the reference NLL is what transformers 5.23 / torch
    // 2.15 (float32, CPU) compute for them after dequantising the same file:
    //   /tmp/pyref/bin/python scripts/make_gguf_fixtures.py smollm2  →  ids = IDS, mean NLL = 4.903960
    const IDS: [u32; 20] =
        [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 36828, 314, 253, 1734, 6256, 1789, 338, 7313, 754, 4750];
    const TRANSFORMERS_NLL: f64 = 4.903960;
    let model = models::load(path, &dev).unwrap();
    let ids = Tensor::from_vec(IDS.to_vec(), &[1, IDS.len()], &dev).unwrap();
    let logits = model.forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
    let nll = mean_nll(&logits, model.vocab_size(), &IDS);
    println!("SmolLM2-135M-Instruct Q4_1: mean NLL {nll:.6}, transformers {TRANSFORMERS_NLL:.6}");
    assert!((nll - TRANSFORMERS_NLL).abs() < 1e-3, "mean NLL {nll} vs transformers {TRANSFORMERS_NLL}");
}

/// The checksum of `scripts/make_real_gguf_checksums.py`: Σ bits(x_i)·((2i + 1)·K) mod 2⁶⁴.
fn position_checksum(x: &[f32]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    x.iter().enumerate().fold(0u64, |s, (i, v)| s.wrapping_add((v.to_bits() as u64).wrapping_mul((2 * i as u64 + 1).wrapping_mul(K))))
}

/// Every tensor of the real files (SmolLM2-135M Q4_1; Gemma 3 270M Q4_K_M, which holds Q4_K,
/// Q5_0, Q6_K and Q8_0 blocks) decodes bit for bit as gguf-py decodes it: the file reader's
/// dequantisation, and for the block matrices the rows the kernels decode (`QMatrix::decode`,
/// the packing path) and the fused one-token products over an identity (`dot_row`, within
/// f32 rounding of the same values).
#[test]
fn real_files_decode_bit_for_bit_as_gguf_py() {
    use tinytune::quant::QMatrix;
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("gguf/real-checksums.json")).unwrap()).unwrap();
    for (file, tensors) in fixture.as_object().unwrap() {
        let Some(path) = asset(file) else { continue };
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensors().len(), tensors.as_object().unwrap().len(), "{file}: tensor count");
        for (name, want) in tensors.as_object().unwrap() {
            let info = f.tensor_info(name).unwrap_or_else(|| panic!("{file}: no tensor {name}"));
            assert_eq!(info.ty.name(), want["type"].as_str().unwrap(), "{file} {name}: type");
            let x = f.dequantize(name).unwrap();
            assert_eq!(x.len() as u64, want["elements"].as_u64().unwrap(), "{file} {name}: elements");
            let sum: f64 = x.iter().map(|&v| v as f64).sum();
            let checksum: u64 = want["checksum"].as_str().unwrap().parse().unwrap();
            assert_eq!(position_checksum(&x), checksum, "{file} {name}: checksum (sum {sum} vs gguf-py {})", want["sum"]);
            if info.ne.len() == 2 && tinytune::quant::QFormat::from_ggml(info.ty).is_some() {
                let (rows, cols) = (info.ne[1] as usize, info.ne[0] as usize);
                let q = QMatrix::from_ggml(info.ty, rows, cols, f.tensor_bytes(name).unwrap().to_vec()).unwrap();
                let mut row = vec![0f32; cols];
                for r in [0, rows / 2, rows - 1] {
                    q.decode(r, 0, &mut row);
                    assert!(
                        row.iter().zip(&x[r * cols..(r + 1) * cols]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{file} {name}: row {r}"
                    );
                    // The fused product with the unit vectors e_j picks W[r][j].
                    let units: Vec<Vec<f32>> = (0..3).map(|k| (0..cols).map(|j| (j == (k * cols) / 3) as u8 as f32).collect()).collect();
                    let refs: Vec<&[f32]> = units.iter().map(|u| u.as_slice()).collect();
                    let mut dots = [0f32; 3];
                    q.dot_row(r, &refs, &mut dots);
                    for k in 0..3 {
                        assert_eq!(dots[k], x[r * cols + (k * cols) / 3], "{file} {name}: row {r} · e_{}", (k * cols) / 3);
                    }
                }
            }
        }
    }
}
