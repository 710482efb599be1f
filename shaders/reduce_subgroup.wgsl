// The functions of reduce.wgsl (same names, same results up to the order of a float sum) with subgroup
// operations, for adapters with wgpu's SUBGROUP feature (engine `Gpu::subgroups`).
//
// Why: at batch 1 a decode step is bound by per-dispatch latency, not by bandwidth. Of the ~185
// dispatches of a 2B-model step, 120 are the fused projection rmsnorm_matmul_ternary, and each of its
// workgroups passed ~24 workgroup barriers per token: 9 for the mean square (wg_sum's tree), 9 for the max,
// 1 for the staged int8 row and 5 for its lane sums. Here a reduction runs inside each subgroup without
// barriers and only the per-subgroup partials go through workgroup memory: one barrier for the sum, one
// for the max, none for the lane sums when a row's lanes fit in a subgroup, so 3 per token in all.
//
// Nothing assumes a subgroup size: any power of two from 4 to 128 (wgpu's bounds; `Gpu` checks the
// adapter's) works. Threads are numbered subgroup by subgroup (lane_index), so a subgroup always holds a
// block of consecutive indices, whatever the hardware's mapping of invocations to subgroups. That assumes
// full subgroups of one size in the workgroup, which 256 threads (a multiple of every size) get.

struct Lane {
    @builtin(subgroup_invocation_id) inv: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) id: u32,
}

var<private> sg_inv: u32;
var<private> sg_size: u32;
var<private> sg_id: u32;

// The thread's index in 0..256: subgroup id * subgroup size + index in the subgroup. Called first in an
// entry point (it records the subgroup builtins for the functions below).
fn lane_index(l: Lane) -> u32 {
    sg_inv = l.inv;
    sg_size = l.size;
    sg_id = l.id;
    return l.id * l.size + l.inv;
}

// One partial per subgroup (64 = 256 threads / the smallest subgroup, 4), in two buffers used in turn: a
// reduction writes one, passes a barrier, reads it. The reduction after it writes the other buffer, and the
// one after that, which writes the first again, comes after the barrier of the one between, which no
// thread passes before every thread has done its reads: one barrier per reduction is enough.
var<workgroup> sg_f32: array<f32, 128>;          // [2][64]
var<workgroup> sg_i32: array<vec3<i32>, 128>;    // [2][64]
var<private> sg_f32_buf: u32;
var<private> sg_i32_buf: u32;

// The pairwise tree over the subgroup's lanes (lane 2i with 2i+1, then pairs of pairs, ...) as a butterfly:
// every lane ends with the same bits, since a + b and b + a round alike.
fn sg_pairwise(v: f32) -> f32 {
    var x = v;
    for (var o = 1u; o < sg_size; o <<= 1u) {
        x += subgroupShuffleXor(x, o);
    }
    return x;
}

// The pairwise tree over b (a power of two up to 16) consecutive partials from sg_f32[start].
fn block_pairwise(start: u32, b: u32) -> f32 {
    var a: array<f32, 16>;
    for (var i = 0u; i < b; i++) {
        a[i] = sg_f32[start + i];
    }
    for (var o = 1u; o < b; o <<= 1u) {
        for (var i = 0u; i < b; i += 2u * o) {
            a[i] += a[i + o];
        }
    }
    return a[0];
}

// Sum of `v` over the workgroup, as the pairwise tree over the 256 thread indices, whatever the subgroup
// size: the size only decides which levels of the tree are shuffles and which are read from workgroup
// memory. rmsnorm_quant and rmsnorm_matmul_ternary repeat this sum and must agree bit for bit (a batch
// step runs one, a lone decode step the other), while wgpu lets the driver pick a different subgroup size
// for each pipeline; subgroupAdd, whose order is the implementation's, would not guarantee that.
fn reduce_sum(v: f32, lid: u32) -> f32 {
    let base = 64u * sg_f32_buf;
    sg_f32_buf ^= 1u;
    let s = sg_pairwise(v);
    if sg_inv == 0u {
        sg_f32[base + sg_id] = s;
    }
    workgroupBarrier();
    // The tree over the n partials: each lane takes a block of b (more than one only for subgroups under
    // 16), the butterfly joins the blocks. Lanes past the partials hold zeros, and adding a zero changes
    // no bits (but a zero's sign).
    let n = 256u / sg_size;
    let b = max(n / sg_size, 1u);
    let first = sg_inv * b;
    var x = 0.0;
    if first < n {
        if b == 1u {
            x = sg_f32[base + first];
        } else {
            x = block_pairwise(base + first, b);
        }
    }
    return sg_pairwise(x);
}

// Maximum of `v` over the workgroup (exact in any order).
fn reduce_max(v: f32, lid: u32) -> f32 {
    let base = 64u * sg_f32_buf;
    sg_f32_buf ^= 1u;
    let s = subgroupMax(v);
    if sg_inv == 0u {
        sg_f32[base + sg_id] = s;
    }
    workgroupBarrier();
    let n = 256u / sg_size;
    var m = sg_f32[base];
    for (var i = sg_inv; i < n; i += sg_size) {
        m = max(m, sg_f32[base + i]);
    }
    return subgroupMax(m);
}

// The sums of `v` over the `lanes` consecutive threads (a power of two dividing 256) of thread lid's group
// of threads, for every thread of the group (integers: exact in any order). A group that fits in a
// subgroup lies inside one, aligned, and is summed by a butterfly over its lanes with no barrier;
// otherwise each subgroup holds part of one group and its subgroupAdd goes through workgroup memory.
fn lanes_sum3(v: vec3<i32>, lid: u32, lanes: u32) -> vec3<i32> {
    if lanes <= sg_size {
        var x = v;
        for (var o = 1u; o < lanes; o <<= 1u) {
            x += subgroupShuffleXor(x, o);
        }
        return x;
    }
    let base = 64u * sg_i32_buf;
    sg_i32_buf ^= 1u;
    let s = subgroupAdd(v);
    if sg_inv == 0u {
        sg_i32[base + sg_id] = s;
    }
    workgroupBarrier();
    let per = lanes / sg_size;
    let g0 = base + (lid / lanes) * per;
    var x = vec3<i32>(0);
    for (var i = 0u; i < per; i++) {
        x += sg_i32[g0 + i];
    }
    return x;
}
