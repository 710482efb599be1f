//! Generation and scoring drivers over any backend, and the choice of backend.
use crate::backend::{Backend, Got, Want};
use crate::cpu::forward::CpuBackend;
use crate::cpu::SampleParams;
use crate::error::{EngineError, Result};
use crate::gpu;
use crate::model::Model;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Storage of the embedding and lm_head on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedDtype {
    /// f16 where the adapter has shader-f16, f32 otherwise.
    Auto,
    F16,
    F32,
}

impl std::str::FromStr for EmbedDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(EmbedDtype::Auto),
            "f16" => Ok(EmbedDtype::F16),
            "f32" => Ok(EmbedDtype::F32),
            _ => Err(format!("embed dtype {s:?}: expected auto, f16 or f32")),
        }
    }
}

/// How to pick and configure the compute device. Every field can also come from the environment
/// (`BITNODE_ADAPTER`, `BITNODE_MAX_BINDING`, `BITNODE_EMBED_DTYPE`), which the CLI reads through clap.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `None`/"auto": discrete GPU, then integrated, then virtual, then the CPU reference (software Vulkan is
    /// skipped: it is slower than the reference). "gpu": the best wgpu adapter of any kind, lavapipe
    /// included. "cpu": the CPU backend with the fast SIMD kernels; "cpu-reference": the same with the plain
    /// reference kernels (the oracle). A number: that index in `bitnode devices`. Anything else: a
    /// case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Caps the buffer and binding size below the adapter's (tiling tests; phones).
    pub max_binding: Option<u64>,
    pub embed_dtype: EmbedDtype,
    /// A LoRA adapter directory (PEFT format) applied at runtime.
    pub lora: Option<std::path::PathBuf>,
    /// Overrides the FFN activation the model's files imply (`--activation`): for a GGUF file whose
    /// `{arch}.hidden_activation` key is missing and whose vocabulary misleads the rule (see
    /// [`crate::config::gguf_activation`]).
    pub activation: Option<crate::config::Activation>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            adapter: None,
            max_binding: None,
            embed_dtype: EmbedDtype::Auto,
            lora: None,
            activation: None,
        }
    }
}

pub struct Engine {
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub backend: Box<dyn Backend>,
    pub eos: Vec<u32>,
}

/// Where a cold load's time and memory went (`bitnode bench infer --json` reports it as
/// `load_breakdown`). The tokenizer parses beside the weights, and the GPU path converts layers on
/// helper threads while it uploads others, so the phases overlap and may add up to more than
/// `total_seconds`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    /// Reading config.json, mapping the weights, checking every tensor's header.
    pub open_seconds: f64,
    /// Parsing tokenizer.json, on a thread of its own beside the weights.
    pub tokenizer_seconds: f64,
    /// Creating the wgpu device (0 on the CPU reference).
    pub device_seconds: f64,
    /// Wall time of the weight conversions (reading the map included), on `threads` threads.
    pub convert_seconds: f64,
    /// Writing converted weights into device buffers and waiting for the copies.
    pub upload_seconds: f64,
    /// The whole `Engine::load`.
    pub total_seconds: f64,
    /// CPU time (user + system) of the load: beside `total_seconds`, how parallel it was.
    pub cpu_seconds: Option<f64>,
    /// Threads the conversions ran on.
    pub threads: usize,
    /// The process's peak resident memory (VmHWM) when the load finished (Linux only).
    pub peak_rss_bytes: Option<u64>,
}

pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub stop_reason: &'static str,
}

impl Engine {
    pub fn load(dir: &Path, opts: &EngineOptions) -> Result<Engine> {
        Self::load_reporting(dir, opts).map(|(e, _)| e)
    }

