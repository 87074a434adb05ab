// Sigmoid attention forward (FlashSigmoid semantics) for qkv's CuPy backend (NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90 and NVRTC; NOT YET RUN ON A GPU. Nobody may call this
// kernel correct or fast until `make gpu-check` has passed on a GPU machine.
//
// Maths (per batch b, query head h, KV head hk = h / (H / Hkv)):
//     s_ij = scale * <q_i, k_j> + mask_ij - slope_h * |i + (M - N) - j| + bias
//     o_i  = sum_j sigmoid(s_ij) v_j                      (no row normalisation)
// where the ALiBi term is present only when `slopes` is given, and a key j is hidden (weight
// exactly 0) when j >= M, when causal and j > i + (M - N) (bottom-right alignment), or when the
// additive mask is -inf there. A row that sees no key gets o_i = 0. With no normaliser there is
// no running maximum and no rescaling: each key tile's P V is simply added to the accumulator.
//
// Layouts: q (B, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv) with element strides for batch,
// head and token and a contiguous last axis; mask: float32 additive bias with element strides for
// (B, H, N, M) (0 where an axis broadcasts) or null; slopes: float32 (H,) or null; out
// (B, H, N, Dv) contiguous.
//
// Grid: x = query tile (last-first, so long causal rows start early), y = query head, z = batch.
// Block: 128 threads as a 16 x 8 grid (ty = tid / 8, tx = tid % 8): thread (ty, tx) owns rows
// ty*TM .. ty*TM + TM - 1 of the tile, keys tx + 8c of each key tile and value dims tx + 8c of the
// output. Q, K, V and P tiles sit in shared memory as fp32 (fp16 inputs are widened on load);
// arithmetic is fp32 on CUDA cores with expf, so fp32 results match the reference to rounding.
//
// Compile-time configuration (the host passes the -D options of flash_fwd.cu's tile config;
// defaults here for stand-alone checks):
//   QKV_HEAD_DIM, QKV_VALUE_DIM         D and Dv rounded up to a multiple of 16 (<= 256)
//   QKV_SIMT_BLOCK_Q, QKV_SIMT_BLOCK_K  queries and keys per tile
//   QKV_SIMT_SMEM                       the dynamic shared memory (bytes) the host gives a block;
//                                       a static_assert fails the compile if it disagrees

#ifndef QKV_HEAD_DIM
#define QKV_HEAD_DIM 64
#endif
#ifndef QKV_VALUE_DIM
#define QKV_VALUE_DIM 64
#endif
#ifndef QKV_SIMT_BLOCK_Q
#define QKV_SIMT_BLOCK_Q 64
#endif
#ifndef QKV_SIMT_BLOCK_K
#define QKV_SIMT_BLOCK_K 64
#endif
#ifndef QKV_SIMT_SMEM
#define QKV_SIMT_SMEM 66304
#endif

#include "common.cuh"

namespace qkv_sigmoid {

using qkv_common::half_bits;
using qkv_common::kThreads;
using qkv_common::load_tile;
using qkv_common::neg_inf;
using qkv_common::require_simt_launch;
using qkv_common::SimtSmem;
using qkv_common::store;
using qkv_common::to_float;

template <typename T>
struct Problem {
    const T* q;
    const T* k;
    const T* v;
    const float* mask;    // additive bias or nullptr
    const float* slopes;  // ALiBi slopes (H,) or nullptr
    T* out;
    int B, H, Hkv, N, M, D, Dv;
    long long q_sb, q_sh, q_sn;
    long long k_sb, k_sh, k_sm;
    long long v_sb, v_sh, v_sm;
    long long m_sb, m_sh, m_sn, m_sm;
    float scale, bias;
    int causal;
};

// sigmoid(x) = 1 / (1 + e^-x) as z / (1 + z) or 1 / (1 + z), z = e^-|x| <= 1: no overflow,
// sigmoid(-inf) = 0 exactly, NaN stays NaN.
__device__ __forceinline__ float logistic(float x) {
    const float z = expf(-fabsf(x));
    return (x >= 0.f ? 1.f : z) / (1.f + z);
}

// The weight of (row, col) from the product <q_row, k_col>: 0 where the key is hidden.
template <typename T>
__device__ __forceinline__ float weight(const Problem<T>& p, int b, int h, float slope, float dot,
                                        int row, int col) {
    const int shift = p.M - p.N;  // query i sits at key position i + (M - N)
    if (row >= p.N || col >= p.M || (p.causal && col > row + shift)) return 0.f;
    float x = dot * p.scale + p.bias;
    if (p.mask != nullptr) {
        const float add = p.mask[b * p.m_sb + h * p.m_sh + row * p.m_sn + col * p.m_sm];
        if (add == neg_inf()) return 0.f;  // shields even a NaN product
        x += add;
    }
    if (p.slopes != nullptr) x -= slope * fabsf(static_cast<float>(row + shift - col));
    return logistic(x);
}

template <typename T, int DQK, int DV, int BM, int BN>
__device__ __forceinline__ void sigmoid_fwd(const Problem<T>& p) {
    static_assert(BM % 16 == 0 && BN % 8 == 0 && DV % 8 == 0, "tile sizes");
    constexpr int TM = BM / 16, TN = BN / 8, TV = DV / 8;
    typedef SimtSmem<DQK, DV, BM, BN> L;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sq = reinterpret_cast<float*>(smem);
    float* sk = sq + L::q_elems;
    float* sv = sk + L::k_elems;
    float* sp = sv + L::v_elems;
    require_simt_launch(L::bytes);

    const int n_qtiles = (p.N + BM - 1) / BM;
    const int q0 = (n_qtiles - 1 - static_cast<int>(blockIdx.x)) * BM;
    const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.H / p.Hkv);
    const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
    const T* qp = p.q + b * p.q_sb + h * p.q_sh;
    const T* kp = p.k + b * p.k_sb + hk * p.k_sh;
    const T* vp = p.v + b * p.v_sb + hk * p.v_sh;
    const float slope = p.slopes != nullptr ? p.slopes[h] : 0.f;
    int key_end = p.M;
    if (p.causal) key_end = min(p.M, q0 + min(BM, p.N - q0) + (p.M - p.N));  // last row's reach

