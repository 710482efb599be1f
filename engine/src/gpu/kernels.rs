//! One launcher per WGSL kernel, named as the kernel and its CPU twin. A launcher checks shapes, builds
//! the bind group once and returns an [`Op`]; the forward pass records prepared ops, so a decode step does
//! no allocation and creates no bind groups.
use super::Gpu;
use crate::config::Activation;
use crate::error::{EngineError, Result};
use crate::model::{MappedMatrix, TernaryLinear};
use bitnode_shaders as sh;
use std::sync::Arc;

pub use super::params::*;

/// Tokens per workgroup in matmul_ternary.wgsl (its `TT`): a batched decode step of up to 16 sequences
/// reads each weight word once.
pub const TT: u32 = 16;

/// Tokens per workgroup in lm_head.wgsl (its `TT`).
pub const LM_TT: u32 = 16;

/// Tokens and output columns per workgroup of the register-tiled GEMMs: `matmul_ternary_tiled` and the f32
/// ones on gemm_tile.wgsl (`matmul_ternary_backward`, `lm_head_tiled`, `lm_head_backward`). 128 x 128 with
/// 8 x 8 sums per thread, so both operands are read from workgroup memory as vec4 (see gemm_tile.wgsl).
pub const GEMM_TILE: u32 = 128;

/// The per-submission values every kernel reads (binding 1). Mirrors `struct Step` in the shaders.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    pub t: u32,
    pub start: u32,
    pub lm_t0: u32,
    pub lm_t: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub penalty: f32,
    pub u: f32,
    /// 1: the embedding reads the token from the sampler's output (pipelined decode).
    pub feedback: u32,
    /// The KV cache slot of the chunk's sequence (continuous batching; 0 for a lone sequence).
    pub slot: u32,
    /// Rows per sequence of a training micro-batch: sequence i is rows [i*seq, (i+1)*seq), in KV cache slot
    /// i from position 0 (0: the chunk is one sequence at `slot` from `start`).
    pub seq: u32,
}

/// How many workgroups an op needs, given the chunk's token count T and the lm_head row count.
#[derive(Debug, Clone, Copy)]
pub enum Grid {
    /// (T, 1, 1)
    Tokens,
    /// (T, n, 1)
    TokensBy(u32),
    /// (n, T, 1)
    ByTokens(u32),
    /// (ceil(rows/8), ceil(T/TT), 1)
    Rows(u32),
    /// (ceil(rows/n), 1, 1)
    RowsBy(u32, u32),
    /// (ceil(rows/n), ceil(lm_t/LM_TT), 1)
    LmRows(u32, u32),
    /// (n, ceil(T/GEMM_TILE), 1): the register-tiled GEMMs (`matmul_ternary_tiled`, and gemm_tile.wgsl's
    /// `matmul_ternary_backward`), 128 tokens per workgroup
    TokenTiles(u32),
    /// (n, ceil(T/m), 1): `matmul_ternary_tiled`, m tokens per workgroup
    TokenBlocks(u32, u32),
    /// (n, ceil(lm_t/GEMM_TILE), 1): the same over a head chunk (`lm_head_tiled`, `lm_head_backward`)
    LmTiles(u32),
    /// (lm_t, 1, 1)
    LmTokens,
    /// (1, 1, 1)
    One,
    /// (x, y, 1) regardless of T
    Fixed(u32, u32),
    /// (ceil(n / m), ceil(T / m), 1): blocks of m x m (n, tokens)
    Blocks(u32, u32),
    /// (n, lm_t, 1): per-chunk work on each logits row
    ByLm(u32),
}

impl Grid {
    pub fn dims(&self, t: u32, lm_t: u32) -> (u32, u32, u32) {
        match *self {
            Grid::Tokens => (t, 1, 1),
            Grid::TokensBy(n) => (t, n, 1),
            Grid::ByTokens(n) => (n, t, 1),
            Grid::Rows(r) => (r.div_ceil(8), t.div_ceil(TT), 1),
            Grid::RowsBy(r, n) => (r.div_ceil(n), 1, 1),
            Grid::LmRows(r, n) => (r.div_ceil(n), lm_t.div_ceil(LM_TT), 1),
            Grid::TokenTiles(n) => (n, t.div_ceil(GEMM_TILE), 1),
            Grid::TokenBlocks(n, m) => (n, t.div_ceil(m), 1),
            Grid::LmTiles(n) => (n, lm_t.div_ceil(GEMM_TILE), 1),
            Grid::LmTokens => (lm_t, 1, 1),
            Grid::One => (1, 1, 1),
            Grid::Fixed(x, y) => (x, y, 1),
            Grid::Blocks(n, m) => (n.div_ceil(m), t.div_ceil(m), 1),
            Grid::ByLm(n) => (n, lm_t, 1),
        }
    }
}

pub struct Op {
    pub name: &'static str,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind: wgpu::BindGroup,
    pub grid: Grid,
    /// The op's parameter block (bound at binding 0).
    params: wgpu::Buffer,
}

impl Op {
    /// Rewrites the parameter block (ops recorded once and reused with new scalars, as AdamW each step):
    /// `params` is the op's `*Params` struct.
    pub fn set_params<P: bytemuck::Pod>(&self, queue: &wgpu::Queue, params: &P) {
        queue.write_buffer(&self.params, 0, bytemuck::bytes_of(params));
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>, t: u32, lm_t: u32) {
        let (x, y, z) = self.grid.dims(t, lm_t);
        if x == 0 || y == 0 || z == 0 {
            return;
        }
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        pass.dispatch_workgroups(x, y, z);
    }
}

/// (kernel, dispatches, total GPU microseconds).
pub type KernelTime = (String, usize, f64);

/// One step of work to time: a dispatch with its token counts (T, lm_t), or a buffer copy between them.
pub enum Timed<'a> {
    Op(&'a Op, u32, u32),
    Copy(&'a wgpu::Buffer, &'a wgpu::Buffer, u64),
}