    /// [`Engine::load`], with where the load's time and memory went.
    pub fn load_reporting(dir: &Path, opts: &EngineOptions) -> Result<(Engine, LoadReport)> {
        let gguf = crate::model::is_gguf(dir);
        if !gguf && !dir.is_dir() {
            return Err(EngineError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory or GGUF file not found"),
            ));
        }
        let t0 = Instant::now();
        let cpu0 = crate::util::cpu_seconds();
        // Config first, and the tokenizer's presence: cheap, and they catch most wrong directories before
        // the big map. A GGUF file holds both in its header, which the weights' open parses.
        let config = if gguf {
            None
        } else {
            Some(crate::config::ModelConfig::load(&dir.join("config.json"))?)
        };
        Tokenizer::check(dir)?;
        let mut load = LoadReport {
            threads: crate::util::load_threads(),
            ..Default::default()
        };
        // Parsing a 128k-entry tokenizer.json takes a good part of a second and needs none of the weights:
        // it runs on its own thread while they load. Its error still wins, as when it loaded first.
        let (tokenizer, loaded) = std::thread::scope(|s| {
            let tok = s.spawn(|| {
                let t = Instant::now();
                Tokenizer::load(dir).map(|tok| (tok, t.elapsed().as_secs_f64()))
            });
            let loaded = (|| {
                let mut model = match config {
                    Some(config) => {
                        let files = Arc::new(crate::loader::WeightFiles::open(dir)?);
                        Model::from_parts(dir, config, files)?
                    }
                    None => Model::load(dir)?,
                };
                if let Some(a) = opts.activation {
                    model.config.activation = a;
                }
                let model = Arc::new(model);
                load.open_seconds = t0.elapsed().as_secs_f64();
                let backend = make_backend_reporting(model.clone(), opts, &mut load)?;
                Ok((model, backend))
            })();
            let tokenizer = match tok.join() {
                Ok(t) => t,
                Err(e) => std::panic::resume_unwind(e),
            };
            (tokenizer, loaded)
        });
        let (tokenizer, tokenizer_seconds) = tokenizer?;
        let (model, backend): (Arc<Model>, Box<dyn Backend>) = loaded?;
        load.tokenizer_seconds = tokenizer_seconds;
        load.convert_seconds = model.files.convert_seconds();
        load.total_seconds = t0.elapsed().as_secs_f64();
        load.cpu_seconds = crate::util::cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
        load.peak_rss_bytes = crate::util::peak_rss_bytes();
        tracing::info!(?load, "engine loaded");
        let mut eos = model.config.eos_token_ids.clone();
        for t in ["<|end_of_text|>", "<|eot_id|>", "</s>"] {
            if let Some(id) = tokenizer.token_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let engine = Engine {
            model,
            tokenizer,
            backend,
            eos,
        };
        Ok((engine, load))
    }

    /// Generates up to `max_tokens` after `prompt`; `on_token` sees each new id as soon as it exists, and
    /// ends the generation (stop reason "stop") by returning false.
    pub fn generate_ids(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        params: &SampleParams,
        seed: u64,
        stop_at_eos: bool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        generate(
            self.backend.as_mut(),
            &self.model.config,
            &self.eos,
            prompt,
            max_tokens,
            params,
            seed,
            stop_at_eos,
            on_token,
        )
    }

    /// Mean NLL of `ids` in non-overlapping windows of the model's context: each window starts from an empty
    /// cache and position i predicts token i+1 (the convention of tests/reference/make_fixtures.py).
    /// Returns (predicted tokens, total nll in nats).
    pub fn score_ids(&mut self, ids: &[u32]) -> Result<(usize, f64)> {
        let ctx = self.model.config.max_position_embeddings;
        let chunk = self.backend.max_chunk().max(1);
        let (mut count, mut total) = (0usize, 0f64);
        for window in ids.chunks(ctx) {
            if window.len() < 2 {
                continue;
            }
            self.backend.begin(window.len())?;
            for (start, end) in chunk_ranges(window.len(), chunk) {
                // Targets for positions start..end that have a next token inside the window.
                let tend = end.min(window.len() - 1);
                let targets = &window[start + 1..tend + 1];
                match self.backend.forward(&window[start..end], start, Want::Nll(targets))? {
                    Got::Nll(v) => {
                        count += v.len();
                        total += v.iter().map(|x| *x as f64).sum::<f64>();
                    }
                    _ => return Err(EngineError::Invalid("backend returned no nll".into())),
                }
            }
        }
        Ok((count, total))
    }

    /// Logits at every position of `ids` (one window), [T, V].
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.backend.begin(ids.len())?;
        let chunk = self.backend.max_chunk().max(1);
        let mut all = Vec::new();
        for (start, end) in chunk_ranges(ids.len(), chunk) {
            if let Got::Logits(l) = self.backend.forward(&ids[start..end], start, Want::AllLogits)? {
                all.extend(l);
            }
        }
        Ok(all)
    }
}

/// Consecutive `[start, end)` ranges of at most `chunk` (>= 1) positions covering `0..len`: the pieces a
/// backend accepts in one `forward` call.
fn chunk_ranges(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(chunk)
        .map(move |start| (start, (start + chunk).min(len)))
}

