// KV-cache kernels for qkv's CuPy backend (NVRTC at first use): packed quantisation, unpacking,
// SnapKV's window votes, and attention over a mixed-precision cache.
//
// STATUS: compiled with nvcc -arch=sm_90; NOT YET RUN ON A GPU. Nobody may call these kernels
// correct or fast until `make gpu-check` has passed on a GPU machine.
//
// Quantisation layout (qkv.reference.kv.quantization): x (B, H, N, D) is cut into groups of gn
// tokens by gd channels; group (b, h, i, j) has scale s = (max - min) / (2^bits - 1) and zero
// point z = min, stored at ((b * H + h) * (N / gn) + i) * (D / gd) + j. Codes
// q = clip(floor((x - z) / s + 1/2), 0, 2^bits - 1) (0 where s = 0) are packed along the channel
// axis, 8 / bits per byte, the first in the low bits: packed (B, H, N, ceil(D bits / 8)) uint8.
// Every array here is contiguous.
//
// * qkv_kv_minmax_f32: one thread per group: scale and zero point.
// * qkv_kv_pack_f32: one thread per byte; IEEE division (__fdiv_rn) and rounding as the
//   reference's, so the codes are the reference's float32 codes.
// * qkv_kv_unpack_{f32,f16}: one thread per element, x_hat = q s + z (fp32 maths).
// * qkv_kv_window_{f32,f16}: one block per query head (b, h); for each window query i (token
//   start + i) the block scores every slot it may see (0 <= token <= start + i, tokens from
//   idx (B, H, C) int64 per query head), reduces the maximum and the normaliser, and adds the
//   probabilities to votes (B, H, C) float32 (zeroed by the host; a thread owns its slots).
//   Pooling runs on the host.
// * qkv_kv_mixed_{f32,f16}: one warp per query row (b, h, i), lane l holding elements
//   l, l + 32, ... (head dims up to 256): an online softmax in base 2 over the Mq quantised slots
//   of KV head h / (H / Hkv), each key and value code dequantised as it is read, then over its
//   Mf floating slots; writes O (B, H, N, Dv) in the input type and lse (B, H, N) float32.

#include "common.cuh"