/// GPU time per kernel: runs `items` in order with every dispatch in its own timestamped pass (so the
/// total runs above the normal time, where dispatches overlap), in submissions of at most 2048 dispatches
/// (a query set holds 4096 timestamps). Returns (kernel, dispatches, microseconds) by total time, and the
/// number of dispatches. Used by `bench infer --profile` and `BITNODE_TRAIN_PROFILE`.
pub fn time_dispatches(gpu: &Gpu, items: &[Timed<'_>]) -> Result<(Vec<KernelTime>, usize)> {
    let period = gpu.queue.get_timestamp_period() as f64 / 1000.0;
    let mut by: Vec<KernelTime> = vec![];
    let mut dispatches = 0;
    let mut rest = items;
    while !rest.is_empty() {
        let (mut n, mut cut) = (0u32, 0);
        while cut < rest.len() && n < 2048 {
            n += matches!(rest[cut], Timed::Op(..)) as u32;
            cut += 1;
        }
        let (batch, tail) = rest.split_at(cut);
        rest = tail;
        let qs = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * n.max(1),
        });
        let size = 16 * n.max(1) as u64;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile"),
            size,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile-read"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let mut names = vec![];
        for it in batch {
            match it {
                Timed::Copy(src, dst, b) => enc.copy_buffer_to_buffer(src, 0, dst, 0, *b),
                Timed::Op(op, t, lm_t) => {
                    let i = names.len() as u32;
                    let mut p = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: &qs,
                            beginning_of_pass_write_index: Some(2 * i),
                            end_of_pass_write_index: Some(2 * i + 1),
                        }),
                    });
                    op.record(&mut p, *t, *lm_t);
                    names.push(op.name);
                }
            }
        }
        if n > 0 {
            enc.resolve_query_set(&qs, 0..2 * n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, size);
        }
        gpu.queue.submit([enc.finish()]);
        gpu.check_error()?;
        if n == 0 {
            continue;
        }
        let b = gpu.read(&read, size)?;
        let ticks: &[u64] = bytemuck::cast_slice(&b);
        for (i, name) in names.iter().enumerate() {
            let us = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
            match by.iter_mut().find(|e| e.0 == *name) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += us;
                }
                None => by.push((name.to_string(), 1, us)),
            }
        }
        dispatches += names.len();
    }
    by.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok((by, dispatches))
}

/// Runs ops in one compute pass and submits (kernel tests, scoring tails).
pub fn run(gpu: &Gpu, ops: &[&Op], t: u32, lm_t: u32) {
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        for op in ops {
            op.record(&mut pass, t, lm_t);
        }
    }
    gpu.queue.submit([enc.finish()]);
}

/// One op of entry point `name` in `src`: `params` (the kernel's `*Params` struct) at binding 0, `step` at
/// binding 1, `bufs` at theirs.
#[allow(clippy::too_many_arguments)]
fn op<P: bytemuck::Pod>(
    gpu: &Gpu,
    name: &'static str,
    src: &str,
    consts: &[(&str, f64)],
    params: &P,
    bufs: &[(u32, &wgpu::Buffer)],
    step: &wgpu::Buffer,
    grid: Grid,
) -> Op {
    let pipeline = gpu.pipeline(src, name, consts);
    let pbuf = gpu.uniform(name, bytemuck::bytes_of(params));
    let mut entries = vec![
        wgpu::BindGroupEntry {
            binding: 0,
            resource: pbuf.as_entire_binding(),
        },
        wgpu::BindGroupEntry {
            binding: 1,
            resource: step.as_entire_binding(),
        },
    ];
    for (b, buf) in bufs {
        entries.push(wgpu::BindGroupEntry {
            binding: *b,
            resource: buf.as_entire_binding(),
        });
    }
    let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(name),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    Op {
        name,
        pipeline,
        bind,
        grid,
        params: pbuf,
    }
}

