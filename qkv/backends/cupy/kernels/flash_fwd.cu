// Flash-attention forward pass for qkv's CuPy backend (compiled by NVRTC at first use).
//
// STATUS: compiled with nvcc -arch=sm_90 and NVRTC; NOT YET RUN ON A GPU. Nobody may call these
// kernels correct or fast until `make gpu-check` has passed on a GPU machine.
//
// Maths (per batch b, query head h, KV head hk = h / (H / Hkv)):
//     s_ij = scale * <q_i, k_j> + bias_ij          (bias from the additive mask; -inf masks)
//     o_i  = sum_j softmax_j(s_i.) v_j,            lse_i = log sum_j exp(s_ij)
// with the causal rule j <= i + (M - N) (bottom-right alignment). A row whose every key is
// masked gets o_i = 0 and lse_i = -inf. The softmax is computed online over key tiles:
//     m' = max(m, rowmax S_t),  alpha = 2^(m - m'),  P_t = 2^(S_t - m'),
//     l' = alpha l + rowsum P_t,  O' = alpha O + P_t V_t,
// in base 2 (scores pre-multiplied by log2 e), with fp32 accumulation throughout.
//
// Layouts: q (B, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv), each with element strides for
// batch, head and token and a contiguous last axis; mask: float32 additive bias with element
// strides for (B, H, N, M) (0 where an axis broadcasts); out (B, H, N, Dv) and lse (B, H, N)
// contiguous. With splits > 1 the keys are cut into `splits` ranges of `keys_per_split`; each
// block writes a normalised fp32 partial output and its lse to part_out (splits, B, H, N, Dv)
// and part_lse (splits, B, H, N), and qkv_flash_combine_* merges them.
//
// Grid: x = query tile + n_qtiles * split (query tiles run last-first, so the long causal rows
// start early), y = query head, z = batch. Block: 128 threads. Dynamic shared memory: the size
// given by the host planner (qkv/backends/cupy/_launch.py); the kernel traps if it gets less.
//
// Compile-time configuration (the host passes -D options; defaults here for stand-alone checks):
//   QKV_HEAD_DIM      D rounded up to a multiple of 16 (<= 256)
//   QKV_VALUE_DIM     Dv rounded up to a multiple of 16 (<= 256)
//   QKV_MMA_BLOCK_K   keys per tile of the fp16 tensor-core kernel (block of 64 queries)
//   QKV_SIMT_BLOCK_Q  queries per tile of the fp32 kernel
//   QKV_SIMT_BLOCK_K  keys per tile of the fp32 kernel
//   QKV_MMA_SMEM, QKV_SIMT_SMEM  the dynamic shared memory (bytes) the host gives each kernel;
//                     static_asserts below fail the compile if the host's sizes disagree
//
// fp16 data is handled as raw 16-bit words and converted with PTX cvt instructions (helpers in
// common.cuh, which the launcher inlines for NVRTC). Entry points are extern "C" for RawModule
// lookups.

#ifndef QKV_HEAD_DIM
#define QKV_HEAD_DIM 64
#endif
#ifndef QKV_VALUE_DIM
#define QKV_VALUE_DIM 64
#endif
#ifndef QKV_MMA_BLOCK_K
#define QKV_MMA_BLOCK_K 64
#endif
#ifndef QKV_SIMT_BLOCK_Q
#define QKV_SIMT_BLOCK_Q 64
#endif
#ifndef QKV_SIMT_BLOCK_K
#define QKV_SIMT_BLOCK_K 64
#endif
#ifndef QKV_MMA_SMEM
#define QKV_MMA_SMEM 27648
#endif
#ifndef QKV_SIMT_SMEM
#define QKV_SIMT_SMEM 66304
#endif

#include "common.cuh"

