//! Hugging Face `config.json` for the architectures tinytune runs.
//!
//! Real configs carry many keys that do not change the math (token ids, dtype, training
//! hyper-parameters). Those are ignored. Keys that would change the math in a way tinytune does
//! not implement (rope scaling, sliding windows, an unknown activation) are errors naming the
//! file and the key, so a model never runs silently wrong.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

/// A parsed `config.json`, with typed getters that name the file and key on error.
pub struct RawConfig<'a> {
    path: &'a Path,
    json: serde_json::Map<String, Value>,
}

impl<'a> RawConfig<'a> {
    pub fn parse(path: &'a Path, text: &str) -> Result<RawConfig<'a>> {
        let v: Value = serde_json::from_str(text).map_err(|e| format_err(path, format!("invalid JSON: {e}")))?;
        match v {
            Value::Object(json) => Ok(RawConfig { path, json }),
            _ => Err(format_err(path, "the top level must be a JSON object")),
        }
    }

    pub fn read(path: &'a Path) -> Result<RawConfig<'a>> {
        let text = super::read_regular_string(path)?;
        RawConfig::parse(path, &text)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| format_err(self.path, format!("missing field '{key}'")))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| format_err(self.path, format!("field '{key}' must be a non-negative integer, got {v}"))),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| format_err(self.path, format!("field '{key}' must be a number, got {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| format_err(self.path, format!("field '{key}' must be true or false, got {v}"))),
        }
    }

    pub fn str_or(&self, key: &str, default: &'a str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => {
                v.as_str().map(str::to_string).ok_or_else(|| format_err(self.path, format!("field '{key}' must be a string, got {v}")))
            }
        }
    }

    /// The architecture named by `model_type` (or the first of `architectures`).
    pub fn model_type(&self) -> Result<String> {
        if let Some(t) = self.get("model_type").and_then(|v| v.as_str()) {
            return Ok(t.to_string());
        }
        self.get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| format_err(self.path, "no 'model_type' or 'architectures' field: cannot tell the architecture"))
    }

    /// Fail when `key` is present with a value other than the accepted ones.
    pub fn reject_unless(&self, key: &str, accept: impl Fn(&Value) -> bool, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if !accept(v) => Err(format_err(self.path, format!("field '{key}' = {v} is not supported: {why}"))),
            _ => Ok(()),
        }
    }

    pub fn error(&self, msg: impl Into<String>) -> Error {
        format_err(self.path, msg)
    }
}