/// The ops of several entry points of `src` that share one parameter block (and no overrides): each binds
/// only the buffers it uses (the pipeline layouts are derived from the shader).
fn entries<'a, P: bytemuck::Pod>(
    gpu: &'a Gpu,
    src: &'a str,
    params: P,
    step: &'a wgpu::Buffer,
) -> impl Fn(&'static str, &[(u32, &wgpu::Buffer)], Grid) -> Op + 'a {
    move |entry, bufs, grid| op(gpu, entry, src, &[], &params, bufs, step, grid)
}

/// The `F16` override of the kernels that read a full-precision matrix as f16 pairs or f32.
fn f16_const(f16: bool) -> (&'static str, f64) {
    ("F16", if f16 { 1.0 } else { 0.0 })
}

/// Rows [row0, row0+rows) of a full-precision matrix (embedding / lm_head) in one buffer.
pub struct MatrixTile {
    pub buf: wgpu::Buffer,
    pub row0: u32,
    pub rows: u32,
}

/// Splits a [V, C] matrix into row tiles that each fit one binding, stored as f16 pairs or f32. Each tile
/// converts and uploads in pieces (`Gpu::storage_with`), and each piece's mapped source pages are released
/// once converted, so the host holds one piece of the matrix at a time.
pub fn matrix_tiles(gpu: &Gpu, m: &MappedMatrix, f16: bool) -> Result<Vec<MatrixTile>> {
    let row_bytes = (m.cols * if f16 { 2 } else { 4 }) as u64;
    let per = (gpu.max_binding / row_bytes).max(1) as usize;
    if row_bytes > gpu.max_binding {
        return Err(EngineError::Gpu(format!(
            "one row of {} ({row_bytes} bytes) exceeds the binding limit {}",
            m.name, gpu.max_binding
        )));
    }
    let mut tiles = vec![];
    let mut r0 = 0;
    while r0 < m.rows {
        let r1 = (r0 + per).min(m.rows);
        let el = if f16 { 2 } else { 4 };
        let first = r0 * m.cols;
        let buf = gpu.storage_with(&m.name, (r1 - r0) * m.cols * el, &mut |off, piece| {
            let (e0, n) = (first + off / el, piece.len() / el);
            let cast = |e: bytemuck::PodCastError| EngineError::Gpu(format!("upload piece misaligned: {e}"));
            if f16 {
                m.fill_f16(e0, bytemuck::try_cast_slice_mut(piece).map_err(cast)?);
            } else {
                m.fill_f32(e0, bytemuck::try_cast_slice_mut(piece).map_err(cast)?);
            }
            m.release(e0, e0 + n);
            Ok(())
        })?;
        tiles.push(MatrixTile {
            buf,
            row0: r0 as u32,
            rows: (r1 - r0) as u32,
        });
        r0 = r1;
    }
    Ok(tiles)
}

/// Output rows [row0, row0+rows) of one (possibly fused) ternary projection.
pub struct TernaryTile {
    pub w: wgpu::Buffer,
    pub scales: wgpu::Buffer,
    pub row0: u32,
    pub rows: u32,
    pub words: u32,
    pub gate_up: bool,
    pub bytes: u64,
}

/// Packs projections that share an input into row tiles. Plain: the parts' rows are concatenated (q|k|v
/// becomes one output of NH*HD + 2*NKV*HD columns) with a scale per row. `gate_up`: parts are [gate, up];
/// each tile holds its gate rows then the matching up rows, for the fused relu^2 epilogue.
pub fn ternary_tiles(gpu: &Gpu, parts: &[&TernaryLinear], gate_up: bool) -> Result<Vec<TernaryTile>> {
    let inp = parts[0].inp;
    if parts.iter().any(|p| p.inp != inp) || (gate_up && (parts.len() != 2 || parts[0].out != parts[1].out)) {
        return Err(EngineError::Invalid("fused ternary parts disagree in shape".into()));
    }
    let words = inp / 16;
    let row_bytes = (words * 4) as u64 * if gate_up { 2 } else { 1 };
    if row_bytes > gpu.max_binding {
        return Err(EngineError::Gpu(format!(
            "a ternary row of {row_bytes} bytes exceeds the binding limit {}",
            gpu.max_binding
        )));
    }
    let per = (gpu.max_binding / row_bytes).max(1) as usize;
    // (part, row) for each output row
    let rows: Vec<(usize, usize)> = if gate_up {
        (0..parts[0].out).map(|r| (0, r)).collect()
    } else {
        parts
            .iter()
            .enumerate()
            .flat_map(|(pi, p)| (0..p.out).map(move |r| (pi, r)))
            .collect()
    };
    let mut tiles = vec![];
    let mut r0 = 0;
    while r0 < rows.len() {
        let r1 = (r0 + per).min(rows.len());
        let mut w: Vec<u32> = Vec::with_capacity((r1 - r0) * words * if gate_up { 2 } else { 1 });
        let mut sc: Vec<f32> = vec![];
        for &(pi, r) in &rows[r0..r1] {
            w.extend_from_slice(parts[pi].row(r));
            sc.push(parts[pi].scale);
        }
        if gate_up {
            for &(_, r) in &rows[r0..r1] {
                w.extend_from_slice(parts[1].row(r));
                sc.push(parts[1].scale);
            }
        }
        let bytes = (w.len() * 4) as u64;
        tiles.push(TernaryTile {
            w: gpu.storage_init("ternary", bytemuck::cast_slice(&w))?,
            scales: gpu.storage_init("scales", bytemuck::cast_slice(&sc))?,
            row0: r0 as u32,
            rows: (r1 - r0) as u32,
            words: words as u32,
            gate_up,
            bytes,
        });
        r0 = r1;
    }
    Ok(tiles)
}

#[allow(clippy::too_many_arguments)]
pub fn embedding(
    gpu: &Gpu,
    f16: bool,
    c: usize,
    tile: &MatrixTile,
    tokens: &wgpu::Buffer,
    sampled: &wgpu::Buffer,
    x: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "embedding",
        sh::EMBEDDING,
        &[f16_const(f16)],
        &EmbeddingParams {
            c: c as u32,
            row0: tile.row0,
            rows: tile.rows,
            ..Default::default()
        },
        &[(2, tokens), (3, &tile.buf), (4, x), (5, sampled)],
        step,
        Grid::Tokens,
    )
}

/// rmsnorm_quant.wgsl with the reductions of the device: subgroup ones where [`Gpu::subgroups`], else the
/// workgroup-barrier fallback. The fused `rmsnorm_matmul_ternary` follows the same choice, so the two
/// compute the mean square in the same order and a sequence gets the same bits alone and in a batch.
fn rmsnorm_src(gpu: &Gpu) -> &'static str {
    if gpu.subgroups() {
        sh::RMSNORM_QUANT_SUBGROUP
    } else {
        sh::RMSNORM_QUANT
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_quant(
    gpu: &Gpu,
    c: usize,
    eps: f32,
    w: &wgpu::Buffer,
    x: &wgpu::Buffer,
    q: &wgpu::Buffer,
    s: &wgpu::Buffer,
    qsum: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "rmsnorm_quant",
        rmsnorm_src(gpu),
        &[],
        &RmsnormQuantParams::new(c, eps, false),
        &[(2, w), (3, x), (4, q), (5, s), (6, qsum)],
        step,
        Grid::Tokens,
    )
}

pub fn rmsnorm(
    gpu: &Gpu,
    c: usize,
    eps: f32,
    w: &wgpu::Buffer,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "rmsnorm",
        rmsnorm_src(gpu),
        &[],
        &RmsnormQuantParams::new(c, eps, false),
        &[(2, w), (3, x), (7, y)],
        step,
        Grid::Tokens,
    )
}

