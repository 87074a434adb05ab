// Rotary position embedding for qkv's CuPy backend (compiled by NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90 and NVRTC; NOT YET RUN ON A GPU.
//
// For x (B, H, N, D) contiguous, each rotation pair (a, b) of token n in batch b is rotated by
// the angle pos * theta_i, theta_i = base^(-2i/D), i < D/2:
//     a' = a cos - b sin,    b' = a sin + b cos.
// "adjacent" pairs are (x_2i, x_2i+1); "half" pairs are (x_i, x_{i+D/2}). As in the NumPy
// reference, the angle and its cosine and sine are computed in float64 and rounded to the
// working precision (float32 for fp16 and fp32 data, float64 for fp64), and the rotation is
// done in that precision without fused multiply-adds, so the result matches the reference's
// rounding step for step.
//
// positions: int64, element (b, n) at b * pos_batch_stride + n (stride 0 for one shared row),
// or nullptr for pos = offset + n. theta: float64 (D/2,), precomputed on the host.
// One thread per rotation pair, grid-stride loop over B * H * N * D/2 pairs.

#include "common.cuh"

namespace qkv_rope {

using qkv_common::half_bits;
using qkv_common::store;  // fp16 and fp32; the fp64 overload is below

__device__ __forceinline__ float load(const half_bits* x, long long i) {
    return qkv_common::half_to_float(x[i]);
}
__device__ __forceinline__ float load(const float* x, long long i) { return x[i]; }
__device__ __forceinline__ double load(const double* x, long long i) { return x[i]; }

__device__ __forceinline__ void store(double* x, long long i, double f) { x[i] = f; }

// The rotation without contraction into FMAs: round each product, then the sum.
__device__ __forceinline__ void rotate(float a, float b, float c, float s, float& ra, float& rb) {
    ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    rb = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}
__device__ __forceinline__ void rotate(double a, double b, double c, double s, double& ra,
                                       double& rb) {
    ra = __dsub_rn(__dmul_rn(a, c), __dmul_rn(b, s));
    rb = __dadd_rn(__dmul_rn(a, s), __dmul_rn(b, c));
}

template <typename T, typename W>
__device__ __forceinline__ void rope(const T* x, T* out, const long long* positions,
                                     const double* theta, long long pos_batch_stride,
                                     long long offset, int B, int H, int N, int D,
                                     int half_pairing) {
    const int pairs = D / 2;
    const long long total = static_cast<long long>(B) * H * N * pairs;
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         idx < total; idx += step) {
        const int i = static_cast<int>(idx % pairs);
        const long long row = idx / pairs;  // (b, h, n) flattened
        const int n = static_cast<int>(row % N);
        const int b = static_cast<int>(row / (static_cast<long long>(H) * N));
        const long long pos =
            positions != nullptr ? positions[b * pos_batch_stride + n] : offset + n;
        double s, c;
        sincos(static_cast<double>(pos) * theta[i], &s, &c);
        const long long ia = row * D + (half_pairing ? i : 2 * i);
        const long long ib = row * D + (half_pairing ? i + pairs : 2 * i + 1);
        W ra, rb;
        rotate(static_cast<W>(load(x, ia)), static_cast<W>(load(x, ib)), static_cast<W>(c),
               static_cast<W>(s), ra, rb);
        store(out, ia, ra);
        store(out, ib, rb);
    }
}

}  // namespace qkv_rope

#define QKV_ROPE_PARAMS(T)                                                                     \
    const T *x, T *out, const long long *positions, const double *theta,                       \
        long long pos_batch_stride, long long offset, int B, int H, int N, int D, int half_pairing
#define QKV_ROPE_ARGS x, out, positions, theta, pos_batch_stride, offset, B, H, N, D, half_pairing

extern "C" __global__ void qkv_rope_f16(QKV_ROPE_PARAMS(unsigned short)) {
    qkv_rope::rope<unsigned short, float>(QKV_ROPE_ARGS);
}

extern "C" __global__ void qkv_rope_f32(QKV_ROPE_PARAMS(float)) {
    qkv_rope::rope<float, float>(QKV_ROPE_ARGS);
}

extern "C" __global__ void qkv_rope_f64(QKV_ROPE_PARAMS(double)) {
    qkv_rope::rope<double, double>(QKV_ROPE_ARGS);
}
