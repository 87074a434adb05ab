// Device helpers shared by qkv's CuPy kernels (flash_fwd.cu, sigmoid_fwd.cu, tensor_fwd.cu,
// rope.cu). Each kernel includes this file with `#include "common.cuh"`: nvcc finds it next to
// the including source, and the launcher (`_launch.kernel_source`) puts its text in place of
// that line before NVRTC compiles a kernel, so CuPy's compile cache sees the header too.
//
// fp16 data is handled as raw 16-bit words and converted with PTX cvt instructions, so no CUDA
// header is needed (NVRTC compiles the sources as they are).

#ifndef QKV_COMMON_CUH
#define QKV_COMMON_CUH

namespace qkv_common {

[[maybe_unused]] constexpr int kThreads = 128;  // threads per block of the attention kernels

typedef unsigned short half_bits;  // an IEEE fp16 value, bit for bit

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float half_to_float(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_bits float_to_half(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// An input element widened to fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_bits h) { return half_to_float(h); }

// out[i] = x, rounded to the output's type.
__device__ __forceinline__ void store(float* out, long long i, float x) { out[i] = x; }
__device__ __forceinline__ void store(half_bits* out, long long i, float x) {
    out[i] = float_to_half(x);
}

// Shared memory of the fp32 (CUDA-core) kernels, in fp32 elements: Q and K tiles with an odd
// pitch (rows fall in distinct banks), the V tile, and the P tile.
template <int DQK, int DV, int BM, int BN>
struct SimtSmem {
    static constexpr int pitch_qk = DQK + 1;
    static constexpr int pitch_p = BN + 1;
    static constexpr int q_elems = BM * pitch_qk;
    static constexpr int k_elems = BN * pitch_qk;
    static constexpr int v_elems = BN * DV;
    static constexpr int p_elems = BM * pitch_p;
    static constexpr unsigned bytes = 4u * (q_elems + k_elems + v_elems + p_elems);
};

// Trap unless the block has kThreads threads along x and at least `smem_bytes` of dynamic shared
// memory (the check of sigmoid_fwd.cu and tensor_fwd.cu; flash_fwd.cu's require_launch also
// checks that the block is one-dimensional).
__device__ __forceinline__ void require_simt_launch(unsigned smem_bytes) {
    unsigned given;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < smem_bytes || blockDim.x != kThreads) asm volatile("trap;");
}

// Rows [row0, row0 + ROWS) x columns [0, COLS) of a (nrows, ncols) matrix with row stride
// `stride`, widened to fp32, into shared memory with row pitch PITCH; zeros outside the matrix.
// Synchronous loads by the kThreads threads of the block.
template <int ROWS, int COLS, int PITCH, typename T>
__device__ __forceinline__ void load_tile(float* dst, const T* src, long long stride, int row0,
                                          int nrows, int ncols) {
    for (int i = threadIdx.x; i < ROWS * COLS; i += kThreads) {
        const int r = i / COLS, c = i % COLS;
        const bool inside = row0 + r < nrows && c < ncols;
        dst[r * PITCH + c] = inside ? to_float(src[(row0 + r) * stride + c]) : 0.f;
    }
}

// ------------------------------------------------------------------ one warp per query row
// The sum of x over the 32 lanes of the warp, in every lane.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// One key of the online softmax of a warp that owns one query row: lane `lane` holds elements
// lane + 32 c of the query `qr` (pre-scaled by scale * log2 e) and of the accumulator `acc`.
// Scores the key row `krow` (D elements), then rescales (m, l, acc) and adds the value row
// `vrow` (Dv elements): m is the running max of the base-2 scores, l the running sum. `bias`
// (base 2, finite) is added to the score; callers skip a key whose bias is -inf.
template <int kPerLane, typename T>
__device__ __forceinline__ void warp_attend_key(const float (&qr)[kPerLane], const T* krow,
                                                const T* vrow, int D, int Dv, int lane, float& m,
                                                float& l, float (&acc)[kPerLane],
                                                float bias = 0.f) {
    float part = 0.f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        if (e < D) part = fmaf(qr[c], to_float(krow[e]), part);
    }
    const float s = warp_sum(part) + bias;  // every lane holds the score (base 2), biased
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new);  // 0 on the first key (m = -inf)
    const float w = exp2f(s - m_new);
    l = l * alpha + w;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        acc[c] = acc[c] * alpha + (e < Dv ? w * to_float(vrow[e]) : 0.f);
    }
    m = m_new;
}

}  // namespace qkv_common

#endif  // QKV_COMMON_CUH