/// `mode`: 0 store, 1 add into y (residual), 2 gate/up relu^2, 3 gate/up silu (tile must be gate_up; see
/// [`gated_mode`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_ternary(
    gpu: &Gpu,
    tile: &TernaryTile,
    mode: u32,
    y_off: usize,
    y_stride: usize,
    q: &wgpu::Buffer,
    s: &wgpu::Buffer,
    qsum: &wgpu::Buffer,
    y: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let grid = Grid::Rows(tile.rows);
    ternary_op(
        gpu,
        "matmul_ternary",
        grid,
        tile,
        mode,
        y_off,
        y_stride,
        [q, s, qsum, y],
        step,
        128,
    )
}

/// `matmul_ternary` (any MODE) for many tokens: the register-tiled integer GEMM (128 rows x `tm` tokens
/// per workgroup, `tm` 64 or 128), identical bits.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ternary_tiled(
    gpu: &Gpu,
    tile: &TernaryTile,
    mode: u32,
    y_off: usize,
    y_stride: usize,
    q: &wgpu::Buffer,
    s: &wgpu::Buffer,
    qsum: &wgpu::Buffer,
    y: &wgpu::Buffer,
    step: &wgpu::Buffer,
    tm: u32,
) -> Op {
    // MODE 2 takes 64 outputs (64 gate and 64 up rows) per workgroup, the others 128 rows.
    let tm = if tm == 64 { 64 } else { 128 };
    let grid = Grid::TokenBlocks(tile.rows.div_ceil(if mode >= 2 { 64 } else { 128 }), tm);
    ternary_op(
        gpu,
        "matmul_ternary_tiled",
        grid,
        tile,
        mode,
        y_off,
        y_stride,
        [q, s, qsum, y],
        step,
        tm,
    )
}

/// The two entry points of matmul_ternary.wgsl share parameters and bindings; only the grid differs.
#[allow(clippy::too_many_arguments)]
fn ternary_op(
    gpu: &Gpu,
    entry: &'static str,
    grid: Grid,
    tile: &TernaryTile,
    mode: u32,
    y_off: usize,
    y_stride: usize,
    [q, s, qsum, y]: [&wgpu::Buffer; 4],
    step: &wgpu::Buffer,
    tm: u32,
) -> Op {
    op(
        gpu,
        entry,
        sh::MATMUL_TERNARY,
        // ML sizes matmul_ternary's workgroup, TM the tiled kernel's token block; each entry point
        // ignores the other's.
        &[("MODE", mode as f64), ("ML", mt_lanes() as f64), ("TM", tm as f64)],
        &MatmulTernaryParams::new(tile, y_off, y_stride, 0.0),
        &[(2, &tile.w), (3, &tile.scales), (4, q), (5, s), (6, qsum), (7, y)],
        step,
        grid,
    )
}

/// Lanes per weight row in matmul_ternary (its `ML`): 32 unless `BITNODE_MT_LANES` (8, 16 or 32) says
/// otherwise. Measured on an H200 (BENCHMARKS.md), a 16-row batched step's projections took 5.3 ms at
/// 8 lanes, 3.7 at 16 and 3.1 at 32: more loads in flight per row beat sharing activation loads.
pub fn mt_lanes() -> u32 {
    std::env::var("BITNODE_MT_LANES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|l| [8, 16, 32].contains(l))
        .unwrap_or(32)
}

/// Widest input the fused decode kernel holds in workgroup memory (its `xq_s` is 2048 words).
pub const FUSED_MAX_INPUT: usize = 8192;

/// Decode-step fusion of `rmsnorm_quant` and `matmul_ternary`: normalises each row of `x` [T, I] with `nw`,
/// quantizes it and projects it into `y` [T, y_stride], in one dispatch. Same modes as `matmul_ternary`.
/// T is 1 for one sequence, or one row per sequence of a batch step. `rows`: weight rows per workgroup, a
/// power of two up to 32 ([`fused_rows`] for the model; tests vary it, since it decides whether a row's
/// lanes fit in a subgroup).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_matmul_ternary(
    gpu: &Gpu,
    tile: &TernaryTile,
    mode: u32,
    rows: u32,
    eps: f32,
    x: &wgpu::Buffer,
    nw: &wgpu::Buffer,
    y: &wgpu::Buffer,
    y_stride: usize,
    step: &wgpu::Buffer,
) -> Op {
    debug_assert!(rows.is_power_of_two() && rows <= 32, "rows per workgroup {rows}");
    // The subgroup variant where the device has subgroups (3 workgroup barriers per token instead of ~24;
    // see Gpu::with_subgroups), the same choice as rmsnorm_quant's.
    let src = if gpu.subgroups() {
        sh::MATMUL_TERNARY_SUBGROUP
    } else {
        sh::MATMUL_TERNARY
    };
    op(
        gpu,
        "rmsnorm_matmul_ternary",
        src,
        &[("MODE", mode as f64), ("ROWS", rows as f64)],
        &MatmulTernaryParams::new(tile, 0, y_stride, eps),
        &[(2, &tile.w), (3, &tile.scales), (7, y), (8, x), (9, nw)],
        step,
        Grid::RowsBy(tile.rows, rows),
    )
}

/// Rows per workgroup of the fused decode projection: 16 unless `BITNODE_FUSED_ROWS` (1, 2, 4, ..., 32)
/// says otherwise (a tuning knob for `bench infer`).
pub fn fused_rows() -> u32 {
    // 16 measured fastest on an H200 (BENCHMARKS.md): 8 -> 243, 16 -> 270, 32 -> 254 tok/s on 2B-4T.
    std::env::var("BITNODE_FUSED_ROWS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|r| r.is_power_of_two() && *r <= 32)
        .unwrap_or(16)
}

#[allow(clippy::too_many_arguments)]
pub fn rope(
    gpu: &Gpu,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    cos: &wgpu::Buffer,
    sin: &wgpu::Buffer,
    qkv: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, cos), (3, sin), (4, qkv), (5, kc), (6, vc)];
    rope_op(gpu, "rope", nh, nkv, hd, cap, &bufs, step)
}