namespace qkv {

using qkv_common::half_bits;
using qkv_common::kThreads;
using qkv_common::neg_inf;
using qkv_common::SimtSmem;
using qkv_common::store;

constexpr int kMmaBlockQ = 64;  // 4 warps x 16 query rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------ PTX helpers

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// Two floats as one fp16x2 register: `lo` in bits 0-15 (the lower column), `hi` in bits 16-31.
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Asynchronous global -> shared copies; bytes past `src_bytes` are filled with zeros.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most `pending` of this thread's committed copy groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Four 8x8 fp16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
// Without .trans, lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of each matrix.
__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1,
                                            unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// As ldmatrix_x4, transposed: lane l receives rows 2(l%4) and 2(l%4)+1 of column l/4.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1,
                                                  unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// c (16x8, fp32) += a (16x16, fp16, row-major) * b (16x8, fp16, column-major).
// Fragments, with g = lane/4 and t = lane%4:
//   a0: A[g][2t..2t+1]  a1: A[g+8][2t..2t+1]  a2: A[g][2t+8..2t+9]  a3: A[g+8][2t+8..2t+9]
//   b0: B[2t..2t+1][g]  b1: B[2t+8..2t+9][g]
//   c0, c1: C[g][2t], C[g][2t+1]              c2, c3: C[g+8][2t], C[g+8][2t+1]
__device__ __forceinline__ void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                          unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void require_launch(unsigned smem_bytes) {
    unsigned given;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < smem_bytes || blockDim.x != kThreads || blockDim.y != 1 || blockDim.z != 1) {
        asm volatile("trap;");
    }
}

// ------------------------------------------------------------------ the problem

template <typename T>
struct Problem {
    const T* q;
    const T* k;
    const T* v;
    const float* mask;  // additive bias or nullptr
    T* out;
    float* lse;
    float* part_out;  // used when splits > 1
    float* part_lse;
    int B, H, Hkv, N, M, D, Dv;
    long long q_sb, q_sh, q_sn;
    long long k_sb, k_sh, k_sm;
    long long v_sb, v_sh, v_sm;
    long long m_sb, m_sh, m_sn, m_sm;
    float scale_log2;  // scale * log2(e)
    int causal;
    int vec16;  // fp16 only: rows may be copied in 16-byte chunks (host-checked alignment)
    int splits;
    int keys_per_split;  // a multiple of the key tile
};

// What one thread block computes: rows [q0, q0 + block_q) of head h in batch b, against the
// keys [key_begin, key_end) of KV head hk.
struct Work {
    int b, h, hk, q0, split, key_begin, key_end;
};

template <typename T>
__device__ __forceinline__ Work block_work(const Problem<T>& p, int block_q) {
    Work w;
    const int n_qtiles = (p.N + block_q - 1) / block_q;
    const int tile = n_qtiles - 1 - static_cast<int>(blockIdx.x % n_qtiles);
    w.split = static_cast<int>(blockIdx.x / n_qtiles);
    w.h = blockIdx.y;
    w.b = blockIdx.z;
    w.hk = w.h / (p.H / p.Hkv);
    w.q0 = tile * block_q;
    w.key_begin = w.split * p.keys_per_split;
    w.key_end = min(p.M, w.key_begin + p.keys_per_split);
    if (p.causal) {
        // The tile's last row i_max reaches key i_max + (M - N).
        const int rows = min(block_q, p.N - w.q0);
        w.key_end = min(w.key_end, w.q0 + rows + (p.M - p.N));
    }
    return w;
}

// The scaled, masked score of (row, col) in base 2: -inf where the key is out of range, above
// the causal diagonal, or masked by an additive -inf (which shields even a NaN score).
template <typename T>
__device__ __forceinline__ float masked_score(const Problem<T>& p, const Work& w, float dot,
                                              int row, int col) {
    if (col >= p.M || (p.causal && col > row + (p.M - p.N))) return neg_inf();
    float x = dot * p.scale_log2;
    if (p.mask != nullptr && row < p.N) {
        const float bias = p.mask[w.b * p.m_sb + w.h * p.m_sh + row * p.m_sn + col * p.m_sm];
        if (bias == neg_inf()) return neg_inf();
        x = fmaf(bias, kLog2e, x);
    }
    return x;
}