    float acc[TM][TV];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int c = 0; c < TV; ++c) acc[i][c] = 0.f;

    load_tile<BM, DQK, L::pitch_qk>(sq, qp, p.q_sn, q0, p.N, p.D);
    for (int k0 = 0; k0 < key_end; k0 += BN) {
        load_tile<BN, DQK, L::pitch_qk>(sk, kp, p.k_sm, k0, p.M, p.D);
        load_tile<BN, DV, DV>(sv, vp, p.v_sm, k0, p.M, p.Dv);
        __syncthreads();  // Q (first time), K and V are in place

        float s[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int c = 0; c < TN; ++c) s[i][c] = 0.f;
#pragma unroll 4
        for (int d = 0; d < p.D; ++d) {
            float qv[TM], kv[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) qv[i] = sq[(ty * TM + i) * L::pitch_qk + d];
#pragma unroll
            for (int c = 0; c < TN; ++c) kv[c] = sk[(tx + 8 * c) * L::pitch_qk + d];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int c = 0; c < TN; ++c) s[i][c] = fmaf(qv[i], kv[c], s[i][c]);
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int c = 0; c < TN; ++c)
                sp[(ty * TM + i) * L::pitch_p + tx + 8 * c] =
                    weight(p, b, h, slope, s[i][c], q0 + ty * TM + i, k0 + tx + 8 * c);
        __syncthreads();  // P is complete

#pragma unroll 4
        for (int j = 0; j < BN; ++j) {
            float pv[TM], vv[TV];
#pragma unroll
            for (int i = 0; i < TM; ++i) pv[i] = sp[(ty * TM + i) * L::pitch_p + j];
#pragma unroll
            for (int c = 0; c < TV; ++c) vv[c] = sv[j * DV + tx + 8 * c];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int c = 0; c < TV; ++c) acc[i][c] = fmaf(pv[i], vv[c], acc[i][c]);
        }
        __syncthreads();  // every thread is done with K, V and P before the next tile
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = q0 + ty * TM + i;
        if (row >= p.N) continue;
        const long long base = ((static_cast<long long>(b) * p.H + h) * p.N + row) * p.Dv;
#pragma unroll
        for (int c = 0; c < TV; ++c) {
            const int col = tx + 8 * c;
            if (col < p.Dv) store(p.out, base + col, acc[i][c]);
        }
    }
}

}  // namespace qkv_sigmoid

// ------------------------------------------------------------------ entry points

#define QKV_SIGMOID_PARAMS(T)                                                                  \
    const T *q, const T *k, const T *v, const float *mask, const float *slopes, T *out, int B,  \
        int H, int Hkv, int N, int M, int D, int Dv, long long q_sb, long long q_sh,             \
        long long q_sn, long long k_sb, long long k_sh, long long k_sm, long long v_sb,          \
        long long v_sh, long long v_sm, long long m_sb, long long m_sh, long long m_sn,          \
        long long m_sm, float scale, float bias, int causal

#define QKV_SIGMOID_PROBLEM                                                                    \
    {q,    k,    v,    mask, slopes, out,  B,    H,    Hkv,  N,     M,    D,     Dv, q_sb, q_sh, \
     q_sn, k_sb, k_sh, k_sm, v_sb,   v_sh, v_sm, m_sb, m_sh, m_sn, m_sm, scale, bias, causal}

static_assert(qkv_sigmoid::SimtSmem<QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                                QKV_SIMT_BLOCK_K>::bytes == QKV_SIMT_SMEM,
              "host and kernel disagree on the sigmoid kernel's shared memory");

extern "C" __global__ void __launch_bounds__(qkv_sigmoid::kThreads)
    qkv_sigmoid_fwd_f16(QKV_SIGMOID_PARAMS(unsigned short)) {
    const qkv_sigmoid::Problem<unsigned short> p = QKV_SIGMOID_PROBLEM;
    qkv_sigmoid::sigmoid_fwd<unsigned short, QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                             QKV_SIMT_BLOCK_K>(p);
}

extern "C" __global__ void __launch_bounds__(qkv_sigmoid::kThreads)
    qkv_sigmoid_fwd_f32(QKV_SIGMOID_PARAMS(float)) {
    const qkv_sigmoid::Problem<float> p = QKV_SIGMOID_PROBLEM;
    qkv_sigmoid::sigmoid_fwd<float, QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                             QKV_SIMT_BLOCK_K>(p);
}
