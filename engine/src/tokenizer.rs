//! The model's tokenizer through the tokenizers crate: a directory's `tokenizer.json`, or one rebuilt from a
//! GGUF file's `tokenizer.ggml.*` keys (see [`crate::gguf::tokenizer`]).
use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// What a GGUF file says beside the vocabulary (`tokenizer.chat_template`, the BOS/EOS texts); a
    /// directory keeps these in `tokenizer_config.json`, which the data loader reads itself.
    pub gguf: Option<crate::gguf::tokenizer::GgufSpecials>,
}

impl Tokenizer {
    /// Fails unless `dir` has a tokenizer.json (cheap: the file is not parsed). A GGUF file carries its
    /// tokenizer in its metadata: it is returned as is, and [`Tokenizer::load`] says whether it has one.
    pub fn check(dir: &Path) -> Result<PathBuf> {
        if crate::model::is_gguf(dir) {
            return Ok(dir.to_path_buf());
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer {
                path,
                msg: "file not found (a BitNet model directory needs tokenizer.json)".into(),
            });
        }
        Ok(path)
    }

    /// The tokenizer of a model directory or GGUF file.
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::model::is_gguf(dir) {
            let g = crate::loader::GgufWeights::open(dir)?;
            return Self::from_gguf(&g.gguf, dir);
        }
        let path = Self::check(dir)?;
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            path,
            gguf: None,
        })
    }

    /// Rebuilds the tokenizer from a parsed GGUF file's `tokenizer.ggml.*` keys; `path` is for messages.
    pub fn from_gguf(g: &crate::gguf::Gguf, path: &Path) -> Result<Self> {
        let (inner, specials) = crate::gguf::tokenizer::build(g).map_err(|e| match e {
            crate::gguf::tokenizer::Error::Gguf(e) => EngineError::gguf(path, e),
            crate::gguf::tokenizer::Error::Build(msg) => EngineError::Tokenizer {
                path: path.to_path_buf(),
                msg,
            },
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            gguf: Some(specials),
        })
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
