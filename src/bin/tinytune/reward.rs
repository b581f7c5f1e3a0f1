//! `tinytune eval --adapter <reward model>`: the reward of texts, or on preference pairs the
//! fraction where the chosen completion scores higher, with the Bradley–Terry loss. Texts
//! ({"text"} or {"prompt", "completion"} lines) get one reward each, printed with the
//! tokens it was read from.

use std::path::Path;

use serde_json::json;
use tinytune::io::Tokenizer;
use tinytune::models::CausalLm;
use tinytune::peft::ClassifierHead;
use tinytune::train::data::{DataKind, DataOptions, Dataset};
use tinytune::train::preference::{reward_scores, RewardModelling};
use tinytune::{Device, Result};

use super::progress;

#[allow(clippy::too_many_arguments)]
pub fn eval(
    model: &dyn CausalLm,
    head: &ClassifierHead,
    text: Option<String>,
    data: Option<&Path>,
    tok: &Tokenizer,
    opts: &DataOptions,
    batch_size: usize,
    device: &Device,
    json_out: bool,
) -> Result<()> {
    // Texts are read as the reward model was trained: its completions ended with EOS, and the
    // reward is that of the last real token.
    let ds = match (&text, data) {
        (Some(t), _) => Dataset::from_jsonl_str(&format!("{}\n", json!({ "text": t })), "--text", tok, opts)?,
        (None, Some(p)) => Dataset::load(p, tok, opts)?,
        (None, None) => unreachable!("clap requires one input"),
    };
    if ds.kind() == DataKind::Preference {
        let mut task = progress::Task::new(format!("scoring {} preference pairs", ds.len()), ds.len());
        let objective = RewardModelling { head: head.clone() };
        let r = tinytune::train::evaluate_observed(model, &objective, &ds, batch_size, device, 0, &mut |d, n| task.set(d, n))?;
        task.finish();
        let m = |k: &str| r.metric(k).unwrap_or(f64::NAN);
        if json_out {
            outln!(
                "{}",
                json!({ "pairs": r.examples, "preferred": m("rewards/accuracies"), "mean_loss": r.loss, "margin": m("rewards/margins"),
                        "chosen": m("rewards/chosen"), "rejected": m("rewards/rejected") })
            );
        } else {
            outln!(
                "preferred {:.4}  mean loss {:.6}  reward margin {:.4} (chosen {:.4}, rejected {:.4})  pairs {}",
                m("rewards/accuracies"),
                r.loss,
                m("rewards/margins"),
                m("rewards/chosen"),
                m("rewards/rejected"),
                r.examples
            );
        }
        return Ok(());
    }
    let mut task = progress::Task::new(format!("scoring {} texts", ds.len()), ds.len());
    let scores = reward_scores(model, head, &ds, batch_size, device, &mut |d, n| task.set(d, n))?;
    task.finish();
    if json_out {
        outln!("{}", json!({ "rewards": scores }));
    } else {
        for (s, e) in scores.iter().zip(ds.examples()) {
            let shown = tok.decode(&e.ids, true).unwrap_or_default();
            let shown: String = if shown.chars().count() > 70 { shown.chars().take(67).collect::<String>() + "..." } else { shown };
            outln!("{s:>10.4}  {shown}");
        }
    }
    Ok(())
}
