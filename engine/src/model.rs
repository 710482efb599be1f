//! The host-side model: validated shapes, the ternary projections in bitnode's 2-bit layout, and the
//! (large) embedding / lm_head left inside the memory map until a backend converts them.
//!
//! Opening a model checks every tensor's header and reads the small tensors (norms, scales); the
//! projections convert later, in parallel and a word at a time: all of them into host memory for the CPU
//! reference and the trainers ([`Model::layers`]), or a few layers at a time for a backend that uploads
//! each and drops it ([`Model::stream_layers`], the GPU inference path), so that a GPU load never holds the
//! converted model on the host. Each converted tensor's mapped pages are released right after, so the
//! resident part of the map is the tensors in flight, not the checkpoint.
use crate::config::{ModelConfig, WeightForm};
use crate::error::{EngineError, Result};
use crate::loader::{TensorRef, WeightFiles};
use crate::ternary;
use crate::util;
use safetensors::tensor::Dtype;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// One frozen ternary projection `y = (T . x_q) * scale / s_x`, `T` of shape [out, in].
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryLinear {
    pub out: usize,
    pub inp: usize,
    /// [out][inp/16] words, layout in `ternary.rs`.
    pub words: Vec<u32>,
    /// The effective per-tensor scale: `m` (online), `weight_scale` (offline autobitlinear) or
    /// `1/weight_scale` (offline bitlinear).
    pub scale: f32,
}

impl TernaryLinear {
    pub fn row(&self, r: usize) -> &[u32] {
        let wpr = self.inp / 16;
        &self.words[r * wpr..(r + 1) * wpr]
    }
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub input_layernorm: Vec<f32>,          // [C]
    pub post_attention_layernorm: Vec<f32>, // [C]
    pub attn_sub_norm: Vec<f32>,            // [NH*HD]
    pub ffn_sub_norm: Vec<f32>,             // [F]
    pub q_proj: TernaryLinear,              // [NH*HD, C]
    pub k_proj: TernaryLinear,              // [NKV*HD, C]
    pub v_proj: TernaryLinear,              // [NKV*HD, C]
    pub o_proj: TernaryLinear,              // [C, NH*HD]
    pub gate_proj: TernaryLinear,           // [F, C]
    pub up_proj: TernaryLinear,             // [F, C]
    pub down_proj: TernaryLinear,           // [C, F]
}

/// The projections of a layer in `Layer` order, with their tensor names' suffixes.
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One projection as checked when the model is opened: its weight tensor, shape and (offline forms)
/// effective scale; the online scale comes from the weights when they convert.
#[derive(Debug, Clone)]
struct LinearSpec {
    name: String,
    out: usize,
    inp: usize,
    scale: f32,
}

/// What converting one layer needs: its norms (small, read at open) and its projections in `Layer` order.
#[derive(Debug, Clone)]
struct LayerSpec {
    norms: [Vec<f32>; 4],
    linears: [LinearSpec; 7],
}

impl LayerSpec {
    /// A layer's four norms and its seven projections, in `PROJECTIONS` order (both loaders build seven).
    fn new(norms: [Vec<f32>; 4], linears: Vec<LinearSpec>) -> LayerSpec {
        let linears: [LinearSpec; 7] = match linears.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("seven projections per layer"),
        };
        LayerSpec { norms, linears }
    }
}

/// A full-precision [rows, cols] matrix still inside the memory map (embedding, lm_head).
pub struct MappedMatrix {
    files: Arc<WeightFiles>,
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    source: MatrixSource,
}

/// How a [`MappedMatrix`]'s elements are stored. GGUF files hold the embedding as F16/F32/BF16 or, after
/// `llama-quantize`, as Q8_0/Q4_K/Q6_K: those decode a row range at a time (every row is whole blocks), so
/// the GGUF form stays in the map like the safetensors one and the backends need not know the difference.
#[derive(Debug, Clone)]
enum MatrixSource {
    Safetensors(Dtype),
    Gguf(crate::gguf::TensorInfo),
}

/// Elements a conversion thread takes at least: below this, spawning costs more than it saves.
const MIN_PIECE: usize = 1 << 16;

