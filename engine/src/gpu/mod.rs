//! The wgpu backend: adapter choice, the device context with its pipeline cache, one launcher per WGSL
//! kernel (same names as `shaders/*.wgsl` and `cpu::*`), and the model forward pass.
pub mod context;
pub mod forward;
pub mod kernels;
mod params;
pub mod train;

use crate::error::{EngineError, Result};

pub use context::Gpu;

/// What `bitnode devices` prints for one adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor: u32,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub shader_f16: bool,
    pub features: Vec<String>,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    // Vulkan first everywhere, Metal on Apple, DX12 on Windows; GL lacks the compute features we need.
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    wgpu::Instance::new(desc)
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Adapters in preference order: discrete, integrated, virtual, other, CPU (lavapipe).
pub fn adapters() -> Vec<wgpu::Adapter> {
    let inst = instance();
    let mut list = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
    list.retain(|a| a.get_info().backend != wgpu::Backend::Gl);
    list.sort_by_key(|a| type_rank(a.get_info().device_type));
    list
}

pub fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    let f = a.features();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        vendor: info.vendor,
        max_buffer_size: l.max_buffer_size,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        features: f.iter_names().map(|(n, _)| n.to_string()).collect(),
    }
}

/// Resolves an adapter choice. "auto": the best hardware adapter (discrete, integrated, virtual, other),
/// `Ok(None)` when there is none. "gpu": the best adapter of any kind, software Vulkan (lavapipe) included.
/// An index or a name substring picks that adapter. `Ok(None)` also means no adapter at all.
pub fn pick_adapter(want: &str) -> Result<Option<wgpu::Adapter>> {
    let list = adapters();
    if list.is_empty() {
        return Ok(None);
    }
    if want.is_empty() || want.eq_ignore_ascii_case("auto") {
        return Ok(list
            .into_iter()
            .find(|a| a.get_info().device_type != wgpu::DeviceType::Cpu));
    }
    if want.eq_ignore_ascii_case("gpu") {
        return Ok(list.into_iter().next());
    }
    if let Ok(i) = want.parse::<usize>() {
        let n = list.len();
        return list
            .into_iter()
            .nth(i)
            .map(Some)
            .ok_or_else(|| EngineError::NoAdapter(format!("adapter index {i} does not exist ({n} adapters)")));
    }
    let w = want.to_lowercase();
    Ok(list.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&w)))
}