#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    qkv: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, qkv), (3, kc), (4, vc), (5, out)];
    attention_op(gpu, "attention", nh, nkv, hd, cap, &bufs, step)
}

/// `rope` for a batch step: row t sits at its own (slot, position) in `rows` ([T] u32 pairs), so every row
/// may belong to a different sequence. CPU twin: `cpu::rope_rows`.
#[allow(clippy::too_many_arguments)]
pub fn rope_rows(
    gpu: &Gpu,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    cos: &wgpu::Buffer,
    sin: &wgpu::Buffer,
    qkv: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    rows: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, cos), (3, sin), (4, qkv), (5, kc), (6, vc), (7, rows)];
    rope_op(gpu, "rope_rows", nh, nkv, hd, cap, &bufs, step)
}

/// `attention` for a batch step: query row t attends to positions 0..=pos of its own slot, (slot, pos)
/// from `rows`. CPU twin: `cpu::attention_rows`.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    gpu: &Gpu,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    qkv: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    out: &wgpu::Buffer,
    rows: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, qkv), (3, kc), (4, vc), (5, out), (11, rows)];
    attention_op(gpu, "attention_rows", nh, nkv, hd, cap, &bufs, step)
}

/// `rope` and `rope_rows`: the same parameters and grid, one more binding for the batch form.
#[allow(clippy::too_many_arguments)]
fn rope_op(
    gpu: &Gpu,
    entry: &'static str,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    bufs: &[(u32, &wgpu::Buffer)],
    step: &wgpu::Buffer,
) -> Op {
    let pr = RopeParams::new(nh, nkv, hd, cap);
    op(
        gpu,
        entry,
        sh::ROPE,
        &[],
        &pr,
        bufs,
        step,
        Grid::TokensBy((nh + nkv) as u32),
    )
}

/// `attention` and `attention_rows`: the same parameters and grid, one more binding for the batch form.
#[allow(clippy::too_many_arguments)]
fn attention_op(
    gpu: &Gpu,
    entry: &'static str,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    bufs: &[(u32, &wgpu::Buffer)],
    step: &wgpu::Buffer,
) -> Op {
    let pr = AttentionParams::new(nh, nkv, hd, cap);
    // attend's block max and sum take subgroup operations where the device has them.
    let src = if gpu.subgroups() {
        sh::ATTENTION_SUBGROUP
    } else {
        sh::ATTENTION
    };
    op(gpu, entry, src, &[], &pr, bufs, step, Grid::ByTokens(nh as u32))
}

/// Keys per workgroup of `attention_split_rope` (its `SPLIT`).
pub const ATTENTION_SPLIT: usize = 32;

/// Bytes of the partial-result buffer `attention_split_rope` needs for a cache of `cap` positions.
pub fn attention_part_bytes(nh: usize, hd: usize, cap: usize) -> u64 {
    (nh * cap.div_ceil(ATTENTION_SPLIT) * (hd + 2) * 4) as u64
}

/// Decode-only attention in two dispatches, with RoPE folded in: per (head, 32-key chunk) partials, then
/// a per-head merge. The first rotates q and the current k itself and writes k, v into the cache, so a
/// decode layer needs no `rope` dispatch.
#[allow(clippy::too_many_arguments)]
pub fn attention_split_rope(
    gpu: &Gpu,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    cos: &wgpu::Buffer,
    sin: &wgpu::Buffer,
    qkv: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    part: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> [Op; 2] {
    let pr = AttentionParams::new(nh, nkv, hd, cap);
    let mk = entries(gpu, sh::ATTENTION, pr, step);
    let nsplit = cap.div_ceil(ATTENTION_SPLIT) as u32;
    [
        mk(
            "attention_split_rope",
            &[(2, qkv), (6, part), (7, cos), (8, sin), (9, kc), (10, vc)],
            Grid::Fixed(nh as u32, nsplit),
        ),
        mk("attention_merge", &[(5, out), (6, part)], Grid::Fixed(nh as u32, 1)),
    ]
}

#[allow(clippy::too_many_arguments)]
pub fn lm_head(
    gpu: &Gpu,
    f16: bool,
    c: usize,
    v: usize,
    tile: &MatrixTile,
    x: &wgpu::Buffer,
    logits: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let rows = lm_rows();
    op(
        gpu,
        "lm_head",
        sh::LM_HEAD,
        &[f16_const(f16), ("ROWS", rows as f64)],
        &LmHeadParams::new(c, v, tile),
        &[(2, &tile.buf), (3, x), (4, logits)],
        step,
        // Each workgroup takes 2 ROWS rows (lm_head.wgsl).
        Grid::LmRows(tile.rows, 2 * rows),
    )
}

/// Logits of the step's `lm_t` tokens from `lm_t0` for one row tile, tiled for many tokens (training, long
/// chunks). CPU twin: `cpu::lm_head`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_tiled(
    gpu: &Gpu,
    f16: bool,
    c: usize,
    v: usize,
    tile: &MatrixTile,
    x: &wgpu::Buffer,
    logits: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "lm_head_tiled",
        sh::LM_HEAD,
        &[f16_const(f16)],
        &LmHeadParams::new(c, v, tile),
        &[(2, &tile.buf), (3, x), (4, logits)],
        step,
        Grid::LmTiles(tile.rows.div_ceil(GEMM_TILE)),
    )
}