impl MappedMatrix {
    fn tensor(&self) -> TensorRef<'_> {
        // Checked at load time, so the lookup cannot fail afterwards.
        match self.files.get(&self.name) {
            Ok(t) => t,
            Err(_) => unreachable!("tensor {} vanished from the index", self.name),
        }
    }
    /// The stored element type, for reports ("F16", "Q8_0", ...).
    pub fn dtype_name(&self) -> String {
        match &self.source {
            MatrixSource::Safetensors(d) => format!("{d:?}"),
            MatrixSource::Gguf(t) => t.ty.to_string(),
        }
    }
    /// Elements `first..first + out.len()` (row-major) as f32, from whichever source holds them.
    fn read_f32(&self, first: usize, out: &mut [f32]) {
        match &self.source {
            MatrixSource::Safetensors(_) => self.tensor().read_f32(first, out),
            MatrixSource::Gguf(t) => self.gguf_read_f32(t, first, out),
        }
    }
    /// A GGUF matrix's elements: the rows that cover them decode whole (quantized rows are whole blocks),
    /// then the wanted part is copied out. Type, shape and data range were checked when the model opened,
    /// so a failure here cannot come from the file; it would leave NaN, never a panic.
    fn gguf_read_f32(&self, t: &crate::gguf::TensorInfo, first: usize, out: &mut [f32]) {
        let cols = self.cols;
        let n = out.len();
        if n == 0 {
            return;
        }
        let decode = |r0: usize, r1: usize, dst: &mut [f32]| {
            let ok = self
                .files
                .gguf()
                .and_then(|g| g.data(t).ok())
                .is_some_and(|data| crate::gguf::rows_to_f32(t, data, r0, r1, dst).is_ok());
            if !ok {
                dst.fill(f32::NAN);
            }
        };
        let (r0, r1) = (first / cols, (first + n).div_ceil(cols));
        if first.is_multiple_of(cols) && n.is_multiple_of(cols) {
            decode(r0, r1, out);
        } else {
            let mut rows = vec![0f32; (r1 - r0) * cols];
            decode(r0, r1, &mut rows);
            let at = first - r0 * cols;
            out.copy_from_slice(&rows[at..at + n]);
        }
    }
    /// Elements `first..first + out.len()` as f16 bits.
    fn read_f16(&self, first: usize, out: &mut [u16]) {
        match &self.source {
            MatrixSource::Safetensors(_) => self.tensor().read_f16(first, out),
            MatrixSource::Gguf(_) => {
                // Through f32 in blocks on the stack, rounded by half's slice conversion (the same rounding
                // as the safetensors path's f32 and bf16 sources).
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let mut block = [0f32; 1024];
                for (k, o) in out.chunks_mut(block.len()).enumerate() {
                    let f = &mut block[..o.len()];
                    self.read_f32(first + k * 1024, f);
                    o.reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(f);
                }
            }
        }
    }
    /// Row `r` converted to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let n = out.len().min(self.cols);
        self.read_f32(r * self.cols, &mut out[..n]);
    }
    /// Rows [r0, r1) as f16 bits, row-major (the GPU f16 form; lossless for bf16 sources in f16 range).
    pub fn rows_f16(&self, r0: usize, r1: usize) -> Vec<u16> {
        let mut out = vec![0u16; (r1 - r0) * self.cols];
        self.fill_f16(r0 * self.cols, &mut out);
        out
    }
    pub fn rows_f32(&self, r0: usize, r1: usize) -> Vec<f32> {
        let mut out = vec![0f32; (r1 - r0) * self.cols];
        self.fill_f32(r0 * self.cols, &mut out);
        out
    }
    /// Elements `first..first + out.len()` (row-major) as f16 bits, converted on all load threads.
    pub fn fill_f16(&self, first: usize, out: &mut [u16]) {
        let t0 = Instant::now();
        util::parallel_fill(out, util::load_threads(), MIN_PIECE, |at, piece| {
            self.read_f16(first + at, piece)
        });
        self.files.add_convert_time(t0.elapsed());
    }
    /// Elements `first..first + out.len()` (row-major) as f32, converted on all load threads.
    pub fn fill_f32(&self, first: usize, out: &mut [f32]) {
        let t0 = Instant::now();
        util::parallel_fill(out, util::load_threads(), MIN_PIECE, |at, piece| {
            self.read_f32(first + at, piece)
        });
        self.files.add_convert_time(t0.elapsed());
    }
    /// Releases the mapped pages of elements [e0, e1) (see [`WeightFiles::release`]): a backend calls it
    /// once it has uploaded them.
    pub fn release(&self, e0: usize, e1: usize) {
        let (b0, b1) = match &self.source {
            MatrixSource::Safetensors(d) => {
                let size = d.bitsize() / 8;
                (e0 * size, e1 * size)
            }
            // Whole blocks only: a block straddling either end stays (its neighbour may still need it).
            MatrixSource::Gguf(t) => {
                let (bs, ts) = (t.ty.block_size() as usize, t.ty.type_size() as usize);
                (e0.div_ceil(bs) * ts, e1 / bs * ts)
            }
        };
        self.files.release(&self.name, b0, b1);
    }
}

pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub embed: MappedMatrix,
    /// `None` when the embedding is tied.
    pub lm_head: Option<MappedMatrix>,
    pub norm: Vec<f32>,
    pub files: Arc<WeightFiles>,
    specs: Vec<LayerSpec>,
    /// Every layer on the host, converted on the first call of [`Model::layers`].
    host: OnceLock<Vec<Layer>>,
    /// Held while `layers` converts, so that two threads asking at once convert once.
    converting: Mutex<()>,
}

impl Model {
    /// Opens a model: a Hugging Face BitNet directory (`config.json` and safetensors weights) or a GGUF
    /// file (see [`is_gguf`]). Every tensor's header is checked here; the ternary projections convert on
    /// first use (see the module comment).
    pub fn load(path: &Path) -> Result<Model> {
        if is_gguf(path) {
            let files = Arc::new(WeightFiles::open_gguf(path)?);
            return Self::from_gguf(path, files);
        }
        let config = ModelConfig::load(&path.join("config.json"))?;
        let files = Arc::new(WeightFiles::open(path)?);
        Self::from_parts(path, config, files)
    }

    /// A GGUF model (`files` from [`WeightFiles::open_gguf`]): the config from the `{arch}.*` keys, the
    /// tensors under llama.cpp's names (the table in the GGUF notes) checked against it, the norms read.
    /// `dir` keeps the file's path: everything that names the model (adapters' base, reports) uses it.
    pub fn from_gguf(path: &Path, files: Arc<WeightFiles>) -> Result<Model> {
        use crate::gguf::GgmlType;
        let Some(g) = files.gguf() else {
            return Err(EngineError::Invalid(format!(
                "{}: the weights given are not a GGUF file",
                path.display()
            )));
        };
        let config = ModelConfig::from_gguf(&g.gguf, path)?;
        let c = &config;
        let (cdim, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let qd = c.num_heads * c.head_dim;
        let shape_err = |t: &crate::gguf::TensorInfo, want: &[usize]| {
            EngineError::gguf(
                path,
                crate::gguf::GgufError::BadShape {
                    tensor: t.name.clone(),
                    msg: format!("ne = {:?}, the model's hyperparameters ask for {want:?}", t.ne),
                },
            )
        };
        let mapped = |name: &str| -> Result<MappedMatrix> {
            let t = g.info(name)?;
            if t.ne != [cdim, v] {
                return Err(shape_err(t, &[cdim, v]));
            }
            if !crate::gguf::decodes_to_f32(t.ty) {
                return Err(EngineError::gguf(
                    path,
                    crate::gguf::GgufError::UnsupportedType {
                        tensor: name.into(),
                        ty: t.ty.to_string(),
                        reason: "the embedding and output must be F32, F16, BF16, Q8_0, Q4_K or Q6_K",
                    },
                ));
            }
            // Resolves the data range now, so that reading rows later cannot fail.
            g.data(t)?;
            Ok(MappedMatrix {
                files: files.clone(),
                name: name.to_string(),
                rows: v,
                cols: cdim,
                source: MatrixSource::Gguf(t.clone()),
            })
        };
        let embed = mapped("token_embd.weight")?;
        let lm_head = match c.tie_word_embeddings {
            Some(false) => Some(mapped("output.weight")?),
            _ => None,
        };
        let vec_of = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = g.info(name)?;
            if t.ne != [n] {
                return Err(shape_err(t, &[n]));
            }
            if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(EngineError::gguf(
                    path,
                    crate::gguf::GgufError::UnsupportedType {
                        tensor: name.into(),
                        ty: t.ty.to_string(),
                        reason: "norm weights must be F32, F16 or BF16",
                    },
                ));
            }
            crate::gguf::to_f32(t, g.data(t)?).map_err(|e| EngineError::gguf(path, e))
        };
        let norm = vec_of("output_norm.weight", cdim)?;
        let shapes = projection_shapes(c);
        let mut specs = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("blk.{l}");
            let norms = [
                vec_of(&format!("{p}.attn_norm.weight"), cdim)?,
                vec_of(&format!("{p}.ffn_norm.weight"), cdim)?,
                vec_of(&format!("{p}.attn_sub_norm.weight"), qd)?,
                vec_of(&format!("{p}.ffn_sub_norm.weight"), f)?,
            ];
            let mut linears = Vec::with_capacity(7);
            for (n, (out, inp)) in GGUF_PROJECTIONS.iter().zip(shapes) {
                let name = format!("{p}.{n}.weight");
                let t = g.info(&name)?;
                // A projection [out, in] is stored with ne = [in, out] (GGUF's contiguous axis first).
                if t.ne != [inp, out] {
                    return Err(shape_err(t, &[inp, out]));
                }
                if !matches!(
                    t.ty,
                    GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2S | GgmlType::F32 | GgmlType::F16 | GgmlType::BF16
                ) {
                    return Err(EngineError::gguf(
                        path,
                        crate::gguf::GgufError::UnsupportedType {
                            tensor: name,
                            ty: t.ty.to_string(),
                            reason: "a ternary projection must be TQ1_0, TQ2_0, I2_S, or F32/F16/BF16 \
                                     holding ternary values times one scale",
                        },
                    ));
                }
                g.data(t)?;
                // llama.cpp's optional per-projection `.scale` multiplies the mat-mul output (no converter
                // examined writes one, but the loader accepts it): fold it into the tensor's own scale.
                let sname = format!("{p}.{n}.scale");
                let scale = match g.gguf.tensor(&sname) {
                    None => 1.0,
                    Some(st) => {
                        let vals =
                            if st.n_elements == 1 && matches!(st.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                                crate::gguf::to_f32(st, g.data(st)?).map_err(|e| EngineError::gguf(path, e))?
                            } else {
                                vec![]
                            };
                        match vals.first() {
                            Some(&x) if x.is_finite() => x,
                            _ => {
                                return Err(EngineError::gguf(
                                    path,
                                    crate::gguf::GgufError::BadData {
                                        tensor: sname,
                                        msg: "expected one finite float".into(),
                                    },
                                ))
                            }
                        }
                    }
                };
                linears.push(LinearSpec { name, out, inp, scale });
            }
            specs.push(LayerSpec::new(norms, linears));
        }
        Ok(Model::assemble(path, config, embed, lm_head, norm, files, specs))
    }

    /// A model from its checked parts (safetensors or GGUF), nothing converted yet.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dir: &Path,
        config: ModelConfig,
        embed: MappedMatrix,
        lm_head: Option<MappedMatrix>,
        norm: Vec<f32>,
        files: Arc<WeightFiles>,
        specs: Vec<LayerSpec>,
    ) -> Model {
        Model {
            dir: dir.to_path_buf(),
            config,
            embed,
            lm_head,
            norm,
            files,
            specs,
            host: OnceLock::new(),
            converting: Mutex::new(()),
        }
    }

    /// Checks every tensor the config asks for (presence, shape, dtype, offline scales) and reads the
    /// norms; converts nothing large.
    pub fn from_parts(dir: &Path, config: ModelConfig, files: Arc<WeightFiles>) -> Result<Model> {
        let c = &config;
        let (cdim, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let qd = c.num_heads * c.head_dim;
        let mapped = |name: &str| -> Result<MappedMatrix> {
            let t = files.get(name)?;
            t.expect_shape(&[v, cdim])?;
            if !t.is_float() {
                return Err(EngineError::tensor(
                    name,
                    format!("has dtype {:?}, expected f32/f16/bf16", t.dtype),
                ));
            }
            Ok(MappedMatrix {
                files: files.clone(),
                name: name.to_string(),
                rows: v,
                cols: cdim,
                source: MatrixSource::Safetensors(t.dtype),
            })
        };
        let embed = mapped("model.embed_tokens.weight")?;
        let has_head = files.has("lm_head.weight");
        let lm_head = match (c.tie_word_embeddings, has_head) {
            (Some(true), _) | (None, false) => None,
            (_, true) => Some(mapped("lm_head.weight")?),
            (Some(false), false) => {
                return Err(EngineError::MissingTensor(
                    "lm_head.weight (config says tie_word_embeddings: false)".into(),
                ))
            }
        };
        let vec_of = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = files.get(name)?;
            t.expect_shape(&[n])?;
            t.to_f32()
        };
        let norm = vec_of("model.norm.weight", cdim)?;
        let shapes = projection_shapes(c);
        let mut specs = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let norms = [
                vec_of(&format!("{p}.input_layernorm.weight"), cdim)?,
                vec_of(&format!("{p}.post_attention_layernorm.weight"), cdim)?,
                vec_of(&format!("{p}.self_attn.attn_sub_norm.weight"), qd)?,
                vec_of(&format!("{p}.mlp.ffn_sub_norm.weight"), f)?,
            ];
            let mut linears = Vec::with_capacity(7);
            for (n, (out, inp)) in PROJECTIONS.iter().zip(shapes) {
                linears.push(check_linear(&files, c.form, &format!("{p}.{n}"), out, inp)?);
            }
            specs.push(LayerSpec::new(norms, linears));
        }
        Ok(Model::assemble(dir, config, embed, lm_head, norm, files, specs))
    }

    /// Every layer in host memory, converted (in parallel) on the first call and kept: the CPU reference
    /// and the trainers read it. The GPU inference path uses [`Model::stream_layers`] instead.
    pub fn layers(&self) -> Result<&[Layer]> {
        if let Some(l) = self.host.get() {
            return Ok(l);
        }
        let _guard = match self.converting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(l) = self.host.get() {
            return Ok(l);
        }
        let threads = util::load_threads();
        let mut all = Vec::with_capacity(self.specs.len());
        for r in batches(self.specs.len(), batch_layers(threads)) {
            all.extend(self.convert_layers(r, threads)?);
        }
        Ok(self.host.get_or_init(|| all))
    }

    /// The host layers if [`Model::layers`] has converted them.
    pub fn host_layers(&self) -> Option<&[Layer]> {
        self.host.get().map(Vec::as_slice)
    }

    /// Calls `each(index, layer)` for every layer in order without keeping them: a helper thread converts
    /// a few layers ahead while `each` (on this thread) uploads, so the host holds a few converted layers at
    /// a time. Uses the host layers instead when they exist. Stops at the first error of either side.
    pub fn stream_layers(&self, mut each: impl FnMut(usize, &Layer) -> Result<()>) -> Result<()> {
        if let Some(ls) = self.host.get() {
            for (i, l) in ls.iter().enumerate() {
                each(i, l)?;
            }
            return Ok(());
        }
        let threads = util::load_threads();
        let batch = batch_layers(threads);
        let n = self.specs.len();
        std::thread::scope(|s| {
            // One batch converted ahead: enough to keep the uploader busy, little memory.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<Layer>)>>(1);
            s.spawn(move || {
                for r in batches(n, batch) {
                    self.prefetch_layers(r.end..(r.end + batch).min(n));
                    let first = r.start;
                    let got = self.convert_layers(r, threads).map(|v| (first, v));
                    let failed = got.is_err();
                    // A closed channel means the consumer failed: stop converting.
                    if tx.send(got).is_err() || failed {
                        return;
                    }
                }
            });
            for got in rx {
                let (first, layers) = got?;
                for (k, l) in layers.iter().enumerate() {
                    each(first + k, l)?;
                }
            }
            Ok(())
        })
    }

    /// Starts reading layers `r`'s projections from disk (a cold page cache) while others convert.
    fn prefetch_layers(&self, r: Range<usize>) {
        for spec in &self.specs[r] {
            for lin in &spec.linears {
                self.files.prefetch(&lin.name);
            }
        }
    }

    /// Converts layers `r` on `threads` threads and releases their projections' mapped pages.
    fn convert_layers(&self, r: Range<usize>, threads: usize) -> Result<Vec<Layer>> {
        let t0 = Instant::now();
        let specs = &self.specs[r];
        let converted = if let Some(g) = self.files.gguf() {
            let lins: Vec<&LinearSpec> = specs.iter().flat_map(|s| s.linears.iter()).collect();
            let got = convert_gguf_linears(g, &lins, threads);
            for lin in &lins {
                self.files.release(&lin.name, 0, usize::MAX);
            }
            got
        } else {
            let mut parts = Vec::with_capacity(specs.len() * 7);
            for spec in specs {
                for lin in &spec.linears {
                    parts.push((self.files.get(&lin.name)?, lin));
                }
            }
            let got = convert_linears(&parts, self.config.form, threads);
            for (_, lin) in &parts {
                self.files.release(&lin.name, 0, usize::MAX);
            }
            got
        };
        let mut converted = converted?.into_iter();
        let mut layers = Vec::with_capacity(specs.len());
        for spec in specs {
            let mut next = || match converted.next() {
                Some(t) => t,
                None => unreachable!("seven converted projections per layer"),
            };
            let [ln1, ln2, attn, ffn] = spec.norms.clone();
            layers.push(Layer {
                input_layernorm: ln1,
                post_attention_layernorm: ln2,
                attn_sub_norm: attn,
                ffn_sub_norm: ffn,
                q_proj: next(),
                k_proj: next(),
                v_proj: next(),
                o_proj: next(),
                gate_proj: next(),
                up_proj: next(),
                down_proj: next(),
            });
        }
        self.files.add_convert_time(t0.elapsed());
        Ok(layers)
    }

    /// The matrix the logits are computed with.
    pub fn head(&self) -> &MappedMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// (out, in) of each projection of a layer, in `Layer` order.
    pub fn projection_shapes(&self) -> [(usize, usize); 7] {
        projection_shapes(&self.config)
    }

    /// Bytes of all ternary projections in bitnode's packed layout.
    pub fn ternary_bytes(&self) -> usize {
        let per_layer: usize = self.projection_shapes().iter().map(|(o, i)| o * (i / 16) * 4).sum();
        self.config.num_layers * per_layer
    }

    /// Number of parameters as counted in the bf16 form (what model cards quote).
    pub fn num_params(&self) -> usize {
        let c = &self.config;
        let qd = c.num_heads * c.head_dim;
        let per_layer: usize = self.projection_shapes().iter().map(|(o, i)| o * i).sum::<usize>()
            + 2 * c.hidden_size
            + qd
            + c.intermediate_size;
        c.vocab_size * c.hidden_size * if self.tied() { 1 } else { 2 } + c.num_layers * per_layer + c.hidden_size
    }
}

