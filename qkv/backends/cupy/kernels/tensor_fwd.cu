// Exact tensor (Kronecker) attention forward for qkv's CuPy backend (NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90; NOT YET RUN ON A GPU. Nobody may call this kernel
// correct or fast until `make gpu-check` has passed on a GPU machine.
//
// Maths (Alman and Song, arXiv 2310.04064; per batch b, query head h, KV head
// hk = h / (H / Hkv)):
//     s_aij = scale * sum_l q_al k1_il k2_jl
//     o_a   = sum_{i,j} softmax_{(i,j)}(s_a) (v1_i * v2_j)          (elementwise product)
// computed as a streaming online softmax over all M^2 pairs, with no N x M^2 array: for a tile
// of second keys j (K2 and V2 tiles in shared memory) and each first key i, the tile's scores are
// (q * k1_i) k2_j^T and its values factor as sum_j p_aij v1_i * v2_j = v1_i * (P V2)_a. In base 2
// (x = log2(e) s):
//     m' = max(m, max_j x),  alpha = 2^(m - m'),  p = 2^(x - m'),
//     l' = alpha l + sum_j p,  acc' = alpha acc + v1_i * (P V2)
// and o = acc / l at the end. There is no mask: every row sees all M^2 pairs, so l > 0.
//
// Layouts: q (B, H, N, D), k1 and k2 (B, Hkv, M, D), v1 and v2 (B, Hkv, M, Dv) with element
// strides for batch, head and token and a contiguous last axis; out (B, H, N, Dv) contiguous.
//
// Grid: x = query tile, y = query head, z = batch. Block: 128 threads as a 16 x 8 grid
// (ty = tid / 8, tx = tid % 8): thread (ty, tx) owns rows ty*TM .. ty*TM + TM - 1 of the tile,
// second keys tx + 8c of each key tile and value dims tx + 8c of the output. The 8 threads of a
// row are 8 consecutive lanes of one warp, so row maxima and sums are warp shuffles. Q, K2, V2
// and P tiles sit in shared memory as fp32 (fp16 inputs are widened on load); k1_i and v1_i are
// read from global memory (the same address for the whole block). Arithmetic is fp32 on CUDA
// cores.
//
// Compile-time configuration: the host passes the -D options of the flash kernels' tile config
// (`_launch.tile_config`); this kernel uses the SIMT ones. Defaults here for stand-alone checks:
//   QKV_HEAD_DIM, QKV_VALUE_DIM         D and Dv rounded up to a multiple of 16 (<= 256)
//   QKV_SIMT_BLOCK_Q, QKV_SIMT_BLOCK_K  queries and second keys per tile
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

namespace qkv_tensor {

using qkv_common::half_bits;
using qkv_common::kThreads;
using qkv_common::load_tile;
using qkv_common::neg_inf;
using qkv_common::require_simt_launch;
using qkv_common::SimtSmem;
using qkv_common::store;
using qkv_common::to_float;

constexpr unsigned kFullWarp = 0xffffffffu;

template <typename T>
struct Problem {
    const T* q;
    const T* k1;
    const T* k2;
    const T* v1;
    const T* v2;
    T* out;
    int B, H, Hkv, N, M, D, Dv;
    long long q_sb, q_sh, q_sn;
    long long k1_sb, k1_sh, k1_sm;
    long long k2_sb, k2_sh, k2_sm;
    long long v1_sb, v1_sh, v1_sm;
    long long v2_sb, v2_sh, v2_sm;
    float scale_log2;  // scale * log2(e)
};

// Max and sum over the 8 lanes of one row (consecutive lanes 8t .. 8t + 7 of a warp).
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
    for (int offset = 4; offset > 0; offset >>= 1)
        x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, offset));
    return x;
}
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int offset = 4; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullWarp, x, offset);
    return x;
}