/// Generates up to `max_tokens` after `prompt`; `on_token` sees each new id as soon as it exists, and
/// ends the generation (stop reason "stop": a stop string, or a client that went away) by returning false.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    backend: &mut dyn Backend,
    config: &crate::config::ModelConfig,
    eos: &[u32],
    prompt: &[u32],
    max_tokens: usize,
    params: &SampleParams,
    seed: u64,
    stop_at_eos: bool,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation> {
    let ctx = config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt encodes to no tokens".into()));
    }
    if prompt.len() >= ctx {
        return Err(EngineError::PromptTooLong {
            tokens: prompt.len(),
            context: ctx,
            reserve: 1,
        });
    }
    let mut out = Vec::new();
    if max_tokens == 0 {
        return Ok(Generation {
            tokens: out,
            prompt_tokens: prompt.len(),
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            stop_reason: "max_tokens",
        });
    }
    let mut rng = Rng::new(seed);
    let positions = (prompt.len() + max_tokens).min(ctx);
    backend.begin(positions)?;
    backend.mark_seen(prompt)?;
    let t0 = Instant::now();
    let mut next = None;
    for (start, end) in chunk_ranges(prompt.len(), backend.max_chunk().max(1)) {
        let want = if end == prompt.len() {
            Want::Sample {
                params: *params,
                u: rng.uniform(),
            }
        } else {
            Want::Nothing
        };
        if let Got::Token(t) = backend.forward(&prompt[start..end], start, want)? {
            next = Some(t);
        }
    }
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stop_reason = "max_tokens";
    if let Some(first) = next {
        out.push(first);
        if !on_token(first) {
            stop_reason = "stop";
        } else if stop_at_eos && eos.contains(&first) {
            stop_reason = "eos";
        } else if out.len() < max_tokens {
            // Positions left in the cache bound the steps; running out of them is a "context" stop.
            let room = positions - prompt.len();
            let steps = (max_tokens - 1).min(room);
            let (mut hit_eos, mut halted) = (false, false);
            backend.decode(first, prompt.len(), steps, params, &mut rng, &mut |t| {
                out.push(t);
                if !on_token(t) {
                    halted = true;
                    return false;
                }
                if stop_at_eos && eos.contains(&t) {
                    hit_eos = true;
                    return false;
                }
                true
            })?;
            if halted {
                stop_reason = "stop";
            } else if hit_eos {
                stop_reason = "eos";
            } else if out.len() < max_tokens {
                stop_reason = "context";
            }
        }
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    Ok(Generation {
        tokens: out,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds,
        stop_reason,
    })
}

/// Picks the backend: a wgpu adapter by preference order or by the override, else the CPU reference.
///
/// "auto" skips software Vulkan adapters (lavapipe, SwiftShader): on a machine without a GPU they run
/// bitnode's kernels 5-20x slower than the plain CPU reference (BENCHMARKS.md), so the reference is the
/// better fallback. "gpu" takes the best adapter of any kind, software included (the tests run the WGSL
/// kernels on lavapipe this way).
pub fn make_backend(model: Arc<Model>, opts: &EngineOptions) -> Result<Box<dyn Backend>> {
    make_backend_reporting(model, opts, &mut LoadReport::default())
}

/// [`make_backend`], noting the device creation and upload times in `report`. The CPU reference converts
/// every layer here (it reads them all on every forward), so a bad tensor fails the load, as on the GPU.
fn make_backend_reporting(
    model: Arc<Model>,
    opts: &EngineOptions,
    report: &mut LoadReport,
) -> Result<Box<dyn Backend>> {
    let want = opts.adapter.as_deref().unwrap_or("auto");
    // "cpu": the CPU backend with the fast kernels (`crate::fast`), on the cores this process may use;
    // "cpu-reference": the plain reference kernels, the oracle (the same bits, much slower).
    let reference = want.eq_ignore_ascii_case("cpu-reference");
    let cpu = |model: Arc<Model>| -> Result<CpuBackend> {
        model.layers()?;
        let b = CpuBackend::new(model, opts.embed_dtype == EmbedDtype::F16);
        Ok(if reference {
            b
        } else {
            b.fast(crate::probe::usable_cpus().floor().max(1.0) as usize)
        })
    };
    let is_cpu = reference || want.eq_ignore_ascii_case("cpu");
    let mut gpu = |model: Arc<Model>, adapter: wgpu::Adapter| -> Result<gpu::forward::GpuBackend> {
        let t = Instant::now();
        let dev = Arc::new(gpu::Gpu::new(adapter, opts.max_binding)?);
        report.device_seconds = t.elapsed().as_secs_f64();
        let b = gpu::forward::GpuBackend::with_gpu(model, dev.clone(), opts.embed_dtype);
        report.upload_seconds = dev.upload_seconds();
        b
    };
    if let Some(dir) = &opts.lora {
        let lora = crate::lora::Adapter::load(dir, &model.config)?;
        if !is_cpu {
            match gpu::pick_adapter(want)? {
                Some(adapter) => return Ok(Box::new(gpu(model, adapter)?.with_lora(&lora)?)),
                None if !want.eq_ignore_ascii_case("auto") => {
                    return Err(EngineError::NoAdapter(format!(
                        "no adapter matches {want:?}; see `bitnode devices`"
                    )))
                }
                None => {}
            }
        }
        return Ok(Box::new(cpu(model)?.with_lora(lora)));
    }
    if is_cpu {
        return Ok(Box::new(cpu(model)?));
    }
    match gpu::pick_adapter(want)? {
        Some(adapter) => Ok(Box::new(gpu(model, adapter)?)),
        None if want.eq_ignore_ascii_case("auto") => {
            tracing::debug!("no hardware GPU adapter: the CPU backend");
            eprintln!(
                "warning: no GPU adapter found; running on the CPU backend (`--device gpu` selects software Vulkan)"
            );
            Ok(Box::new(cpu(model)?))
        }
        None => Err(EngineError::NoAdapter(format!(
            "no adapter matches {want:?}; see `bitnode devices`"
        ))),
    }
}
