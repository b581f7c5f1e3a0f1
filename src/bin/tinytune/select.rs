//! `tinytune select-layers`: each block's deviation and gain on a sample of the task's data
//! (semantic layer selection, our logit-lens reading: `tinytune::train::select`), as a table,
//! an SVG bar chart and the `--layers` argument of the chosen blocks.

use std::path::PathBuf;

use clap::Args;
use tinytune::io::Tokenizer;
use tinytune::train::data::{DataOptions, Dataset};
use tinytune::train::select::{select_layers, LayerPolicy, SelectOptions};
use tinytune::{Error, Result};

use super::progress;

#[derive(Args)]
#[command(after_help = "Examples:\n  tinytune select-layers --model M --data reviews.jsonl --svg layers.svg\n  \
tinytune select-layers --model M --data text.jsonl --budget 8 --json     # the 8 blocks of greatest gain")]
pub struct SelectArgs {
    #[command(flatten)]
    pub common: super::Common,
    /// The task's data: {"text", "label"} lines (read by a linear probe) or {"text"} lines
    /// (read through the final norm and the LM head).
    #[arg(long)]
    data: PathBuf,
    /// Examples read (a seeded subset of the file when it holds more).
    #[arg(long, default_value_t = 256)]
    examples: usize,
    /// Cut examples to this many tokens.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Choose the K blocks of greatest gain (default: from the block of greatest gain to the last).
    #[arg(long)]
    budget: Option<usize>,
    /// Classification: how the probe pools a sequence, last or mean [default: last].
    #[arg(long, default_value = "last")]
    pooling: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the gains as an SVG bar chart here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn select(a: SelectArgs) -> Result<()> {
    let device = a.common.device()?;
    let (model, _) = a.common.load(&device)?;
    let tok = Tokenizer::for_model(&a.common.model)?;
    if a.examples == 0 {
        return Err(Error::InvalidArgument { op: "--examples", msg: "must be at least 1".into() });
    }
    let opts = DataOptions { seq_len: a.seq_len, context: model.max_positions(), pack: false, add_eos: true, add_special_tokens: true };
    let data = Dataset::load(&a.data, &tok, &opts)?;
    let policy = match a.budget {
        Some(k) => LayerPolicy::Budget(k),
        None => LayerPolicy::Auto,
    };
    let sopts = SelectOptions { examples: a.examples, seed: a.seed, pooling: a.pooling.parse()?, ..SelectOptions::default() };
    let what = format!("reading {} examples through every layer", a.examples.min(data.len()));
    let sel = progress::spin(&what, true, || select_layers(model.as_ref(), &data, &sopts, policy, &device))?;
    if let Some(p) = &a.svg {
        let name = a.data.file_name().map_or_else(|| a.data.display().to_string(), |n| n.to_string_lossy().into_owned());
        let title = format!("gain of each block on {name} ({} reading of {} examples; trained: blue)", sel.reading, sel.examples);
        tinytune::io::write_atomic(p, sel.svg(&title).as_bytes())?;
    }
    if a.common.json {
        outln!("{}", sel.to_json());
    } else {
        outln!("{} reading of {} examples of {}:", sel.reading, sel.examples, a.data.display());
        outln!("{}", sel.table().trim_end());
        outln!("chosen: --layers {} ({} of {} blocks)", sel.layers_arg(), sel.chosen.len(), sel.gains.len());
        if let Some(p) = &a.svg {
            outln!("wrote {}", p.display());
        }
    }
    Ok(())
}
