// RCMHA's relative-score attention forward, with the depth-wise causal convolutions of Q, K and V
// fused in, for qkv's CuPy backend (NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90; NOT YET RUN ON A GPU. Nobody may call this kernel
// correct or fast until the GPU tests (`make gpu-check`) have passed on a GPU machine.
//
// Maths (per batch b, query head h, KV head hk = h / (H / Hkv); m = M - N memory tokens):
//     x~_t   = sum_s w[c, s] * x[t - (K-1) + s, c]     (x[<0] = 0), for x = q (over N), k, v (over M)
//     s_ij   = scale * ( (q~_i + u_h) . k~_j + q~_i . R[h, d] + b[h, d] ),  d = i + m - j >= 0
//     o_i    = sum_{j <= i + m} softmax_j(s_ij) v~_j
// Every query sees key 0 (M >= N), so no row is empty. No N x M array exists: one block owns one
// query row and walks its visible keys in tiles of 128 (one key per thread) with an online
// softmax (running max and normaliser in registers, the tile's weights in shared memory).
//
// Layouts: q (B, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv) with element strides for batch,
// head and token and a contiguous last axis; r (H, L, D), u (H, D), b (H, Lb) and the kernels
// wq, wk (D, Kq / Kk), wv (Dv, Kv) contiguous; out (B, H, N, Dv) contiguous.
// Grid: x = query row, y = query head, z = batch. Block: 128 threads. D, Dv <= 256.
// Arithmetic: fp32 on CUDA cores (fp16 inputs widened on load), expf.

#include "common.cuh"

namespace qkv_relative {

using qkv_common::half_bits;
using qkv_common::neg_inf;
using qkv_common::store;
using qkv_common::to_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDim = 256;
constexpr int kDimsPerThread = kMaxDim / kThreads;

template <typename T>
struct Problem {
    const T* q;
    const T* k;
    const T* v;
    const T* r;
    const T* u;
    const T* b;
    const T* wq;
    const T* wk;
    const T* wv;
    T* out;
    int B, H, Hkv, N, M, D, Dv, L, Lb, Kq, Kk, Kv;
    long long q_sb, q_sh, q_sn;
    long long k_sb, k_sh, k_sm;
    long long v_sb, v_sh, v_sm;
    float scale;
};

// The max (is_max) or sum of x over the block; every thread gets the result.
__device__ __forceinline__ float block_reduce(float x, float* scratch, bool is_max) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, x, offset);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();  // the scratch is free (its last readers are done)
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    float total = scratch[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total = is_max ? fmaxf(total, scratch[w]) : total + scratch[w];
    return total;
}

// Channel c of the convolved token t: sum_s w[c, s] * x[t - (K-1) + s, c].
template <typename T>
__device__ __forceinline__ float conv_at(const T* x, long long stride, const T* w, int taps, int t,
                                         int c) {
    float acc = 0.f;
    for (int s = 0; s < taps; ++s) {
        const int src = t - (taps - 1) + s;
        if (src >= 0) acc = fmaf(to_float(w[c * taps + s]), to_float(x[src * stride + c]), acc);
    }
    return acc;
}

template <typename T>
__device__ __forceinline__ void relative_row(const Problem<T>& p) {
    __shared__ float q_position[kMaxDim];  // scale * q~_i
    __shared__ float q_content[kMaxDim];   // scale * (q~_i + u_h)
    __shared__ float weights[kThreads];
    __shared__ float scratch[kWarps];

    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.H / p.Hkv);
    const int tid = threadIdx.x;
    const int pos = i + (p.M - p.N);  // query i sits at key position i + m
    const T* qp = p.q + b * p.q_sb + h * p.q_sh;
    const T* kp = p.k + b * p.k_sb + hk * p.k_sh;
    const T* vp = p.v + b * p.v_sb + hk * p.v_sh;

    for (int d = tid; d < p.D; d += kThreads) {
        const float qt = conv_at(qp, p.q_sn, p.wq, p.Kq, i, d);
        q_position[d] = p.scale * qt;
        q_content[d] = p.scale * (qt + to_float(p.u[h * p.D + d]));
    }
    __syncthreads();

    float m_run = neg_inf(), l_run = 0.f;
    float acc[kDimsPerThread];
