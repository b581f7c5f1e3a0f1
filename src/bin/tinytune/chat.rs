//! `tinytune chat`: a conversation in the terminal. Each turn renders the whole history through
//! the model's chat template (as `transformers`' `apply_chat_template(.., add_generation_prompt
//! = True)` does), generates the answer with the sampling flags of `generate`, streams it, and
//! keeps it in the history. Lines that start with `/` are commands:
//!
//! * `/reset` — forget the conversation (the system message stays);
//! * `/system TEXT` — set the system message (`/system` alone removes it);
//! * `/save FILE` — append the conversation as one `{"messages": [...]}` line (the `finetune`
//!   data format), written atomically;
//! * `/quit` (or end of input, Ctrl-D) — leave.
//!
//! When the history no longer fits the model's context with room for an answer, the oldest
//! turns are dropped (said on stderr).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use tinytune::io::Tokenizer;
use tinytune::models;
use tinytune::{Error, Result};

use crate::{emit, stream_new_text, Common, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    common: Common,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// One conversation: the system message and the turns since the last `/reset`.
struct Conversation {
    system: Option<String>,
    turns: Vec<(String, String)>,
}

impl Conversation {
    fn messages(&self) -> Vec<(&str, &str)> {
        self.system.iter().map(|s| ("system", s.as_str())).chain(self.turns.iter().map(|(r, c)| (r.as_str(), c.as_str()))).collect()
    }

    /// The prompt ids of the history plus the generation prompt, tokenized as
    /// `apply_chat_template(tokenize=True)` does (the template writes any special tokens).
    fn prompt(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        tok.encode_chat(&self.messages(), true)
    }
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let device = args.common.device()?;
    let (model, head) = args.common.load(&device)?;
    if head.is_some() {
        note!("note: this adapter was trained for classification: its weights change the answers, its head is not used here");
    }
    let tok = Tokenizer::for_model(&args.common.model)?;
    let opts = args.sampling.options(256, Some(&tok), true, "chat --stop")?;
    let ctx = model.max_positions();
    let mut conv = Conversation { system: args.system.clone(), turns: Vec::new() };
    note!("chat with {} — /reset, /system TEXT, /save FILE, /quit (or Ctrl-D)", args.common.model.display());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        emit(format_args!("> "))?;
        let Some(line) = lines.next() else {
            outln!();
            return Ok(());
        };
        let line = line.map_err(|e| Error::Io { path: "stdin".into(), msg: e.to_string() })?;
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        if let Some(command) = input.strip_prefix('/') {
            let (name, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
            let rest = rest.trim();
            match name {
                "quit" | "exit" => return Ok(()),
                "reset" => {
                    conv.turns.clear();
                    note!("(conversation cleared)");
                }
                "system" => {
                    conv.system = (!rest.is_empty()).then(|| rest.to_string());
                    note!("(system message {})", if rest.is_empty() { "removed" } else { "set" });
                }
                "save" if !rest.is_empty() => match save(&conv, &PathBuf::from(rest)) {
                    // A file that cannot be written is said, and the conversation goes on.
                    Ok(n) => note!("(saved {n} messages to {rest})"),
                    Err(e) => note!("error: {e}"),
                },
                _ => note!("commands: /reset, /system TEXT, /save FILE, /quit"),
            }
            continue;
        }
        conv.turns.push(("user".into(), input.to_string()));
        let mut prompt = conv.prompt(&tok)?;
        let mut opts = opts.clone();
        if let Some(ctx) = ctx {
            // Drop the oldest turns (a user message and its answer) until an answer fits.
            let room = opts.max_new_tokens.min(ctx / 2);
            while prompt.len() + room > ctx && conv.turns.len() > 1 {
                conv.turns.drain(..2.min(conv.turns.len() - 1));
                note!("(the oldest turn no longer fits the model's context of {ctx} tokens: dropped)");
                prompt = conv.prompt(&tok)?;
            }
            model.check_tokens("chat: the conversation", &prompt, prompt.len())?;
            opts.max_new_tokens = opts.max_new_tokens.min(ctx.saturating_sub(prompt.len()));
        }
        let (mut generated, mut shown) = (Vec::new(), 0usize);
        let new = models::generate(
            model.as_ref(),
            &prompt,
            &opts,
            &mut |t| {
                generated.push(t);
                stream_new_text(&tok, &generated, &mut shown)
            },
            &device,
        )?;
        outln!();
        let answer: Vec<u32> = new.into_iter().filter(|t| !opts.stop_tokens.contains(t)).collect();
        conv.turns.push(("assistant".into(), tok.decode_lossy(&answer, true)?));
    }
}

/// Append the conversation to `path` as one `{"messages": [...]}` line; the number of messages.
fn save(conv: &Conversation, path: &std::path::Path) -> Result<usize> {
    let msgs: Vec<_> = conv.messages().iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::Io { path: path.display().to_string(), msg: e.to_string() }),
    };
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(format!("{}\n", json!({ "messages": msgs })).as_bytes());
    tinytune::io::write_atomic(path, &bytes)?;
    Ok(msgs.len())
}