// Whether a key tile [k0, k0 + block_k) needs per-element checks for rows from q0 on.
template <typename T>
__device__ __forceinline__ bool tile_needs_checks(const Problem<T>& p, int q0, int k0,
                                                  int block_k) {
    return k0 + block_k > p.M || p.mask != nullptr ||
           (p.causal && k0 + block_k - 1 > q0 + (p.M - p.N));
}

// lse = ln 2 * (m + log2 l) from the running max m (base 2) and the row sum l.
__device__ __forceinline__ float final_lse(float m_log2, float l) {
    return (m_log2 + log2f(l)) * kLn2;  // l = 0 (nothing attended): -inf
}

// ------------------------------------------------------------------ tile loads

// rows [row0, row0 + ROWS) x columns [0, COLS) of a (rows, ncols) matrix with row stride
// `stride` into shared memory with row pitch PITCH; zeros outside the matrix.
template <int ROWS, int COLS, int PITCH>
__device__ __forceinline__ void load_tile_half(half_bits* dst, const half_bits* src,
                                               long long stride, int row0, int nrows, int ncols,
                                               int vec16) {
    if (vec16) {  // 16-byte chunks of 8 values; ncols is a multiple of 8 here
        constexpr int CHUNKS = COLS / 8;
        for (int i = threadIdx.x; i < ROWS * CHUNKS; i += kThreads) {
            const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
            const bool inside = row0 + r < nrows && c < ncols;
            const half_bits* from = inside ? src + (row0 + r) * stride + c : src;
            cp_async16(smem_addr(dst + r * PITCH + c), from, inside ? 16 : 0);
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * COLS; i += kThreads) {
            const int r = i / COLS, c = i % COLS;
            const bool inside = row0 + r < nrows && c < ncols;
            dst[r * PITCH + c] = inside ? src[(row0 + r) * stride + c] : half_bits(0);
        }
    }
}

template <int ROWS, int COLS, int PITCH>
__device__ __forceinline__ void load_tile_float(float* dst, const float* src, long long stride,
                                                int row0, int nrows, int ncols) {
    for (int i = threadIdx.x; i < ROWS * COLS; i += kThreads) {
        const int r = i / COLS, c = i % COLS;
        const bool inside = row0 + r < nrows && c < ncols;
        const float* from = inside ? src + (row0 + r) * stride + c : src;
        cp_async4(smem_addr(dst + r * PITCH + c), from, inside ? 4 : 0);
    }
}

// ------------------------------------------------------------------ epilogue

// Store output element (row, col): to the final array, or to this split's fp32 partials.
template <typename T>
__device__ __forceinline__ void store_out(const Problem<T>& p, const Work& w, int row, int col,
                                          float value) {
    const long long r = (static_cast<long long>(w.b) * p.H + w.h) * p.N + row;
    if (p.splits == 1) {
        store(p.out, r * p.Dv + col, value);
    } else {
        p.part_out[(static_cast<long long>(w.split) * p.B * p.H * p.N + r) * p.Dv + col] = value;
    }
}

// Store a row's lse (natural log units) likewise.
template <typename T>
__device__ __forceinline__ void store_lse(const Problem<T>& p, const Work& w, int row,
                                          float value) {
    const long long r = (static_cast<long long>(w.b) * p.H + w.h) * p.N + row;
    if (p.splits == 1) {
        p.lse[r] = value;
    } else {
        p.part_lse[static_cast<long long>(w.split) * p.B * p.H * p.N + r] = value;
    }
}

// ------------------------------------------------------------------ fp16: tensor cores

// Shared memory of the fp16 kernel, in bytes. Rows are padded by 8 values (16 bytes) so that
// the 8 row addresses of an ldmatrix fall in 8 different bank groups.
template <int DQK, int DV, int BN>
struct MmaSmem {
    static constexpr int pitch_qk = DQK + 8;
    static constexpr int pitch_v = DV + 8;
    static constexpr int q_elems = kMmaBlockQ * pitch_qk;
    static constexpr int k_elems = BN * pitch_qk;
    static constexpr int v_elems = BN * pitch_v;
    static constexpr unsigned bytes = 2u * (q_elems + k_elems + v_elems);
};