#pragma unroll
    for (int c = 0; c < kDimsPerThread; ++c) acc[c] = 0.f;

    for (int j0 = 0; j0 <= pos; j0 += kThreads) {
        const int j = j0 + tid;
        float s = neg_inf();
        if (j <= pos) {
            const int delta = pos - j;
            const T* rp = p.r + (static_cast<long long>(h) * p.L + delta) * p.D;
            float dot = 0.f;
            for (int d = 0; d < p.D; ++d) {
                const float kt = conv_at(kp, p.k_sm, p.wk, p.Kk, j, d);
                dot = fmaf(q_content[d], kt, dot);
                dot = fmaf(q_position[d], to_float(rp[d]), dot);
            }
            s = dot + p.scale * to_float(p.b[h * p.Lb + delta]);
        }
        const float m_new = fmaxf(m_run, block_reduce(s, scratch, true));  // key j0 is visible
        const float e = j <= pos ? expf(s - m_new) : 0.f;
        weights[tid] = e;
        const float tile_sum = block_reduce(e, scratch, false);  // its barriers publish weights
        const float alpha = expf(m_run - m_new);                // 0 on the first tile
        l_run = alpha * l_run + tile_sum;
        const int count = min(kThreads, pos + 1 - j0);
#pragma unroll
        for (int c = 0; c < kDimsPerThread; ++c) {
            const int d = tid + c * kThreads;
            if (d >= p.Dv) continue;
            float a = acc[c] * alpha;
            for (int jj = 0; jj < count; ++jj)
                a = fmaf(weights[jj], conv_at(vp, p.v_sm, p.wv, p.Kv, j0 + jj, d), a);
            acc[c] = a;
        }
        m_run = m_new;
        __syncthreads();  // every thread is done with this tile's weights
    }

    const long long base = ((static_cast<long long>(b) * p.H + h) * p.N + i) * p.Dv;
#pragma unroll
    for (int c = 0; c < kDimsPerThread; ++c) {
        const int d = tid + c * kThreads;
        if (d < p.Dv) store(p.out, base + d, acc[c] / l_run);
    }
}

}  // namespace qkv_relative

// ------------------------------------------------------------------ entry points

#define QKV_RELATIVE_PARAMS(T)                                                                   \
    const T *q, const T *k, const T *v, const T *r, const T *u, const T *b, const T *wq,          \
        const T *wk, const T *wv, T *out, int B, int H, int Hkv, int N, int M, int D, int Dv,    \
        int L, int Lb, int Kq, int Kk, int Kv, long long q_sb, long long q_sh, long long q_sn,   \
        long long k_sb, long long k_sh, long long k_sm, long long v_sb, long long v_sh,          \
        long long v_sm, float scale

#define QKV_RELATIVE_PROBLEM                                                                     \
    {q,  k,  v,  r,  u,  b,  wq, wk,   wv,   out,  B,    H,    Hkv,  N,    M,    D,    Dv,      \
     L,  Lb, Kq, Kk, Kv, q_sb, q_sh, q_sn, k_sb, k_sh, k_sm, v_sb, v_sh, v_sm, scale}

extern "C" __global__ void __launch_bounds__(qkv_relative::kThreads)
    qkv_relative_fwd_f16(QKV_RELATIVE_PARAMS(qkv_relative::half_bits)) {
    const qkv_relative::Problem<qkv_relative::half_bits> p = QKV_RELATIVE_PROBLEM;
    qkv_relative::relative_row(p);
}

extern "C" __global__ void __launch_bounds__(qkv_relative::kThreads)
    qkv_relative_fwd_f32(QKV_RELATIVE_PARAMS(float)) {
    const qkv_relative::Problem<float> p = QKV_RELATIVE_PROBLEM;
    qkv_relative::relative_row(p);
}