/// Whether `path` names a GGUF model rather than a model directory: any file is taken for one (the strict
/// reader then refuses a file that is not GGUF, by its magic), so that `--model` accepts a `.gguf` file
/// wherever it accepts a directory, whatever the file is called; so is a directory that holds
/// [`GGUF_IN_DIR`] and no `config.json` (how the model store keeps a GGUF model).
pub fn is_gguf(path: &Path) -> bool {
    gguf_file(path).is_some()
}

/// The file name of a GGUF model inside a directory: the model store holds directories (its content hash
/// and transfers work on a directory's files), so `bitnode model add`, `submit` and the API store a GGUF
/// file as `<entry>/model.gguf`.
pub const GGUF_IN_DIR: &str = "model.gguf";

/// The GGUF file `path` names: `path` itself when it is a file, `path/model.gguf` when `path` is a
/// directory that holds one and no `config.json`; `None` for a Hugging Face directory or nothing.
pub fn gguf_file(path: &Path) -> Option<std::path::PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    let inner = path.join(GGUF_IN_DIR);
    (inner.is_file() && !path.join("config.json").exists()).then_some(inner)
}

/// A model's config without opening its weights: `config.json` of a directory, or a GGUF file's header
/// (the file is mapped and its header parsed, its tensors are not read).
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if is_gguf(path) {
        let g = crate::loader::GgufWeights::open(path)?;
        let c = ModelConfig::from_gguf(&g.gguf, path)?;
        return Ok(c);
    }
    ModelConfig::load(&path.join("config.json"))
}

