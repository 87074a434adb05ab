// sparse_attention forward (attention over per-head selected keys) for qkv's CuPy backend
// (NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90; NOT YET RUN ON A GPU. Nobody may call this kernel
// correct or fast until `make gpu-check` has passed on a GPU machine.
//
// Maths (per batch b, query head h, KV head hk = h / (H / Hkv), query i): with the row's slots
// t = 0 .. S-1 holding key indices j_t (-1 = empty slot, read nothing),
//     s_t = scale * <q_i, k_{j_t}>,  o = sum_t softmax(s)_t v_{j_t},  lse = log sum_t e^{s_t}.
// The slots of a row are cut into n_splits consecutive chunks of `chunk` slots; one warp owns one
// (row, split), runs the online softmax in base 2 (scores pre-multiplied by log2(e)) over its
// chunk and writes its normalised partial output and natural-log partial lse (-inf and zeros
// for a chunk with no selected key). The host merges the splits by their lse
// (qkv.backends.cupy._sparse.merge_splits). A key selected twice is counted twice.
// Optional per-slot bias (null pointer: none): float32, read at b * b_sb + (h / bias_group) *
// b_sh + i * b_sn + t (bias_group = H / Hkv for a bias per KV head, b_sn = 0 for one per head),
// added to the slot's score (times log2 e); a slot biased by -inf is skipped like an empty one.
//
// Layouts: q (B, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv) with element strides for batch,
// head and token and a contiguous last axis; idx int64 (B, H, N, S) with element strides for
// batch, head and query (0 when a head's queries share one list) and a contiguous last axis;
// part_o (B*H*N, n_splits, Dv) and part_lse (B*H*N, n_splits) float32, contiguous. D, Dv <= 256.
//
// Grid: x = group of kWarps (row, split) pairs. Block: kWarps warps; lane l holds elements
// l, l + 32, ... of q, of the accumulator and of each gathered key and value row (coalesced), and
// each dot product is summed across the warp with shuffles. fp32 on CUDA cores (fp16 inputs are
// widened on load).

#include "common.cuh"

namespace qkv_sparse {

using qkv_common::neg_inf;
using qkv_common::to_float;
using qkv_common::warp_attend_key;

constexpr int kWarps = 4;                    // (row, split) pairs per block
constexpr int kMaxDim = 256;                 // head dims up to 256
constexpr int kPerLane = kMaxDim / 32;       // elements of a row held by one lane
constexpr float kLn2 = 0.6931471805599453f;  // log(2)
constexpr float kLog2e = 1.4426950408889634f;  // log2(e)

template <typename T>
struct Problem {
    const T* q;
    const T* k;
    const T* v;
    const long long* idx;
    const float* bias;  // null: no bias
    float* part_o;
    float* part_lse;
    int B, H, Hkv, N, S, D, Dv, chunk, n_splits;
    long long q_sb, q_sh, q_sn;
    long long k_sb, k_sh, k_sm;
    long long v_sb, v_sh, v_sm;
    long long i_sb, i_sh, i_sn;
    long long b_sb, b_sh, b_sn;
    int bias_group;
    float scale_log2;  // scale * log2(e)
};

template <typename T>
__device__ __forceinline__ void sparse_fwd(const Problem<T>& p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long part = static_cast<long long>(blockIdx.x) * kWarps + warp;  // row * n_splits + split
    const long long rows = static_cast<long long>(p.B) * p.H * p.N;
    if (part >= rows * p.n_splits) return;  // whole warps leave together
    const long long row = part / p.n_splits;  // (b * H + h) * N + i
    const int split = static_cast<int>(part % p.n_splits);
    const int i = static_cast<int>(row % p.N);
    const int h = static_cast<int>(row / p.N % p.H), b = static_cast<int>(row / p.N / p.H);
    const int hk = h / (p.H / p.Hkv);
    const T* qp = p.q + b * p.q_sb + h * p.q_sh + i * p.q_sn;
    const T* kp = p.k + b * p.k_sb + hk * p.k_sh;
    const T* vp = p.v + b * p.v_sb + hk * p.v_sh;
    const long long* ip = p.idx + b * p.i_sb + h * p.i_sh + i * p.i_sn;
    const float* bp =
        p.bias ? p.bias + b * p.b_sb + (h / p.bias_group) * p.b_sh + i * p.b_sn : nullptr;

    float qr[kPerLane], acc[kPerLane];
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        qr[c] = e < p.D ? to_float(qp[e]) * p.scale_log2 : 0.f;
        acc[c] = 0.f;
    }
    const int first = split * p.chunk;
    const int stop = min(first + p.chunk, p.S);
    float m = neg_inf(), l = 0.f;
    for (int t = first; t < stop; ++t) {
        const long long j = ip[t];  // the same slot for every lane: one broadcast load
        if (j < 0) continue;        // an empty slot reads nothing
        const float bias = bp ? bp[t] * kLog2e : 0.f;
        if (bias == neg_inf()) continue;  // a dropped slot
        warp_attend_key(qr, kp + j * p.k_sm, vp + j * p.v_sm, p.D, p.Dv, lane, m, l, acc, bias);
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;  // an empty chunk stores zeros
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        if (e < p.Dv) p.part_o[part * p.Dv + e] = acc[c] * inv;
    }
    if (lane == 0) p.part_lse[part] = l > 0.f ? (m + log2f(l)) * kLn2 : neg_inf();
}

}  // namespace qkv_sparse

// ------------------------------------------------------------------ entry points

#define QKV_SPARSE_PARAMS(T)                                                                    \
    const T *q, const T *k, const T *v, const long long *idx, const float *bias, float *part_o, \
        float *part_lse, int B, int H, int Hkv, int N, int S, int D, int Dv, int chunk,          \
        int n_splits, long long q_sb, long long q_sh, long long q_sn, long long k_sb,            \
        long long k_sh, long long k_sm, long long v_sb, long long v_sh, long long v_sm,          \
        long long i_sb, long long i_sh, long long i_sn, long long b_sb, long long b_sh,          \
        long long b_sn, int bias_group, float scale_log2

#define QKV_SPARSE_PROBLEM                                                                      \
    {q,    k,    v,    idx,  bias, part_o, part_lse, B,    H,    Hkv,  N,    S,    D,    Dv,      \
     chunk, n_splits, q_sb, q_sh, q_sn, k_sb, k_sh, k_sm, v_sb, v_sh, v_sm, i_sb, i_sh, i_sn,    \
     b_sb, b_sh, b_sn, bias_group, scale_log2}

extern "C" __global__ void __launch_bounds__(qkv_sparse::kWarps * 32)
    qkv_sparse_fwd_f16(QKV_SPARSE_PARAMS(unsigned short)) {
    const qkv_sparse::Problem<unsigned short> p = QKV_SPARSE_PROBLEM;
    qkv_sparse::sparse_fwd(p);
}

extern "C" __global__ void __launch_bounds__(qkv_sparse::kWarps * 32)
    qkv_sparse_fwd_f32(QKV_SPARSE_PARAMS(float)) {
    const qkv_sparse::Problem<float> p = QKV_SPARSE_PROBLEM;
    qkv_sparse::sparse_fwd(p);
}