// One block: 4 warps, warp w owns query rows q0 + 16w .. q0 + 16w + 15. Per key tile:
//   S (16 x BN per warp) = Q K^T with mma.m16n8k16 (Q and K fragments by ldmatrix);
//   online softmax on the S fragments in registers (a row lives in one lane quad);
//   O (16 x DV per warp) += P V, P re-packed from the S accumulators to fp16 A fragments,
//   V fragments by ldmatrix.trans.
// K and V tiles are copied with cp.async: V is fetched while S is computed, and the next K
// while P V is computed.
template <int DQK, int DV, int BN>
__device__ __forceinline__ void flash_fwd_mma(const Problem<half_bits>& p) {
    static_assert(DQK % 16 == 0 && DV % 16 == 0 && BN % 16 == 0, "tile sizes");
    static_assert(DQK <= 256 && DV <= 256, "head dims up to 256");
    typedef MmaSmem<DQK, DV, BN> L;
    extern __shared__ __align__(16) unsigned char smem[];
    half_bits* sq = reinterpret_cast<half_bits*>(smem);
    half_bits* sk = sq + L::q_elems;
    half_bits* sv = sk + L::k_elems;
    require_launch(L::bytes);

    const Work w = block_work(p, kMmaBlockQ);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const half_bits* qp = p.q + w.b * p.q_sb + w.h * p.q_sh;
    const half_bits* kp = p.k + w.b * p.k_sb + w.hk * p.k_sh;
    const half_bits* vp = p.v + w.b * p.v_sb + w.hk * p.v_sh;

    float acc[DV / 8][4];
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m_run[2] = {neg_inf(), neg_inf()};  // rows g and g + 8 of this warp, base-2 units
    float l_run[2] = {0.f, 0.f};              // this lane's share of the row sums

    if (w.key_begin < w.key_end) {
        load_tile_half<kMmaBlockQ, DQK, L::pitch_qk>(sq, qp, p.q_sn, w.q0, p.N, p.D, p.vec16);
        load_tile_half<BN, DQK, L::pitch_qk>(sk, kp, p.k_sm, w.key_begin, p.M, p.D, p.vec16);
        cp_async_commit();
    }
    for (int k0 = w.key_begin; k0 < w.key_end; k0 += BN) {
        load_tile_half<BN, DV, L::pitch_v>(sv, vp, p.v_sm, k0, p.M, p.Dv, p.vec16);
        cp_async_commit();
        cp_async_wait<1>();  // Q and this K tile have landed (V may still be in flight)
        __syncthreads();

        // S = Q K^T: s[j] holds keys k0 + 8j .. k0 + 8j + 7.
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DQK / 16; ++kk) {
            unsigned a0, a1, a2, a3;
            // matrices: rows 0-7 / 8-15 of the warp's slice x columns kk*16 + 0-7 / 8-15
            ldmatrix_x4(smem_addr(sq + (warp * 16 + (lane & 15)) * L::pitch_qk + kk * 16 +
                                  (lane >> 4) * 8),
                        a0, a1, a2, a3);
#pragma unroll
            for (int jj = 0; jj < BN / 16; ++jj) {
                unsigned b0, b1, b2, b3;
                // matrices: keys jj*16 + 0-7 x dims 0-7, 8-15; keys + 8-15 x dims 0-7, 8-15
                ldmatrix_x4(smem_addr(sk + (jj * 16 + (lane & 7) + (lane >> 4) * 8) * L::pitch_qk +
                                      kk * 16 + ((lane >> 3) & 1) * 8),
                            b0, b1, b2, b3);
                mma_16816(s[2 * jj], a0, a1, a2, a3, b0, b1);
                mma_16816(s[2 * jj + 1], a0, a1, a2, a3, b2, b3);
            }
        }

        // Scale and mask; element e of s[j] is (row g + 8 (e / 2), key 8j + 2t + e % 2).
        const bool checks = tile_needs_checks(p, w.q0, k0, BN);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (checks) {
                    const int row = w.q0 + warp * 16 + g + (e >> 1) * 8;
                    const int col = k0 + j * 8 + 2 * t + (e & 1);
                    s[j][e] = masked_score(p, w, s[j][e], row, col);
                } else {
                    s[j][e] *= p.scale_log2;
                }
            }
        }

        // Online softmax: the 4 lanes of a quad share a row.
        float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            tile_max[0] = fmaxf(tile_max[0], fmaxf(s[j][0], s[j][1]));
            tile_max[1] = fmaxf(tile_max[1], fmaxf(s[j][2], s[j][3]));
        }
        float alpha[2], shift[2], tile_sum[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float m_new = fmaxf(m_run[r], tile_max[r]);
            shift[r] = m_new == neg_inf() ? 0.f : m_new;  // nothing seen yet: keep exp finite
            alpha[r] = exp2f(m_run[r] - shift[r]);
            m_run[r] = m_new;
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = exp2f(s[j][e] - shift[e >> 1]);
                tile_sum[e >> 1] += s[j][e];
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[r] = alpha[r] * l_run[r] + tile_sum[r];
#pragma unroll
        for (int j = 0; j < DV / 8; ++j) {
            acc[j][0] *= alpha[0];
            acc[j][1] *= alpha[0];
            acc[j][2] *= alpha[1];
            acc[j][3] *= alpha[1];
        }

        cp_async_wait<0>();  // V has landed
        __syncthreads();     // ... for every thread, and every warp is done reading K
        if (k0 + BN < w.key_end) {
            load_tile_half<BN, DQK, L::pitch_qk>(sk, kp, p.k_sm, k0 + BN, p.M, p.D, p.vec16);
            cp_async_commit();
        }

        // O += P V over key steps of 16: the S accumulators of key groups 2kk and 2kk+1 are
        // exactly the A fragment of rows x keys 16kk .. 16kk + 15.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const unsigned a0 = pack_half2(s[2 * kk][0], s[2 * kk][1]);
            const unsigned a1 = pack_half2(s[2 * kk][2], s[2 * kk][3]);
            const unsigned a2 = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const unsigned a3 = pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int jj = 0; jj < DV / 16; ++jj) {
                unsigned b0, b1, b2, b3;
                // matrices: keys 16kk + 0-7 / 8-15 x value dims 16jj + 0-7; then dims + 8-15
                ldmatrix_x4_trans(smem_addr(sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) *
                                                     L::pitch_v +
                                                 jj * 16 + (lane >> 4) * 8),
                                  b0, b1, b2, b3);
                mma_16816(acc[2 * jj], a0, a1, a2, a3, b0, b1);
                mma_16816(acc[2 * jj + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        __syncthreads();  // every warp is done with V before the next tile overwrites it
    }

    // Finish: full row sums across the quad, normalise, store.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = w.q0 + warp * 16 + g + 8 * r;
        if (row >= p.N) continue;
        // l = 0 only for a fully masked row, whose accumulator is 0; NaN passes through.
        const float inv = l_run[r] > 0.f ? 1.f / l_run[r] : 1.f;
#pragma unroll
        for (int j = 0; j < DV / 8; ++j) {
            const int col = j * 8 + 2 * t;
            if (col < p.Dv) store_out(p, w, row, col, acc[j][2 * r] * inv);
            if (col + 1 < p.Dv) store_out(p, w, row, col + 1, acc[j][2 * r + 1] * inv);
        }
        if (t == 0) store_lse(p, w, row, final_lse(m_run[r], l_run[r]));
    }
}