/// A layer's projections under llama.cpp's GGUF names, in `Layer` order (`PROJECTIONS`' HF names).
pub const GGUF_PROJECTIONS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Decodes GGUF projections (checked at open) into bitnode's layout, one projection per task on `threads`
/// threads: the decoders work a block at a time, and a layer's seven projections keep the threads busy.
/// A tensor whose blocks have different scales is refused by `into_linear` with the reason.
fn convert_gguf_linears(
    g: &crate::loader::GgufWeights,
    lins: &[&LinearSpec],
    threads: usize,
) -> Result<Vec<TernaryLinear>> {
    let got = util::parallel_map(lins.to_vec(), threads, |lin| -> Result<TernaryLinear> {
        let t = g.info(&lin.name)?;
        let gerr = |e| EngineError::gguf(&g.path, e);
        let mut tl = crate::gguf::to_ternary(t, g.data(t)?)
            .and_then(|tt| tt.into_linear(&lin.name))
            .map_err(gerr)?;
        if (tl.out, tl.inp) != (lin.out, lin.inp) {
            return Err(EngineError::tensor(
                &lin.name,
                format!(
                    "decoded as [{}, {}], expected [{}, {}]",
                    tl.out, tl.inp, lin.out, lin.inp
                ),
            ));
        }
        tl.scale *= lin.scale;
        Ok(tl)
    });
    got.into_iter().collect()
}

