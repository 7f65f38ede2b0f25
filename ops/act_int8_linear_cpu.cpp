// Linears whose activations are quantized to int8 on the fly, per row and block of 32 inputs: x ~ s * xq, xq int8,
// s = max|x| / 127. The weights' integer dot products with xq run on AVX512-VNNI's vpdpbusd (unsigned bytes x signed
// bytes, 4 products a 32-bit lane, 64 an instruction); each block's sum is then scaled in float32.
//
//   linear_w4a8: int4 weights w = d * q + mn (q in 0..15: a GGUF Q4_1 block), per block b
//       out[m, n] += s[m, b] * d[n, b] * sum_j q[n, 32b + j] * xq[m, 32b + j] + xsum[m, b] * mn[n, b]
//     with xsum the block's exact sum of x.
//   linear_w8a8: int8 weights w = scale[n] * wq (per output row, wq in -127..127), stored as wq + 128 (unsigned),
//       out[m, n] = scale[n] * sum_b s[m, b] * (sum_j (wq + 128)[n, 32b + j] * xq[m, 32b + j] - 128 * qsum[m, b])
//     with qsum the block's sum of xq.
//
// Layouts (act_int8_linear.py packs them; outputs padded with zero weights to whole tiles of 16):
//   int4 weights [N / 16, K / 32, 4, 64] bytes: load j of a block is 16 outputs x 4 inputs, byte (lane, i) holding
//     q[lane, 32b + 8j + i] in its low nibble and q[lane, 32b + 8j + 4 + i] in its high one (one AND and one shift
//     give two operands); dm [N / 16, K / 32, 2, 16] float16: the tile's d, then its mn.
//   int8 weights [N / 16, K / 32, 8, 64] bytes: load j is 16 outputs x 4 inputs, byte (lane, i) = wq[lane, 32b + 4j + i]
//     + 128; scales [N / 16 * 16] float32.
//
// A row's float sum for an output runs over its blocks in order, the same however many rows the call has and
// wherever the row sits in them: a row's result does not depend on its batch.
//
// act_int8_linear.py builds this with Inductor's C++ toolchain, on CPUs with AVX512-VNNI only, and loads it: the
// library registers the two ops' CPU kernels, which compiled pieces then call without Python.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
static inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

static inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
static inline void store16(c10::BFloat16* p, __m512 v, __mmask16 k) {
    // Rounded to nearest even, as c10::BFloat16's conversion does (the sums are finite).
    __m512i i = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(i, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(rounded));
}
static inline void store16(c10::Half* p, __m512 v, __mmask16 k) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// A row's quantized blocks: xq [K] int8 and, per block b, stats[b] = s, stats[KB + b] = the exact sum of x,
// stats[2 KB + b] = the sum of xq (an integer, exact in a float).
struct Rows {
    const int8_t* xq;
    const float* stats;
    int64_t K, KB;
    const int32_t* bytes(int64_t r, int64_t b) const { return reinterpret_cast<const int32_t*>(xq + r * K + b * 32); }
    float scale(int64_t r, int64_t b) const { return stats[r * 3 * KB + b]; }
    float sum(int64_t r, int64_t b) const { return stats[r * 3 * KB + KB + b]; }
    float qsum(int64_t r, int64_t b) const { return stats[r * 3 * KB + 2 * KB + b]; }
};

// xq = round(x * 127 / max|x|) (to nearest even) for one row's block of 32.
template <typename act_t>
static inline void quantize_block(const act_t* x, int8_t* xq, float* scale, float* sum, float* qsum) {
    __m512 a = load16(x), b = load16(x + 16);
    float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 16), _mm512_cvtsepi32_epi8(qb));
    *scale = top / 127.f;
    *sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    *qsum = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
}

// R rows against one tile of 16 int4 outputs: each block's weights are unpacked once and used for every row.
template <int R>
static inline void tile_int4(const Rows& x, int64_t r0, const uint8_t* w, const uint16_t* dm, __m512* acc) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < x.KB; ++b) {
        const uint8_t* wb = w + b * 256;
        __m512i q[8];
        for (int j = 0; j < 4; ++j) {
            __m512i v = _mm512_loadu_si512(wb + 64 * j);
            q[2 * j] = _mm512_and_si512(v, low);
            q[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + b * 32)));
        __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + b * 32 + 16)));
        for (int r = 0; r < R; ++r) {
            const int32_t* x4 = x.bytes(r0 + r, b);
            __m512i dot = _mm512_setzero_si512();
            for (int i = 0; i < 8; ++i) dot = _mm512_dpbusd_epi32(dot, q[i], _mm512_set1_epi32(x4[i]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(x.scale(r0 + r, b))), acc[r]);
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(x.sum(r0 + r, b)), acc[r]);
        }
    }
}

// R rows against one tile of 16 int8 outputs.
template <int R>
static inline void tile_int8(const Rows& x, int64_t r0, const uint8_t* w, const float* scales, __m512* acc) {
    for (int64_t b = 0; b < x.KB; ++b) {
        const uint8_t* wb = w + b * 512;
        __m512i dot[R];
        for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
        for (int i = 0; i < 8; ++i) {
            __m512i v = _mm512_loadu_si512(wb + 64 * i);
            for (int r = 0; r < R; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(x.bytes(r0 + r, b)[i]));
        }
        for (int r = 0; r < R; ++r) {
            // The weights went in as wq + 128: take 128 times the block's sum of xq back out.
            __m512i exact = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(128 * static_cast<int32_t>(x.qsum(r0 + r, b))));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(x.scale(r0 + r, b)), acc[r]);
        }
    }
    __m512 s = _mm512_loadu_ps(scales);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_mul_ps(acc[r], s);
}