// ------------------------------------------------------------------ fp32: CUDA cores

// One block of 128 threads as a 16 x 8 grid (ty = tid / 8, tx = tid % 8). Thread (ty, tx)
// computes scores for rows ty*TM .. ty*TM + TM - 1 and keys tx + 8c (c < TN), and outputs for
// the same rows and value dims tx + 8c (c < DV / 8). A row's 8 threads are 8 consecutive lanes,
// reduced with shuffles; P goes through shared memory so each thread sees the whole tile row.
// Exact fp32 arithmetic (no TF32), so results match the float32 reference to rounding.
template <int DQK, int DV, int BM, int BN>
__device__ __forceinline__ void flash_fwd_simt(const Problem<float>& p) {
    static_assert(BM % 16 == 0 && BN % 8 == 0 && DV % 8 == 0, "tile sizes");
    constexpr int TM = BM / 16, TN = BN / 8, TV = DV / 8;
    typedef SimtSmem<DQK, DV, BM, BN> L;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sq = reinterpret_cast<float*>(smem);
    float* sk = sq + L::q_elems;
    float* sv = sk + L::k_elems;
    float* sp = sv + L::v_elems;
    require_launch(L::bytes);

    const Work w = block_work(p, BM);
    const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
    const float* qp = p.q + w.b * p.q_sb + w.h * p.q_sh;
    const float* kp = p.k + w.b * p.k_sb + w.hk * p.k_sh;
    const float* vp = p.v + w.b * p.v_sb + w.hk * p.v_sh;

    float acc[TM][TV];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int c = 0; c < TV; ++c) acc[i][c] = 0.f;
    float m_run[TM], l_run[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        m_run[i] = neg_inf();
        l_run[i] = 0.f;
    }

    if (w.key_begin < w.key_end) {
        load_tile_float<BM, DQK, L::pitch_qk>(sq, qp, p.q_sn, w.q0, p.N, p.D);
        load_tile_float<BN, DQK, L::pitch_qk>(sk, kp, p.k_sm, w.key_begin, p.M, p.D);
        cp_async_commit();
    }
    for (int k0 = w.key_begin; k0 < w.key_end; k0 += BN) {
        load_tile_float<BN, DV, DV>(sv, vp, p.v_sm, k0, p.M, p.Dv);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

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

        const bool checks = tile_needs_checks(p, w.q0, k0, BN);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            float tile_max = neg_inf();
#pragma unroll
            for (int c = 0; c < TN; ++c) {
                s[i][c] = checks ? masked_score(p, w, s[i][c], w.q0 + ty * TM + i, k0 + tx + 8 * c)
                                 : s[i][c] * p.scale_log2;
                tile_max = fmaxf(tile_max, s[i][c]);
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
            const float m_new = fmaxf(m_run[i], tile_max);
            const float shift = m_new == neg_inf() ? 0.f : m_new;
            const float alpha = exp2f(m_run[i] - shift);
            m_run[i] = m_new;
            float tile_sum = 0.f;
#pragma unroll
            for (int c = 0; c < TN; ++c) {
                const float e = exp2f(s[i][c] - shift);
                tile_sum += e;
                sp[(ty * TM + i) * L::pitch_p + tx + 8 * c] = e;
            }
            l_run[i] = alpha * l_run[i] + tile_sum;
#pragma unroll
            for (int c = 0; c < TV; ++c) acc[i][c] *= alpha;
        }

        cp_async_wait<0>();
        __syncthreads();  // V and P are visible; every thread is done reading K
        if (k0 + BN < w.key_end) {
            load_tile_float<BN, DQK, L::pitch_qk>(sk, kp, p.k_sm, k0 + BN, p.M, p.D);
            cp_async_commit();
        }

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
        __syncthreads();  // every thread is done with V and P
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        float l = l_run[i];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        l += __shfl_xor_sync(0xffffffffu, l, 4);
        const int row = w.q0 + ty * TM + i;
        if (row >= p.N) continue;
        const float inv = l > 0.f ? 1.f / l : 1.f;
#pragma unroll
        for (int c = 0; c < TV; ++c) {
            const int col = tx + 8 * c;
            if (col < p.Dv) store_out(p, w, row, col, acc[i][c] * inv);
        }
        if (tx == 0) store_lse(p, w, row, final_lse(m_run[i], l));
    }
}