fn projection_shapes(c: &ModelConfig) -> [(usize, usize); 7] {
    let (cdim, f) = (c.hidden_size, c.intermediate_size);
    let qd = c.num_heads * c.head_dim;
    let kvd = c.num_kv_heads * c.head_dim;
    [
        (qd, cdim),
        (kvd, cdim),
        (kvd, cdim),
        (cdim, qd),
        (f, cdim),
        (f, cdim),
        (cdim, f),
    ]
}

/// Layers converted together: enough projections to keep every thread busy (the online form's mean is
/// one sequential sum per projection), few enough that their mapped pages stay small.
fn batch_layers(threads: usize) -> usize {
    (threads / 4).clamp(1, 4)
}

fn batches(n: usize, batch: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(batch.max(1)).map(move |a| a..(a + batch).min(n))
}

/// Checks a projection's weight tensor against the form's expectations (shape, dtype).
fn check_weight(w: &TensorRef<'_>, form: WeightForm, out: usize, inp: usize) -> Result<()> {
    match form {
        WeightForm::Online => {
            w.expect_shape(&[out, inp])?;
            if !w.is_float() {
                return Err(EngineError::tensor(
                    w.name,
                    format!("has dtype {:?}; online checkpoints hold float latent weights", w.dtype),
                ));
            }
        }
        WeightForm::OfflineAutoBitLinear | WeightForm::OfflineBitLinear => {
            if !out.is_multiple_of(4) {
                return Err(EngineError::tensor(
                    w.name,
                    format!("out dimension {out} is not a multiple of 4"),
                ));
            }
            w.expect_shape(&[out / 4, inp])?;
            if w.dtype != Dtype::U8 && w.dtype != Dtype::I8 {
                return Err(EngineError::tensor(
                    w.name,
                    format!("has dtype {:?}; offline checkpoints hold packed uint8", w.dtype),
                ));
            }
        }
    }
    // The config checks this for its own shapes; `convert_ternary` takes any.
    if inp == 0 || !inp.is_multiple_of(16) {
        return Err(EngineError::tensor(
            w.name,
            format!("in dimension {inp} is not a positive multiple of 16"),
        ));
    }
    Ok(())
}

