// Neighborhood attention forward (NATTEN semantics) for qkv's CuPy backend (NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90; NOT YET RUN ON A GPU. Nobody may call this kernel
// correct or fast until `make gpu-check` has passed on a GPU machine.
//
// Maths (per batch b, query head h, KV head hk = h / (H / Hkv), flat query n of a grid
// L0 x L1 x L2, missing leading axes of length 1): along each axis a the query's window is
// keys f_a + t * d_a for t < c_a, where (f_a, c_a) come from `window` below (dilation group
// g = i % d, place i / d, stride leader, window shifted inward at the borders or ending at the
// query when causal: qkv.reference.local.neighborhood_attention.axis_window). Over the product of the three
// windows,
//     s_t = scale * <q_n, k_j(t)>,  o_n = sum_t softmax(s)_t v_j(t),  lse_n = log sum_t e^{s_t}
// computed with the online softmax in base 2 (scores pre-multiplied by log2(e)); every query has
// at least one key (slot 0), so no row is empty. Nothing of size N x N exists.
//
// Layouts: q (B, H, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) with element strides for batch,
// head and token and a contiguous last axis; out (B, H, N, Dv) and lse (B, H, N) float32,
// contiguous. D, Dv <= 256.
//
// Grid: x = group of kWarps rows of the flat (b, h, n) index. Block: kWarps warps, one query per
// warp; lane l holds elements l, l + 32, ... of q, of the accumulator and of each key and value
// row it reads (coalesced), and the dot products are summed across the warp with shuffles.
// Arithmetic is fp32 on CUDA cores (fp16 inputs are widened on load).

#include "common.cuh"

namespace qkv_neighborhood {

using qkv_common::neg_inf;
using qkv_common::store;
using qkv_common::to_float;
using qkv_common::warp_attend_key;

constexpr int kWarps = 4;                      // queries per block
constexpr int kMaxDim = 256;                   // head dims up to 256
constexpr int kPerLane = kMaxDim / 32;         // elements of a row held by one lane
constexpr float kLn2 = 0.6931471805599453f;    // log(2)

template <typename T>
struct Problem {
    const T* q;
    const T* k;
    const T* v;
    T* out;
    float* lse;
    int B, H, Hkv, N, D, Dv;
    long long q_sb, q_sh, q_sn;
    long long k_sb, k_sh, k_sn;
    long long v_sb, v_sh, v_sn;
    int L0, L1, L2, k0, k1, k2, d0, d1, d2, s0, s1, s2, c0, c1, c2;
    float scale_log2;  // scale * log2(e)
};

// First key and key count of position i along one axis of length L (kernel k, dilation d,
// stride s, causal flag c).
__device__ __forceinline__ void window(int i, int L, int k, int d, int s, int c, int& first,
                                       int& count) {
    const int g = i % d, place = i / d;
    const int group_length = L / d + (g < L % d ? 1 : 0);
    if (c) {
        const int leader = min(place / s * s + s - 1, group_length - 1);
        const int lo = max(leader - k + 1, 0);
        first = lo * d + g;
        count = place - lo + 1;
    } else {
        const int leader = min(place / s * s + s / 2, group_length - 1);
        const int left = k / 2, right = k / 2 + k % 2 - 1;
        const int lo = min(max(leader, left), group_length - 1 - right) - left;
        first = lo * d + g;
        count = k;
    }
}

template <typename T>
__device__ __forceinline__ void neighborhood_fwd(const Problem<T>& p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long row = static_cast<long long>(blockIdx.x) * kWarps + warp;  // (b * H + h) * N + n
    if (row >= static_cast<long long>(p.B) * p.H * p.N) return;  // whole warps leave together
    const int n = static_cast<int>(row % p.N);
    const int h = static_cast<int>(row / p.N % p.H), b = static_cast<int>(row / p.N / p.H);
    const int hk = h / (p.H / p.Hkv);
    const T* qp = p.q + b * p.q_sb + h * p.q_sh + n * p.q_sn;
    const T* kp = p.k + b * p.k_sb + hk * p.k_sh;
    const T* vp = p.v + b * p.v_sb + hk * p.v_sh;

    float qr[kPerLane], acc[kPerLane];
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        qr[c] = e < p.D ? to_float(qp[e]) * p.scale_log2 : 0.f;
        acc[c] = 0.f;
    }
    int f0, n0, f1, n1, f2, n2;
    window(n / (p.L1 * p.L2), p.L0, p.k0, p.d0, p.s0, p.c0, f0, n0);
    window(n / p.L2 % p.L1, p.L1, p.k1, p.d1, p.s1, p.c1, f1, n1);
    window(n % p.L2, p.L2, p.k2, p.d2, p.s2, p.c2, f2, n2);

    float m = neg_inf(), l = 0.f;
    for (int t0 = 0; t0 < n0; ++t0) {
        for (int t1 = 0; t1 < n1; ++t1) {
            const long long line = (static_cast<long long>(f0 + t0 * p.d0) * p.L1 + f1 + t1 * p.d1) * p.L2 + f2;
            for (int t2 = 0; t2 < n2; ++t2) {
                const long long j = line + static_cast<long long>(t2) * p.d2;
                warp_attend_key(qr, kp + j * p.k_sn, vp + j * p.v_sn, p.D, p.Dv, lane, m, l, acc);
            }
        }
    }
    const float inv = 1.f / l;  // l >= 1: the maximum's own term
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        if (e < p.Dv) store(p.out, row * p.Dv + e, acc[c] * inv);
    }
    if (lane == 0) p.lse[row] = (m + log2f(l)) * kLn2;
}

}  // namespace qkv_neighborhood

// ------------------------------------------------------------------ entry points

#define QKV_NEIGHBORHOOD_PARAMS(T)                                                             \
    const T *q, const T *k, const T *v, T *out, float *lse, int B, int H, int Hkv, int N, int D, \
        int Dv, long long q_sb, long long q_sh, long long q_sn, long long k_sb, long long k_sh, \
        long long k_sn, long long v_sb, long long v_sh, long long v_sn, int L0, int L1, int L2,  \
        int k0, int k1, int k2, int d0, int d1, int d2, int s0, int s1, int s2, int c0, int c1,  \
        int c2, float scale_log2

#define QKV_NEIGHBORHOOD_PROBLEM                                                              \
    {q,    k,    v,    out,  lse,  B,  H,  Hkv, N,  D,  Dv, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, \
     v_sb, v_sh, v_sn, L0,   L1,   L2, k0, k1,  k2, d0, d1, d2,   s0,   s1,   s2,   c0,   c1,   \
     c2,   scale_log2}

extern "C" __global__ void __launch_bounds__(qkv_neighborhood::kWarps * 32)
    qkv_neighborhood_fwd_f16(QKV_NEIGHBORHOOD_PARAMS(unsigned short)) {
    const qkv_neighborhood::Problem<unsigned short> p = QKV_NEIGHBORHOOD_PROBLEM;
    qkv_neighborhood::neighborhood_fwd(p);
}

extern "C" __global__ void __launch_bounds__(qkv_neighborhood::kWarps * 32)
    qkv_neighborhood_fwd_f32(QKV_NEIGHBORHOOD_PARAMS(float)) {
    const qkv_neighborhood::Problem<float> p = QKV_NEIGHBORHOOD_PROBLEM;
    qkv_neighborhood::neighborhood_fwd(p);
}