namespace qkv_kv {

using qkv_common::neg_inf;
using qkv_common::store;
using qkv_common::to_float;
using qkv_common::warp_sum;

constexpr int kThreads = 128;                // threads per block of every kernel here
constexpr int kWarps = kThreads / 32;        // query rows per block of the mixed kernel
constexpr int kPerLane = 256 / 32;           // head dims up to 256
constexpr float kLn2 = 0.6931471805599453f;  // log(2)

// Group sizes of one quantised tensor (tokens gn by channels gd; n_gn = N / gn, n_gd = D / gd).
struct Groups {
    int gn, gd, n_gn, n_gd;
};

__device__ __forceinline__ long long group_of(const Groups& g, long long bh, int n, int d) {
    return (bh * g.n_gn + n / g.gn) * g.n_gd + d / g.gd;
}

// The code of element (row, d) of a packed tensor with `bytes` bytes per token row.
__device__ __forceinline__ int code_at(const unsigned char* packed, long long row, int bytes,
                                       int d, int bits) {
    const int per = 8 / bits;
    return (packed[row * bytes + d / per] >> ((d % per) * bits)) & ((1 << bits) - 1);
}

// Element (row, d) of a quantised tensor, dequantised in fp32: q s + z.
template <typename T>
__device__ __forceinline__ float dequantized(const unsigned char* packed, const T* scale,
                                             const T* zero, const Groups& g, long long bh, int n,
                                             long long row, int bytes, int d, int bits) {
    const long long at = group_of(g, bh, n, d);
    return static_cast<float>(code_at(packed, row, bytes, d, bits)) * to_float(scale[at]) +
           to_float(zero[at]);
}

// Block-wide reductions over kThreads threads (scratch: kWarps floats).
__device__ __forceinline__ float block_max(float x, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    float m = scratch[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
    x = warp_sum(x);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += scratch[w];
    return s;
}

template <typename T>
__device__ __forceinline__ void window_votes(const T* q, const T* k, const long long* idx,
                                             float* votes, int H, int Hkv, int W, int C, int D,
                                             long long start, float scale_log2) {
    __shared__ float scratch[kWarps];
    const long long bh = blockIdx.x;  // b * H + h
    const long long kv = bh / H * Hkv + bh % H / (H / Hkv);
    const long long* tok = idx + bh * C;
    for (int i = 0; i < W; ++i) {
        const T* qi = q + (bh * W + i) * D;
        float m = neg_inf();
        for (int c = threadIdx.x; c < C; c += kThreads) {
            if (tok[c] < 0 || tok[c] > start + i) continue;
            float s = 0.f;
            for (int d = 0; d < D; ++d) s = fmaf(to_float(qi[d]), to_float(k[(kv * C + c) * D + d]), s);
            m = fmaxf(m, s * scale_log2);
        }
        m = block_max(m, scratch);
        if (m == neg_inf()) continue;  // this query sees no cached slot
        float l = 0.f;
        for (int c = threadIdx.x; c < C; c += kThreads) {
            if (tok[c] < 0 || tok[c] > start + i) continue;
            float s = 0.f;
            for (int d = 0; d < D; ++d) s = fmaf(to_float(qi[d]), to_float(k[(kv * C + c) * D + d]), s);
            l += exp2f(s * scale_log2 - m);
        }
        l = block_sum(l, scratch);
        for (int c = threadIdx.x; c < C; c += kThreads) {  // a thread adds to its own slots
            if (tok[c] < 0 || tok[c] > start + i) continue;
            float s = 0.f;
            for (int d = 0; d < D; ++d) s = fmaf(to_float(qi[d]), to_float(k[(kv * C + c) * D + d]), s);
            votes[bh * C + c] += exp2f(s * scale_log2 - m) / l;
        }
    }
}

template <typename T>
struct Mixed {
    const T *q, *k, *v;
    const unsigned char *kc, *vc;
    const T *ks, *kz, *vs, *vz;
    T* out;
    float* lse;
    int B, H, Hkv, N, Mq, Mf, D, Dv, k_bytes, v_bytes, bits;
    Groups kg, vg;
    float scale_log2;
};

// Adds one slot with base-2 score s to the online softmax of a warp.
__device__ __forceinline__ float rescale(float& m, float& l, float s, float (&acc)[kPerLane]) {
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new);  // 0 on the first slot (m = -inf)
    const float w = exp2f(s - m_new);
    l = l * alpha + w;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[c] *= alpha;
    m = m_new;
    return w;
}

template <typename T>
__device__ __forceinline__ void mixed_attend(const Mixed<T>& p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long row = static_cast<long long>(blockIdx.x) * kWarps + warp;  // (b H + h) N + i
    if (row >= static_cast<long long>(p.B) * p.H * p.N) return;  // whole warps leave together
    const long long bh = row / p.N;
    const long long kv = bh / p.H * p.Hkv + bh % p.H / (p.H / p.Hkv);  // b * Hkv + g
    float qr[kPerLane], acc[kPerLane];
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        qr[c] = e < p.D ? to_float(p.q[row * p.D + e]) * p.scale_log2 : 0.f;
        acc[c] = 0.f;
    }
    float m = neg_inf(), l = 0.f;
    for (int j = 0; j < p.Mq; ++j) {
        const long long slot = kv * p.Mq + j;
        float part = 0.f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int e = lane + 32 * c;
            if (e < p.D)
                part = fmaf(qr[c], dequantized(p.kc, p.ks, p.kz, p.kg, kv, j, slot, p.k_bytes, e, p.bits), part);
        }
        const float w = rescale(m, l, warp_sum(part), acc);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int e = lane + 32 * c;
            if (e < p.Dv)
                acc[c] += w * dequantized(p.vc, p.vs, p.vz, p.vg, kv, j, slot, p.v_bytes, e, p.bits);
        }
    }
    for (int j = 0; j < p.Mf; ++j) {
        const long long slot = kv * p.Mf + j;
        float part = 0.f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int e = lane + 32 * c;
            if (e < p.D) part = fmaf(qr[c], to_float(p.k[slot * p.D + e]), part);
        }
        const float w = rescale(m, l, warp_sum(part), acc);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int e = lane + 32 * c;
            if (e < p.Dv) acc[c] += w * to_float(p.v[slot * p.Dv + e]);
        }
    }
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        if (e < p.Dv) store(p.out, row * p.Dv + e, acc[c] / l);  // l > 0: Mq >= 1
    }
    if (lane == 0) p.lse[row] = (m + log2f(l)) * kLn2;
}

}  // namespace qkv_kv

// ------------------------------------------------------------------ entry points

extern "C" __global__ void __launch_bounds__(qkv_kv::kThreads)
    qkv_kv_minmax_f32(const float* x, float* scale, float* zero, int B, int H, int N, int D,
                      int gn, int gd, float levels) {
    const long long n_groups = static_cast<long long>(B) * H * (N / gn) * (D / gd);
    const long long g = static_cast<long long>(blockIdx.x) * qkv_kv::kThreads + threadIdx.x;
    if (g >= n_groups) return;
    const int j = static_cast<int>(g % (D / gd));
    const int i = static_cast<int>(g / (D / gd) % (N / gn));
    const long long bh = g / (D / gd) / (N / gn);
    float lo = x[(bh * N + i * gn) * D + j * gd], hi = lo;
    for (int n = i * gn; n < (i + 1) * gn; ++n)
        for (int d = j * gd; d < (j + 1) * gd; ++d) {
            lo = fminf(lo, x[(bh * N + n) * D + d]);
            hi = fmaxf(hi, x[(bh * N + n) * D + d]);
        }
    scale[g] = __fdiv_rn(__fsub_rn(hi, lo), levels);
    zero[g] = lo;
}