/// Checks one projection's tensors and reads its offline scale.
fn check_linear(files: &WeightFiles, form: WeightForm, prefix: &str, out: usize, inp: usize) -> Result<LinearSpec> {
    let name = format!("{prefix}.weight");
    check_weight(&files.get(&name)?, form, out, inp)?;
    let scale = match form {
        // From the weights, when they convert.
        WeightForm::Online => 1.0,
        WeightForm::OfflineAutoBitLinear | WeightForm::OfflineBitLinear => {
            let sname = format!("{prefix}.weight_scale");
            let st = files.get(&sname)?;
            if st.numel() != 1 {
                return Err(EngineError::tensor(
                    &sname,
                    format!("has shape {:?}, expected a single value", st.shape),
                ));
            }
            let ws = st.to_f32()?[0];
            if !ws.is_finite() || ws == 0.0 {
                return Err(EngineError::tensor(
                    &sname,
                    format!("is {ws}, expected a finite non-zero scale"),
                ));
            }
            if form == WeightForm::OfflineAutoBitLinear {
                ws
            } else {
                1.0 / ws
            }
        }
    };
    Ok(LinearSpec { name, out, inp, scale })
}

/// Converts one projection's weight tensor `w` ([out, in] latent floats online, [out/4, in] packed bytes
/// offline) to bitnode's layout on `threads` threads. `scale` is the effective offline scale (ignored
/// online, where it comes from the weights). Bit-identical to the per-element conversion
/// (tests/tests/load.rs holds one to compare with).
pub fn convert_ternary(
    w: &TensorRef<'_>,
    form: WeightForm,
    out: usize,
    inp: usize,
    scale: f32,
    threads: usize,
) -> Result<TernaryLinear> {
    check_weight(w, form, out, inp)?;
    let spec = LinearSpec {
        name: w.name.to_string(),
        out,
        inp,
        scale,
    };
    let mut got = convert_linears(&[(*w, &spec)], form, threads)?;
    match got.pop() {
        Some(t) => Ok(t),
        None => unreachable!("one projection in, one out"),
    }
}

/// One piece of conversion work: a range of rows of one projection, writing only its own words.
enum Task<'a> {
    /// Packed rows [r0, r1): output rows `i*out/4 + r0 .. i*out/4 + r1` go to `groups[i]`.
    Packed {
        part: usize,
        w: &'a TensorRef<'a>,
        r0: usize,
        r1: usize,
        groups: [&'a mut [u32]; 4],
    },
    /// Latent rows [r0, r0 + words.len()/(inp/16)) of an [out, inp] tensor, quantized with `s` (1 / mean |W|).
    Latent {
        w: &'a TensorRef<'a>,
        inp: usize,
        s: f32,
        r0: usize,
        words: &'a mut [u32],
    },
}

