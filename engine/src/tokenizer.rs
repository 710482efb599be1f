//! The model's `tokenizer.json`, through the tokenizers crate.
use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Fails unless `dir` has a tokenizer.json (cheap: the file is not parsed).
    pub fn check(dir: &Path) -> Result<PathBuf> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer {
                path,
                msg: "file not found (a BitNet model directory needs tokenizer.json)".into(),
            });
        }
        Ok(path)
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::check(dir)?;
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(Tokenizer { inner, path })
    }

    /// Encodes with the tokenizer's special tokens (the BOS of Llama-3-style post-processors).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| EngineError::Tokenizer {
            path: self.path.clone(),
            msg: format!("encode failed: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes without adding special tokens (text that already carries them, such as a rendered chat
    /// template with its own BOS).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer {
            path: self.path.clone(),
            msg: format!("encode failed: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer {
            path: self.path.clone(),
            msg: format!("decode failed: {e}"),
        })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