/// Rows per workgroup of lm_head: 16 unless `BITNODE_LM_ROWS` (1, 2, 4, ..., 32) says otherwise.
pub fn lm_rows() -> u32 {
    // Measured on an H200 (BENCHMARKS.md): 2 -> 507 us, 4 -> 451, 8 -> 431, 16 -> 397 us per 2B-4T step.
    std::env::var("BITNODE_LM_ROWS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|r| r.is_power_of_two() && *r <= 32)
        .unwrap_or(16)
}

pub fn nll(
    gpu: &Gpu,
    v: usize,
    logits: &wgpu::Buffer,
    targets: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "nll",
        sh::NLL,
        &[],
        &NllParams {
            v: v as u32,
            ..Default::default()
        },
        &[(2, logits), (3, targets), (4, out)],
        step,
        Grid::LmTokens,
    )
}

/// Logits per workgroup of `sample_partial` (its `CHUNK`).
pub const SAMPLE_CHUNK: usize = 4096;

/// Bytes of the partial-argmax buffer for a vocabulary of `v`.
pub fn sample_partial_bytes(v: usize) -> u64 {
    (v.div_ceil(SAMPLE_CHUNK) * 8) as u64
}

/// The sampler in two dispatches: greedy decoding first takes a per-chunk argmax over many workgroups
/// (`sample_partial`), then `sample` reduces the chunks; other settings use `sample` alone.
pub fn sample(
    gpu: &Gpu,
    v: usize,
    logits: &wgpu::Buffer,
    seen: &wgpu::Buffer,
    partial: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> [Op; 2] {
    let mk = entries(gpu, sh::SAMPLE, sampler_params(v), step);
    [
        mk(
            "sample_partial",
            &[(2, logits), (3, seen), (5, partial)],
            Grid::Fixed(v.div_ceil(SAMPLE_CHUNK) as u32, 1),
        ),
        mk("sample", &[(2, logits), (3, seen), (4, out), (5, partial)], Grid::One),
    ]
}

/// The sampler over `lm_t` logits rows at once (a batch step), each row with its own [`RowParams`]:
/// `logits` [lm_t, V], `seen` [slots, ceil(V/32)], `partial` [lm_t, ceil(V/CHUNK)], `out` [lm_t].
/// CPU twin: `cpu::sample_rows`.
#[allow(clippy::too_many_arguments)]
pub fn sample_rows(
    gpu: &Gpu,
    v: usize,
    logits: &wgpu::Buffer,
    seen: &wgpu::Buffer,
    partial: &wgpu::Buffer,
    out: &wgpu::Buffer,
    rowp: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> [Op; 2] {
    let mk = entries(gpu, sh::SAMPLE, sampler_params(v), step);
    [
        mk(
            "sample_partial_rows",
            &[(2, logits), (3, seen), (5, partial), (6, rowp)],
            Grid::ByLm(v.div_ceil(SAMPLE_CHUNK) as u32),
        ),
        mk(
            "sample_rows",
            &[(2, logits), (3, seen), (4, out), (5, partial), (6, rowp)],
            Grid::LmTokens,
        ),
    ]
}

fn sampler_params(v: usize) -> SamplerParams {
    SamplerParams {
        v: v as u32,
        ..Default::default()
    }
}

// ---- training (Engine II): backward passes, the LoRA branch, the optimizer ----

/// dx [T, C] from dy [T, C], x [T, C] and the norm weight w [C]; `accumulate` adds onto dx (where a
/// residual's gradient already sits). CPU twin: `cpu::rmsnorm_backward`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    gpu: &Gpu,
    c: usize,
    eps: f32,
    accumulate: bool,
    w: &wgpu::Buffer,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "rmsnorm_backward",
        sh::RMSNORM_QUANT,
        &[],
        &RmsnormQuantParams::new(c, eps, accumulate),
        &[(2, w), (3, x), (8, dy), (9, dx)],
        step,
        Grid::Tokens,
    )
}

/// out = relu(g)^2 * u, [T, F]. CPU twin: `cpu::relu2_mul`.
pub fn relu2_mul(
    gpu: &Gpu,
    f: usize,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    gated_op(gpu, "relu2_mul", sh::RELU2_MUL, f, &[(3, g), (4, u), (7, out)], step)
}

/// dg, du [T, F] from dout, g, u. CPU twin: `cpu::relu2_mul_backward`.
#[allow(clippy::too_many_arguments)]
pub fn relu2_mul_backward(
    gpu: &Gpu,
    f: usize,
    dout: &wgpu::Buffer,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    dg: &wgpu::Buffer,
    du: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, dout), (3, g), (4, u), (5, dg), (6, du)];
    gated_op(gpu, "relu2_mul_backward", sh::RELU2_MUL, f, &bufs, step)
}

/// out = silu(g) * u, [T, F]. CPU twin: `cpu::silu_mul`.
pub fn silu_mul(
    gpu: &Gpu,
    f: usize,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    gated_op(gpu, "silu_mul", sh::SILU_MUL, f, &[(3, g), (4, u), (7, out)], step)
}

/// dg, du [T, F] from dout, g, u. CPU twin: `cpu::silu_mul_backward`.
#[allow(clippy::too_many_arguments)]
pub fn silu_mul_backward(
    gpu: &Gpu,
    f: usize,
    dout: &wgpu::Buffer,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    dg: &wgpu::Buffer,
    du: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, dout), (3, g), (4, u), (5, dg), (6, du)];
    gated_op(gpu, "silu_mul_backward", sh::SILU_MUL, f, &bufs, step)
}

/// The model's gated MLP product `act(g) * u`: `relu2_mul` or `silu_mul` (CPU twin: `cpu::gated_mul`).
pub fn gated_mul(
    gpu: &Gpu,
    act: Activation,
    f: usize,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    match act {
        Activation::Relu2 => relu2_mul(gpu, f, g, u, out, step),
        Activation::Silu => silu_mul(gpu, f, g, u, out, step),
    }
}

/// Backward of [`gated_mul`] (CPU twin: `cpu::gated_mul_backward`).
#[allow(clippy::too_many_arguments)]
pub fn gated_mul_backward(
    gpu: &Gpu,
    act: Activation,
    f: usize,
    dout: &wgpu::Buffer,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    dg: &wgpu::Buffer,
    du: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    match act {
        Activation::Relu2 => relu2_mul_backward(gpu, f, dout, g, u, dg, du, step),
        Activation::Silu => silu_mul_backward(gpu, f, dout, g, u, dg, du, step),
    }
}