// Quantizes x [M, K] into xq [M, K] and stats [M, 3, K / 32], then computes out [M, N] tile by tile.
template <bool INT4, typename act_t>
static void run(const act_t* x, const uint8_t* w, const void* params, act_t* out, int8_t* xq, float* stats, int64_t M, int64_t N,
                int64_t K, int64_t threads) {
    constexpr int64_t ROWS = 4;  // rows a tile takes at once: their accumulators and the weights stay in registers
    const int64_t KB = K / 32, tiles = (N + 15) / 16;
    const Rows rows{xq, stats, K, KB};
#pragma omp parallel num_threads(threads)
    {
#pragma omp for
        for (int64_t i = 0; i < M * KB; ++i) {
            int64_t m = i / KB, b = i % KB;
            float* s = stats + m * 3 * KB + b;
            quantize_block(x + m * K + b * 32, xq + m * K + b * 32, s, s + KB, s + 2 * KB);
        }
#pragma omp for collapse(2)
        for (int64_t t = 0; t < tiles; ++t)
            for (int64_t m = 0; m < M; m += ROWS) {
                __m512 acc[ROWS];
                for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
                const int64_t R = M - m < ROWS ? M - m : ROWS;
#define KILN_TILE(n)                                                                                                    \
    if constexpr (INT4)                                                                                                 \
        tile_int4<n>(rows, m, w + t * KB * 256, static_cast<const uint16_t*>(params) + t * KB * 32, acc);               \
    else                                                                                                                \
        tile_int8<n>(rows, m, w + t * KB * 512, static_cast<const float*>(params) + t * 16, acc);
                switch (R) {
                    case 1: KILN_TILE(1) break;
                    case 2: KILN_TILE(2) break;
                    case 3: KILN_TILE(3) break;
                    default: KILN_TILE(4) break;
                }
#undef KILN_TILE
                const int64_t left = N - t * 16;
                const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
                for (int64_t r = 0; r < R; ++r) store16(out + (m + r) * N + t * 16, acc[r], keep);
            }
    }
}

template <bool INT4>
static at::Tensor linear(const char* what, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& params, int64_t out_features,
                         const std::optional<at::Tensor>& bias) {
    const int64_t K = weights.size(1) * 32;
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, what, " linear of ", K, " inputs got x of shape ", x.sizes());
    TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous() && weights.dim() == 4 && weights.size(2) == (INT4 ? 4 : 8) &&
                    weights.size(3) == 64 && weights.size(0) * 16 >= out_features,
                what, " linear: the weights are not act_int8_linear's layout");
    if constexpr (INT4) {
        TORCH_CHECK(params.scalar_type() == at::kHalf && params.is_contiguous() && params.dim() == 4 && params.size(0) == weights.size(0) &&
                        params.size(1) == weights.size(1) && params.size(2) == 2 && params.size(3) == 16,
                    what, " linear: d and m are not act_int8_linear's layout");
    } else {
        TORCH_CHECK(params.scalar_type() == at::kFloat && params.is_contiguous() && params.numel() == weights.size(0) * 16, what,
                    " linear: the scales are not act_int8_linear's layout");
    }
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0);
    at::Tensor out = at::empty({M, out_features}, xc.options());
    at::Tensor xq = at::empty({M, K}, xc.options().dtype(at::kChar));
    at::Tensor stats = at::empty({M, 3, K / 32}, xc.options().dtype(at::kFloat));
    const auto* w = weights.const_data_ptr<uint8_t>();
    const void* p = params.const_data_ptr();
    const int64_t threads = at::get_num_threads();
    switch (xc.scalar_type()) {
        case at::kFloat:
            run<INT4>(xc.const_data_ptr<float>(), w, p, out.data_ptr<float>(), xq.data_ptr<int8_t>(), stats.data_ptr<float>(), M, out_features,
                      K, threads);
            break;
        case at::kBFloat16:
            run<INT4>(xc.const_data_ptr<c10::BFloat16>(), w, p, out.data_ptr<c10::BFloat16>(), xq.data_ptr<int8_t>(), stats.data_ptr<float>(), M,
                      out_features, K, threads);
            break;
        case at::kHalf:
            run<INT4>(xc.const_data_ptr<c10::Half>(), w, p, out.data_ptr<c10::Half>(), xq.data_ptr<int8_t>(), stats.data_ptr<float>(), M,
                      out_features, K, threads);
            break;
        default:
            TORCH_CHECK(false, what, " linear has no kernel for ", xc.scalar_type(), " activations");
    }
    if (bias.has_value()) out.add_(*bias);
    return out;
}

at::Tensor linear_w4a8(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& dm, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
    return linear<true>("int4 x int8", x, weights, dm, out_features, bias);
}

at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& scales, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
    return linear<false>("int8 x int8", x, weights, scales, out_features, bias);
}

#pragma GCC pop_options

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
    m.impl("linear_w4a8", &linear_w4a8);
    m.impl("linear_w8a8", &linear_w8a8);
}