extern "C" __global__ void __launch_bounds__(qkv_kv::kThreads)
    qkv_kv_pack_f32(const float* x, const float* scale, const float* zero, unsigned char* packed,
                    int B, int H, int N, int D, int bytes, int gn, int gd, int bits) {
    const long long n_bytes = static_cast<long long>(B) * H * N * bytes;
    const long long t = static_cast<long long>(blockIdx.x) * qkv_kv::kThreads + threadIdx.x;
    if (t >= n_bytes) return;
    const long long row = t / bytes;  // (b H + h) N + n
    const int byte = static_cast<int>(t % bytes), n = static_cast<int>(row % N);
    const qkv_kv::Groups g{gn, gd, N / gn, D / gd};
    const int per = 8 / bits;
    const float levels = static_cast<float>((1 << bits) - 1);
    int acc = 0;
    for (int lane = 0; lane < per; ++lane) {
        const int d = byte * per + lane;
        if (d >= D) break;
        const long long at = qkv_kv::group_of(g, row / N, n, d);
        const float s = scale[at];
        if (!(s > 0.f)) continue;  // a constant group: code 0
        const float u = __fadd_rn(__fdiv_rn(__fsub_rn(x[row * D + d], zero[at]), s), 0.5f);
        const int code = static_cast<int>(fminf(fmaxf(floorf(u), 0.f), levels));
        acc |= code << (lane * bits);
    }
    packed[t] = static_cast<unsigned char>(acc);
}

#define QKV_KV_UNPACK(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(qkv_kv::kThreads)                               \
        NAME(const unsigned char* packed, const T* scale, const T* zero, T* out, int B, int H,   \
             int N, int D, int bytes, int gn, int gd, int bits) {                                \
        const long long n_el = static_cast<long long>(B) * H * N * D;                            \
        const long long t = static_cast<long long>(blockIdx.x) * qkv_kv::kThreads + threadIdx.x; \
        if (t >= n_el) return;                                                                   \
        const long long row = t / D;                                                             \
        const qkv_kv::Groups g{gn, gd, N / gn, D / gd};                                          \
        qkv_common::store(out, t,                                                                \
                          qkv_kv::dequantized(packed, scale, zero, g, row / N,                   \
                                              static_cast<int>(row % N), row, bytes,             \
                                              static_cast<int>(t % D), bits));                   \
    }

QKV_KV_UNPACK(qkv_kv_unpack_f32, float)
QKV_KV_UNPACK(qkv_kv_unpack_f16, unsigned short)

#define QKV_KV_WINDOW(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(qkv_kv::kThreads)                             \
        NAME(const T* q, const T* k, const long long* idx, float* votes, int H, int Hkv, int W, \
             int C, int D, long long start, float scale_log2) {                                \
        qkv_kv::window_votes(q, k, idx, votes, H, Hkv, W, C, D, start, scale_log2);            \
    }

QKV_KV_WINDOW(qkv_kv_window_f32, float)
QKV_KV_WINDOW(qkv_kv_window_f16, unsigned short)

#define QKV_KV_MIXED(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(qkv_kv::kThreads)                             \
        NAME(const T* q, const T* k, const T* v, const unsigned char* kc, const T* ks,         \
             const T* kz, const unsigned char* vc, const T* vs, const T* vz, T* out, float* lse, \
             int B, int H, int Hkv, int N, int Mq, int Mf, int D, int Dv, int k_bytes,         \
             int v_bytes, int bits, int kgn, int kgd, int vgn, int vgd, float scale_log2) {    \
        const qkv_kv::Mixed<T> p{q,     k,  v,   kc,  vc,   ks,   kz,   vs,   vz,      out,     \
                                 lse,   B,  H,   Hkv, N,    Mq,   Mf,   D,    Dv,      k_bytes, \
                                 v_bytes, bits, {kgn, kgd, Mq / kgn, D / kgd},                  \
                                 {vgn, vgd, Mq / vgn, Dv / vgd}, scale_log2};                   \
        qkv_kv::mixed_attend(p);                                                               \
    }

QKV_KV_MIXED(qkv_kv_mixed_f32, float)
QKV_KV_MIXED(qkv_kv_mixed_f16, unsigned short)