// ------------------------------------------------------------------ split combine

__device__ __forceinline__ void combine_weights(const float* part_lse, long long rows,
                                                long long row, int splits, float& shift,
                                                float& total) {
    float mx = neg_inf();
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_lse[s * rows + row]);
    shift = mx == neg_inf() ? 0.f : mx;
    total = 0.f;
    for (int s = 0; s < splits; ++s) total += expf(part_lse[s * rows + row] - shift);
}

// Merge the `splits` partial results of one (b, h, n) row: lse = log sum_s exp(lse_s) and
// o = sum_s exp(lse_s - lse) o_s. One block per row, threads over the value dims.
template <typename T>
__device__ __forceinline__ void combine_row(const float* part_out, const float* part_lse, T* out,
                                            float* lse, long long rows, int Dv, int splits) {
    const long long row = blockIdx.x;
    float shift, total;
    combine_weights(part_lse, rows, row, splits, shift, total);
    const float inv = total > 0.f ? 1.f / total : 1.f;
    for (int c = threadIdx.x; c < Dv; c += blockDim.x) {
        float x = 0.f;
        for (int s = 0; s < splits; ++s) {
            x += expf(part_lse[s * rows + row] - shift) * part_out[(s * rows + row) * Dv + c];
        }
        store(out, row * Dv + c, x * inv);
    }
    if (threadIdx.x == 0) lse[row] = shift + logf(total);  // total = 0: -inf
}

}  // namespace qkv