/// The `matmul_ternary` MODE of the fused gate/up projection for the model's activation: 2 writes
/// relu(gate)^2 * up, 3 writes silu(gate) * up.
pub fn gated_mode(act: Activation) -> u32 {
    match act {
        Activation::Relu2 => 2,
        Activation::Silu => 3,
    }
}

/// An entry point of relu2_mul.wgsl or silu_mul.wgsl (the same parameters and bindings) over [T, F]: 256
/// columns per workgroup.
fn gated_op(
    gpu: &Gpu,
    entry: &'static str,
    src: &'static str,
    f: usize,
    bufs: &[(u32, &wgpu::Buffer)],
    step: &wgpu::Buffer,
) -> Op {
    let pr = Relu2MulParams {
        f: f as u32,
        ..Default::default()
    };
    let grid = Grid::ByTokens((f as u32).div_ceil(256));
    op(gpu, entry, src, &[], &pr, bufs, step, grid)
}

/// dx [T, I] (+)= W_eff^T dy over one weight tile; `accumulate` for every tile after the first.
/// CPU twin: `cpu::matmul_ternary_backward`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ternary_backward(
    gpu: &Gpu,
    tile: &TernaryTile,
    dy_stride: usize,
    accumulate: bool,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "matmul_ternary_backward",
        sh::MATMUL_TERNARY_BACKWARD,
        &[],
        &MatmulTernaryBackwardParams {
            words: tile.words,
            rows: tile.rows,
            row0: tile.row0,
            dy_stride: dy_stride as u32,
            accumulate: accumulate as u32,
            ..Default::default()
        },
        &[(2, &tile.w), (3, &tile.scales), (4, dy), (5, dx)],
        step,
        Grid::TokenTiles((tile.words * 16).div_ceil(GEMM_TILE)),
    )
}

/// Shapes of one LoRA branch as the kernels see them.
#[derive(Debug, Clone, Copy)]
pub struct LoraShape {
    pub inp: usize,
    pub out: usize,
    pub rank: usize,
    pub scale: f32,
    /// Columns of the input buffer, of the output (or dy) buffer, and the first output column.
    pub x_stride: usize,
    pub y_stride: usize,
    pub y_off: usize,
}

impl LoraShape {
    fn params(&self) -> LoraParams {
        LoraParams {
            inp: self.inp as u32,
            out: self.out as u32,
            rank: self.rank as u32,
            scale: self.scale,
            x_stride: self.x_stride as u32,
            y_stride: self.y_stride as u32,
            y_off: self.y_off as u32,
            ..Default::default()
        }
    }
}

/// `h = A x`, then `y += scale * B h` (two ops). CPU twin: `cpu::lora`.
#[allow(clippy::too_many_arguments)]
pub fn lora(
    gpu: &Gpu,
    s: &LoraShape,
    x: &wgpu::Buffer,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
    h: &wgpu::Buffer,
    y: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> [Op; 2] {
    let mk = entries(gpu, sh::LORA, s.params(), step);
    let (r, o) = (s.rank as u32, s.out as u32);
    [
        mk("lora_a", &[(12, x), (13, a), (14, h)], Grid::Blocks(r, 16)),
        mk("lora_b", &[(4, b), (5, h), (6, y)], Grid::ByTokens(o.div_ceil(256))),
    ]
}

/// The four LoRA backward ops: dh, then dB, dA (accumulated) and dx (accumulated). CPU twin:
/// `cpu::lora_backward`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    gpu: &Gpu,
    s: &LoraShape,
    x: &wgpu::Buffer,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
    h: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    dh: &wgpu::Buffer,
    da: &wgpu::Buffer,
    db: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> [Op; 4] {
    let mk = entries(gpu, sh::LORA, s.params(), step);
    let (r, o, i) = (s.rank as u32, s.out as u32, s.inp as u32);
    [
        mk("lora_dh", &[(12, dy), (13, b), (14, dh)], Grid::Blocks(r, 16)),
        mk(
            "lora_db",
            &[(12, dy), (13, h), (14, db)],
            Grid::Fixed(o.div_ceil(32), 1),
        ),
        mk(
            "lora_da",
            &[(12, x), (13, dh), (14, da)],
            Grid::Fixed(i.div_ceil(32), 1),
        ),
        mk("lora_dx", &[(3, a), (8, dh), (11, dx)], Grid::ByTokens(i.div_ceil(256))),
    ]
}

/// One AdamW step over `n` parameters on `gscale * g` (bias corrections in f64 on the host, as torch does
/// in Python). CPU twin: `cpu::adamw` (on the already scaled gradient).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    gpu: &Gpu,
    n: usize,
    o: &crate::cpu::AdamW,
    lr: f64,
    t: u64,
    param: &wgpu::Buffer,
    m: &wgpu::Buffer,
    v: &wgpu::Buffer,
    g: &wgpu::Buffer,
    clip: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "adamw",
        sh::ADAMW,
        &[],
        &adamw_params(n, o, lr, t),
        &[(2, param), (3, m), (4, v), (5, g), (6, clip)],
        step,
        Grid::Fixed((n as u32).div_ceil(256), 1),
    )
}

/// The sum of squares of the `n` gradients in `g` into `sq[slot]` (one workgroup). CPU twin:
/// `cpu::grad_sq_sum`.
pub fn grad_sq_sum(gpu: &Gpu, n: usize, slot: usize, g: &wgpu::Buffer, sq: &wgpu::Buffer, step: &wgpu::Buffer) -> Op {
    // adamw's Params, with the slot's bits in `decay` (adamw.wgsl).
    let pr = AdamwParams {
        n: n as u32,
        decay: f32::from_bits(slot as u32),
        ..Default::default()
    };
    op(
        gpu,
        "grad_sq_sum",
        sh::ADAMW,
        &[],
        &pr,
        &[(5, g), (7, sq)],
        step,
        Grid::One,
    )
}

