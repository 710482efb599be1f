// The register-tiled f32 GEMM shared by matmul_ternary_backward, lm_head_tiled and lm_head_backward
// (prepended to them by shaders/src/lib.rs, after common.wgsl): C[T, N] = A[T, K] . B[K, N], one
// 128-token x 128-column block of C per 256-thread workgroup, K walked in slices of GEMM_BK staged in
// workgroup memory.
//
// WGSL has no includes or generics, so the body calls what the kernel defines by name:
//   fn gemm_a(t: u32, k: u32) -> vec4<f32>  A[t, k..k+4]; zero past the edges
//   const GEMM_B_K: bool                    true: gemm_b's four values run along k, false: along n
//   fn gemm_b(k: u32, n: u32) -> vec4<f32>  B[k..k+4, n] (or B[k, n..n+4]); zero past the edges
//   fn gemm_store(t: u32, n: u32, v: vec4<f32>)  C[t, n..n+4] = v; t and n may lie past the edges
// (each run of four starts at a multiple of 4), and calls gemm_tile(t0, n0, K, lid) from its
// entry point, in uniform control flow (it has barriers). A is read along k in all three (rows of dy,
// hidden states, dlogits); B along n (the ternary weights, the head in the backward) or along k (the head
// in lm_head_tiled, where B is its transpose).
//
// Each thread of the 16 x 16 keeps 8 tokens x 8 columns of sums: tokens 4ty..4ty+3 and 64+4ty..64+4ty+3,
// columns 4tx..4tx+3 and 64+4tx..64+4tx+3, so both operands are read back from workgroup memory as vec4
// (four 16-byte loads per 64 multiply-adds), as matmul_ternary_tiled does with integers. The copies this
// replaces, one per kernel, took a 64 x 64 block with 4 x 4 sums per thread and read eight scalars per 16
// multiply-adds (8x the load instructions per multiply-add; matmul_ternary_tiled's 64 x 64 version was
// bound by exactly those loads), and read each operand once per 64 rows of the other. 128 x 128 leaves
// enough workgroups on the shapes that matter: the head's backward (N = C = 2560) at T = 2048 tokens is 20
// x 16 = 320 workgroups, the ternary backward (N = I up to 6912) 54 x 16, and lm_head_tiled's N is a
// vocabulary tile; at a few hundred tokens the head's backward gets fewer workgroups than an H200 has SMs
// (80 at T = 512), where 64 x 64 gave it four times as many. The sums are 16 named vec4: an indexed array
// would live in local memory on NVIDIA (naga's bounds checks keep the driver from promoting it; measured
// 10x slower). Each output sums k in order, as the CPU twins do.

const GEMM_BK: u32 = 16u;  // k per staged slice
const GEMM_CS: u32 = 33u;  // vec4 stride of one k row of a staged slice: 32 vec4 (128 values) + 1 of pad

// [GEMM_BK][GEMM_CS]: element kk * GEMM_CS + c holds A[t0 + 4c..4c+4, k0 + kk], or B[k0 + kk, n0 + 4c..4c+4].
var<workgroup> gemm_as: array<vec4<f32>, 528>;
var<workgroup> gemm_bs: array<vec4<f32>, 528>;

fn gemm_tile(t0: u32, n0: u32, kn: u32, lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    var a00 = vec4<f32>(0.0);
    var a01 = vec4<f32>(0.0);
    var a10 = vec4<f32>(0.0);
    var a11 = vec4<f32>(0.0);
    var a20 = vec4<f32>(0.0);
    var a21 = vec4<f32>(0.0);
    var a30 = vec4<f32>(0.0);
    var a31 = vec4<f32>(0.0);
    var a40 = vec4<f32>(0.0);
    var a41 = vec4<f32>(0.0);
    var a50 = vec4<f32>(0.0);
    var a51 = vec4<f32>(0.0);
    var a60 = vec4<f32>(0.0);
    var a61 = vec4<f32>(0.0);
    var a70 = vec4<f32>(0.0);
    var a71 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < kn; k0 += GEMM_BK) {
        // Stage 128 x 16 values of each operand, two vec4 per thread. Loaded along k: four neighbouring
        // lanes read 16 consecutive k of one row (64 contiguous bytes). Loaded along t or n: 32 lanes read
        // 128 consecutive values of one k row.
        for (var j = 0u; j < 2u; j++) {
            let e = lid + 256u * j;
            let m = e / 4u;
            let kq = 4u * (e % 4u);
            let kk = e / 32u;
            let c = e % 32u;
            // Four values along k (k0 + kq..kq+4 of local row m) go to four k rows of the slice. (naga
            // takes no workgroup pointers as arguments, so the two operands spell this out.)
            let va = gemm_a(t0 + m, k0 + kq);
            for (var i = 0u; i < 4u; i++) {
                gemm_as[(kq + i) * GEMM_CS + m / 4u][m % 4u] = va[i];
            }
            if GEMM_B_K {
                let vb = gemm_b(k0 + kq, n0 + m);
                for (var i = 0u; i < 4u; i++) {
                    gemm_bs[(kq + i) * GEMM_CS + m / 4u][m % 4u] = vb[i];
                }
            } else {
                gemm_bs[kk * GEMM_CS + c] = gemm_b(k0 + kk, n0 + 4u * c);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < GEMM_BK; kk++) {
            let b0 = gemm_bs[kk * GEMM_CS + tx];
            let b1 = gemm_bs[kk * GEMM_CS + 16u + tx];
            let x0 = gemm_as[kk * GEMM_CS + ty];
            let x1 = gemm_as[kk * GEMM_CS + 16u + ty];
            a00 += x0.x * b0;
            a01 += x0.x * b1;
            a10 += x0.y * b0;
            a11 += x0.y * b1;
            a20 += x0.z * b0;
            a21 += x0.z * b1;
            a30 += x0.w * b0;
            a31 += x0.w * b1;
            a40 += x1.x * b0;
            a41 += x1.x * b1;
            a50 += x1.y * b0;
            a51 += x1.y * b1;
            a60 += x1.z * b0;
            a61 += x1.z * b1;
            a70 += x1.w * b0;
            a71 += x1.w * b1;
        }
        workgroupBarrier();
    }
    let t = t0 + 4u * ty;
    let n = n0 + 4u * tx;
    gemm_store(t, n, a00);
    gemm_store(t, n + 64u, a01);
    gemm_store(t + 1u, n, a10);
    gemm_store(t + 1u, n + 64u, a11);
    gemm_store(t + 2u, n, a20);
    gemm_store(t + 2u, n + 64u, a21);
    gemm_store(t + 3u, n, a30);
    gemm_store(t + 3u, n + 64u, a31);
    gemm_store(t + 64u, n, a40);
    gemm_store(t + 64u, n + 64u, a41);
    gemm_store(t + 65u, n, a50);
    gemm_store(t + 65u, n + 64u, a51);
    gemm_store(t + 66u, n, a60);
    gemm_store(t + 66u, n + 64u, a61);
    gemm_store(t + 67u, n, a70);
    gemm_store(t + 67u, n + 64u, a71);
}