template <typename T, int DQK, int DV, int BM, int BN>
__device__ __forceinline__ void tensor_fwd(const Problem<T>& p) {
    static_assert(BM % 16 == 0 && BN % 8 == 0 && DV % 8 == 0, "tile sizes");
    constexpr int TM = BM / 16, TN = BN / 8, TV = DV / 8;
    typedef SimtSmem<DQK, DV, BM, BN> L;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sq = reinterpret_cast<float*>(smem);
    float* sk = sq + L::q_elems;
    float* sv = sk + L::k_elems;
    float* sp = sv + L::v_elems;
    require_simt_launch(L::bytes);

    const int q0 = static_cast<int>(blockIdx.x) * BM;
    const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.H / p.Hkv);
    const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
    const T* qp = p.q + b * p.q_sb + h * p.q_sh;
    const T* k1p = p.k1 + b * p.k1_sb + hk * p.k1_sh;
    const T* k2p = p.k2 + b * p.k2_sb + hk * p.k2_sh;
    const T* v1p = p.v1 + b * p.v1_sb + hk * p.v1_sh;
    const T* v2p = p.v2 + b * p.v2_sb + hk * p.v2_sh;

    float acc[TM][TV], m[TM], l[TM];
#pragma unroll
    for (int r = 0; r < TM; ++r) {
        m[r] = neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < TV; ++c) acc[r][c] = 0.f;
    }

    load_tile<BM, DQK, L::pitch_qk>(sq, qp, p.q_sn, q0, p.N, p.D);
    for (int k0 = 0; k0 < p.M; k0 += BN) {
        load_tile<BN, DQK, L::pitch_qk>(sk, k2p, p.k2_sm, k0, p.M, p.D);
        load_tile<BN, DV, DV>(sv, v2p, p.v2_sm, k0, p.M, p.Dv);
        __syncthreads();  // Q (first time), K2 and V2 are in place

        for (int i = 0; i < p.M; ++i) {
            const T* k1i = k1p + i * p.k1_sm;
            const T* v1i = v1p + i * p.v1_sm;
            float s[TM][TN];  // scores (q * k1_i) k2_j^T
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int c = 0; c < TN; ++c) s[r][c] = 0.f;
#pragma unroll 4
            for (int d = 0; d < p.D; ++d) {
                const float key = to_float(k1i[d]);
                float qv[TM], kv[TN];
#pragma unroll
                for (int r = 0; r < TM; ++r) qv[r] = sq[(ty * TM + r) * L::pitch_qk + d] * key;
#pragma unroll
                for (int c = 0; c < TN; ++c) kv[c] = sk[(tx + 8 * c) * L::pitch_qk + d];
#pragma unroll
                for (int r = 0; r < TM; ++r)
#pragma unroll
                    for (int c = 0; c < TN; ++c) s[r][c] = fmaf(qv[r], kv[c], s[r][c]);
            }
            float alpha[TM];
#pragma unroll
            for (int r = 0; r < TM; ++r) {
                float top = neg_inf();
#pragma unroll
                for (int c = 0; c < TN; ++c) {
                    s[r][c] = k0 + tx + 8 * c < p.M ? s[r][c] * p.scale_log2 : neg_inf();
                    top = fmaxf(top, s[r][c]);
                }
                const float m_new = fmaxf(m[r], row_max(top));
                alpha[r] = exp2f(m[r] - m_new);  // 0 on a row's first step
                m[r] = m_new;
            }
            __syncthreads();  // every thread is done reading the previous P
            float total[TM];
#pragma unroll
            for (int r = 0; r < TM; ++r) {
                total[r] = 0.f;
#pragma unroll
                for (int c = 0; c < TN; ++c) {
                    const float e = exp2f(s[r][c] - m[r]);
                    sp[(ty * TM + r) * L::pitch_p + tx + 8 * c] = e;
                    total[r] += e;
                }
                l[r] = alpha[r] * l[r] + row_sum(total[r]);
            }
            __syncthreads();  // P is complete

            float pv[TM][TV];
#pragma unroll
            for (int r = 0; r < TM; ++r)
#pragma unroll
                for (int c = 0; c < TV; ++c) pv[r][c] = 0.f;
#pragma unroll 4
            for (int j = 0; j < BN; ++j) {
                float pj[TM], vj[TV];
#pragma unroll
                for (int r = 0; r < TM; ++r) pj[r] = sp[(ty * TM + r) * L::pitch_p + j];
#pragma unroll
                for (int c = 0; c < TV; ++c) vj[c] = sv[j * DV + tx + 8 * c];
#pragma unroll
                for (int r = 0; r < TM; ++r)
#pragma unroll
                    for (int c = 0; c < TV; ++c) pv[r][c] = fmaf(pj[r], vj[c], pv[r][c]);
            }
#pragma unroll
            for (int c = 0; c < TV; ++c) {
                const int col = tx + 8 * c;
                const float value = col < p.Dv ? to_float(v1i[col]) : 0.f;
#pragma unroll
                for (int r = 0; r < TM; ++r)
                    acc[r][c] = fmaf(value, pv[r][c], alpha[r] * acc[r][c]);  // v1_i * (P V2)
            }
        }
        __syncthreads();  // every thread is done with K2, V2 and P before the next tile
    }