/// The global gradient norm over `tensors` per-tensor sums in `sq`, and the clipping coefficient for
/// `max_norm` (1 without), into `clip` = [coef, norm]. CPU twin: `cpu::grad_clip`.
pub fn grad_clip(
    gpu: &Gpu,
    tensors: usize,
    max_norm: Option<f32>,
    sq: &wgpu::Buffer,
    clip: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    op(
        gpu,
        "grad_clip",
        sh::ADAMW,
        &[],
        &grad_clip_params(tensors, max_norm),
        &[(6, clip), (7, sq)],
        step,
        Grid::One,
    )
}

/// `grad_clip`'s parameter block (it shares adamw's `Params`: n, max_norm in `decay`, the clip flag's bits
/// in `step_size`).
pub fn grad_clip_params(tensors: usize, max_norm: Option<f32>) -> AdamwParams {
    AdamwParams {
        n: tensors as u32,
        decay: max_norm.unwrap_or(0.0),
        step_size: f32::from_bits(max_norm.is_some() as u32),
        ..Default::default()
    }
}

/// The parameter block of `adamw` for step `t` (1-based) of `n` elements: lr and the bias corrections
/// folded into constants (the clipping coefficient comes from `grad_clip`'s buffer).
pub fn adamw_params(n: usize, o: &crate::cpu::AdamW, lr: f64, t: u64) -> AdamwParams {
    let bc1 = 1.0 - o.beta1.powi(t as i32);
    let bc2 = 1.0 - o.beta2.powi(t as i32);
    AdamwParams {
        n: n as u32,
        decay: (1.0 - lr * o.weight_decay) as f32,
        step_size: (lr / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        w1: (1.0 - o.beta1) as f32,
        b2: o.beta2 as f32,
        w2: (1.0 - o.beta2) as f32,
        eps: o.eps as f32,
        ..Default::default()
    }
}

/// dlogits [lm_t, V] from logits, targets and the per-position weights dnll. CPU twin: `cpu::nll_backward`.
pub fn nll_backward(
    gpu: &Gpu,
    v: usize,
    logits: &wgpu::Buffer,
    targets: &wgpu::Buffer,
    dnll: &wgpu::Buffer,
    dlogits: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, logits), (3, targets), (5, dnll), (6, dlogits)];
    let pr = NllParams {
        v: v as u32,
        ..Default::default()
    };
    op(gpu, "nll_backward", sh::NLL, &[], &pr, &bufs, step, Grid::LmTokens)
}

/// dx [T, C] (+)= dlogits . W over one row tile of the head; `accumulate` for tiles after the first.
/// CPU twin: `cpu::lm_head_backward`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_backward(
    gpu: &Gpu,
    f16: bool,
    c: usize,
    v: usize,
    tile: &MatrixTile,
    accumulate: bool,
    dlogits: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let pr = LmHeadBackwardParams {
        c: c as u32,
        rows: tile.rows,
        row0: tile.row0,
        v: v as u32,
        accumulate: accumulate as u32,
        ..Default::default()
    };
    let consts = [f16_const(f16)];
    let bufs = [(2, &tile.buf), (3, dlogits), (4, dx)];
    let grid = Grid::LmTiles((c as u32).div_ceil(GEMM_TILE));
    op(
        gpu,
        "lm_head_backward",
        sh::LM_HEAD_BACKWARD,
        &consts,
        &pr,
        &bufs,
        step,
        grid,
    )
}

/// In-place inverse rotation of `nh` heads stored at columns `off..` of dx [T, stride]. CPU twin:
/// `cpu::rope_backward`.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    gpu: &Gpu,
    nh: usize,
    hd: usize,
    stride: usize,
    off: usize,
    cos: &wgpu::Buffer,
    sin: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Op {
    let bufs = [(2, cos), (3, sin), (4, dx)];
    op(
        gpu,
        "rope_backward",
        sh::ROPE_BACKWARD,
        &[],
        &RopeBackwardParams {
            nh: nh as u32,
            hd: hd as u32,
            stride: stride as u32,
            off: off as u32,
        },
        &bufs,
        step,
        Grid::TokensBy(nh as u32),
    )
}

/// The two attention backward ops: dq (saving the softmax statistics), then dk and dv. q has `q_stride`
/// columns per token (it may sit inside the fused qkv buffer); K/V hold `p` positions ([NKV, P, HD]);
/// `stats` is [T, NH, 4]; the gradients land in `dqkv` [T, g_stride] as dq | dk | dv columns.
/// CPU twin: `cpu::attention_backward`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    nh: usize,
    nkv: usize,
    hd: usize,
    p: usize,
    q_stride: usize,
    g_stride: usize,
    q: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    out: &wgpu::Buffer,
    dout: &wgpu::Buffer,
    stats: &wgpu::Buffer,
    dqkv: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> [Op; 2] {
    let pr = AttentionBackwardParams {
        nh: nh as u32,
        nkv: nkv as u32,
        hd: hd as u32,
        p: p as u32,
        q_stride: q_stride as u32,
        g_stride: g_stride as u32,
        ..Default::default()
    };
    let bufs = [(2, q), (3, k), (4, v), (5, dout), (6, stats), (7, dqkv)];
    let dq_bufs = [(2, q), (3, k), (4, v), (5, dout), (6, stats), (7, dqkv), (8, out)];
    let mk = entries(gpu, sh::ATTENTION_BACKWARD, pr, step);
    [
        mk("attention_backward_dq", &dq_bufs, Grid::TokensBy(nh as u32)),
        mk("attention_backward_dkv", &bufs, Grid::TokensBy(nkv as u32)),
    ]
}