/// Converts projections (already checked) in parallel: tasks of a few hundred KiB each across all of
/// them, so one big projection does not leave threads idle. The online form first computes each
/// projection's mean |W|, one sequential sum per projection (in the reference's order, so the scale is
/// bit-identical), the projections in parallel.
fn convert_linears(
    parts: &[(TensorRef<'_>, &LinearSpec)],
    form: WeightForm,
    threads: usize,
) -> Result<Vec<TernaryLinear>> {
    let online = form == WeightForm::Online;
    // Mirrors transformers' WeightQuant: scale = 1 / mean(|W|).clamp(1e-5), T = round(W*scale).clamp(-1,1),
    // effective weight T / scale. The mean is accumulated in f64 and rounded once, the closest f32 to
    // torch's reduction.
    let inv: Vec<f32> = if online {
        // Largest first, so the longest sums start first.
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(parts[i].1.out * parts[i].1.inp));
        let mut s = vec![0f32; parts.len()];
        let got = util::parallel_map(order.clone(), threads, |i| {
            let (w, lin) = &parts[i];
            let n = lin.out * lin.inp;
            let mut buf = vec![0f32; 4096];
            let mut sum = 0f64;
            for a in (0..n).step_by(buf.len()) {
                let b = &mut buf[..(n - a).min(4096)];
                w.read_f32(a, b);
                for x in b.iter() {
                    sum += x.abs() as f64;
                }
            }
            let m = ((sum / n as f64) as f32).max(1e-5);
            1.0f32 / m
        });
        for (i, v) in order.into_iter().zip(got) {
            s[i] = v;
        }
        s
    } else {
        vec![]
    };
    let mut words: Vec<Vec<u32>> = parts.iter().map(|(_, l)| vec![0u32; l.out * (l.inp / 16)]).collect();
    let mut tasks = Vec::new();
    for (p, ((w, lin), dst)) in parts.iter().zip(words.iter_mut()).enumerate() {
        let wpr = lin.inp / 16;
        if online {
            // About 64 KiB of latent weights per task.
            let rows = ((1 << 15) / lin.inp).max(1);
            for (k, chunk) in dst.chunks_mut(rows * wpr).enumerate() {
                tasks.push(Task::Latent {
                    w,
                    inp: lin.inp,
                    s: inv[p],
                    r0: k * rows,
                    words: chunk,
                });
            }
        } else {
            // About 256 KiB of packed bytes per task; packed row r feeds output rows r + i*out/4.
            let r4 = lin.out / 4;
            let rows = ((1 << 18) / lin.inp).max(1);
            let mut g = dst.chunks_mut((r4 * wpr).max(1));
            let mut split = || g.next().map(|s| s.chunks_mut(rows * wpr)).into_iter().flatten();
            let (mut g0, mut g1, mut g2, mut g3) = (split(), split(), split(), split());
            let mut r0 = 0;
            while let (Some(a), Some(b), Some(c), Some(d)) = (g0.next(), g1.next(), g2.next(), g3.next()) {
                let r1 = (r0 + rows).min(r4);
                tasks.push(Task::Packed {
                    part: p,
                    w,
                    r0,
                    r1,
                    groups: [a, b, c, d],
                });
                r0 = r1;
            }
        }
    }
    let bad = util::parallel_map(tasks, threads, |task| match task {
        Task::Packed {
            part,
            w,
            r0,
            r1,
            groups,
        } => {
            let lin = parts[part].1;
            ternary::hf_rows_to_words(w.bytes, lin.out, lin.inp, r0, r1, groups).map(|at| (part, at))
        }
        Task::Latent { w, inp, s, r0, words } => {
            let mut x = vec![0f32; inp];
            let mut t = vec![0i8; inp];
            for (k, row) in words.chunks_mut(inp / 16).enumerate() {
                w.read_f32((r0 + k) * inp, &mut x);
                for (tv, xv) in t.iter_mut().zip(&x) {
                    *tv = (xv * s).round_ties_even().clamp(-1.0, 1.0) as i8;
                }
                ternary::pack_row_into(&t, row);
            }
            None
        }
    });
    // The first invalid code of the first projection that has one: the element the per-element
    // conversion would have stopped at.
    if let Some((part, (r, c))) = bad.into_iter().flatten().min() {
        return Err(EngineError::tensor(
            parts[part].0.name,
            format!("holds code 3 at row {r} col {c}; valid codes are 0,1,2"),
        ));
    }
    Ok(parts
        .iter()
        .zip(words)
        .enumerate()
        .map(|(p, ((_, lin), words))| TernaryLinear {
            out: lin.out,
            inp: lin.inp,
            words,
            scale: if online { 1.0 / inv[p] } else { lin.scale },
        })
        .collect())
}