#pragma unroll
    for (int r = 0; r < TM; ++r) {
        const int row = q0 + ty * TM + r;
        if (row >= p.N) continue;
        const long long base = ((static_cast<long long>(b) * p.H + h) * p.N + row) * p.Dv;
        const float inv = 1.f / l[r];
#pragma unroll
        for (int c = 0; c < TV; ++c) {
            const int col = tx + 8 * c;
            if (col < p.Dv) store(p.out, base + col, acc[r][c] * inv);
        }
    }
}

}  // namespace qkv_tensor

// ------------------------------------------------------------------ entry points

#define QKV_TENSOR_PARAMS(T)                                                                   \
    const T *q, const T *k1, const T *k2, const T *v1, const T *v2, T *out, int B, int H,      \
        int Hkv, int N, int M, int D, int Dv, long long q_sb, long long q_sh, long long q_sn,   \
        long long k1_sb, long long k1_sh, long long k1_sm, long long k2_sb, long long k2_sh,    \
        long long k2_sm, long long v1_sb, long long v1_sh, long long v1_sm, long long v2_sb,    \
        long long v2_sh, long long v2_sm, float scale_log2

#define QKV_TENSOR_PROBLEM                                                                     \
    {q,     k1,    k2,    v1,    v2,    out,   B,     H,     Hkv,   N,     M,                   \
     D,     Dv,    q_sb,  q_sh,  q_sn,  k1_sb, k1_sh, k1_sm, k2_sb, k2_sh, k2_sm,               \
     v1_sb, v1_sh, v1_sm, v2_sb, v2_sh, v2_sm, scale_log2}

static_assert(qkv_tensor::SimtSmem<QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                               QKV_SIMT_BLOCK_K>::bytes == QKV_SIMT_SMEM,
              "host and kernel disagree on the tensor kernel's shared memory");

extern "C" __global__ void __launch_bounds__(qkv_tensor::kThreads)
    qkv_tensor_fwd_f16(QKV_TENSOR_PARAMS(unsigned short)) {
    const qkv_tensor::Problem<unsigned short> p = QKV_TENSOR_PROBLEM;
    qkv_tensor::tensor_fwd<unsigned short, QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                           QKV_SIMT_BLOCK_K>(p);
}

extern "C" __global__ void __launch_bounds__(qkv_tensor::kThreads)
    qkv_tensor_fwd_f32(QKV_TENSOR_PARAMS(float)) {
    const qkv_tensor::Problem<float> p = QKV_TENSOR_PROBLEM;
    qkv_tensor::tensor_fwd<float, QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                           QKV_SIMT_BLOCK_K>(p);
}