// ------------------------------------------------------------------ entry points

#define QKV_FLASH_PARAMS(T)                                                                    \
    const T *q, const T *k, const T *v, const float *mask, T *out, float *lse, float *part_out, \
        float *part_lse, int B, int H, int Hkv, int N, int M, int D, int Dv, long long q_sb,    \
        long long q_sh, long long q_sn, long long k_sb, long long k_sh, long long k_sm,         \
        long long v_sb, long long v_sh, long long v_sm, long long m_sb, long long m_sh,         \
        long long m_sn, long long m_sm, float scale_log2, int causal, int vec16, int splits,    \
        int keys_per_split

#define QKV_FLASH_PROBLEM                                                                      \
    {q,    k,    v,    mask, out,  lse,  part_out, part_lse, B,    H,    Hkv,        N,          \
     M,    D,    Dv,   q_sb, q_sh, q_sn, k_sb,     k_sh,     k_sm, v_sb, v_sh,       v_sm,       \
     m_sb, m_sh, m_sn, m_sm, scale_log2, causal, vec16, splits, keys_per_split}

static_assert(qkv::MmaSmem<QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_MMA_BLOCK_K>::bytes == QKV_MMA_SMEM,
              "host and kernel disagree on the fp16 kernel's shared memory");
static_assert(qkv::SimtSmem<QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q,
                            QKV_SIMT_BLOCK_K>::bytes == QKV_SIMT_SMEM,
              "host and kernel disagree on the fp32 kernel's shared memory");

extern "C" __global__ void __launch_bounds__(qkv::kThreads)
    qkv_flash_fwd_f16(QKV_FLASH_PARAMS(unsigned short)) {
    const qkv::Problem<unsigned short> p = QKV_FLASH_PROBLEM;
    qkv::flash_fwd_mma<QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_MMA_BLOCK_K>(p);
}

extern "C" __global__ void __launch_bounds__(qkv::kThreads)
    qkv_flash_fwd_f32(QKV_FLASH_PARAMS(float)) {
    const qkv::Problem<float> p = QKV_FLASH_PROBLEM;
    qkv::flash_fwd_simt<QKV_HEAD_DIM, QKV_VALUE_DIM, QKV_SIMT_BLOCK_Q, QKV_SIMT_BLOCK_K>(p);
}

extern "C" __global__ void qkv_flash_combine_f16(const float* part_out, const float* part_lse,
                                                 unsigned short* out, float* lse, long long rows,
                                                 int Dv, int splits) {
    qkv::combine_row(part_out, part_lse, out, lse, rows, Dv, splits);
}

extern "C" __global__ void qkv_flash_combine_f32(const float* part_out, const float* part_lse,
                                                 float* out, float* lse, long long rows, int Dv,
                                                 int splits) {
    qkv::combine_row(part_out, part_lse, out, lse, rows, Dv, splits);
}
