// Workgroup reductions for the kernels that have a subgroup variant (rmsnorm_quant.wgsl and the fused
// rmsnorm_matmul_ternary), without subgroups: the fallback, for adapters without wgpu's SUBGROUP feature
// or when `BITNODE_SUBGROUPS=0`. reduce_subgroup.wgsl defines the same names with subgroup operations; a
// kernel is compiled with one of the two (shaders/src/lib.rs), so adapters without the feature never see
// subgroup code. Each function must be called in uniform control flow by the whole 256-thread workgroup.

// The builtins an entry point takes to know its thread: here only the flat index.
struct Lane {
    @builtin(local_invocation_index) index: u32,
}

// The thread's index in 0..256 that a kernel works with. Called first in an entry point.
fn lane_index(l: Lane) -> u32 {
    return l.index;
}

// Sum of `v` over the workgroup (the tree of wg_sum, common.wgsl).
fn reduce_sum(v: f32, lid: u32) -> f32 {
    return wg_sum(v, lid);
}

// Maximum of `v` over the workgroup.
fn reduce_max(v: f32, lid: u32) -> f32 {
    return wg_max(v, lid);
}

var<workgroup> red3: array<i32, 768>;    // [3][256]

// The sums of `v` over the `lanes` consecutive threads (a power of two dividing 256) of thread lid's group
// of threads, for every thread of the group: a tree through workgroup memory, one barrier per level. The
// caller must pass a workgroup barrier before calling it again (rmsnorm_matmul_ternary's next token
// passes several).
fn lanes_sum3(v: vec3<i32>, lid: u32, lanes: u32) -> vec3<i32> {
    let lane = lid % lanes;
    red3[lid] = v.x;
    red3[256u + lid] = v.y;
    red3[512u + lid] = v.z;
    workgroupBarrier();
    for (var off = lanes / 2u; off > 0u; off >>= 1u) {
        if lane < off {
            red3[lid] += red3[lid + off];
            red3[256u + lid] += red3[256u + lid + off];
            red3[512u + lid] += red3[512u + lid + off];
        }
        workgroupBarrier();
    }
    let first = lid - lane;
    return vec3<i32>(red3[first], red3[256u + first], red3[512u + first]);
}
