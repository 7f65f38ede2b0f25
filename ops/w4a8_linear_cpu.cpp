// out[m, n] = sum over blocks b of 32 inputs: xs[m, b] * d[n, b] * sum_j q[n, 32b + j] * xq[m, 32b + j]
//                                            + xsum[m, b] * mn[n, b]
// the int4 weights w = d * q + mn (q in 0..15, a GGUF Q4_1 block) against the row x quantized per block of 32,
// x ~ xs * xq (xq int8, xs = max|x| / 127), with the block's exact sum xsum for the minimum's term.
//
// Layouts (w4a8_linear.py packs them; outputs padded with zeros to whole tiles of 16):
//   w:  [N / 16, K / 32, 4, 64] bytes. Load j of a block is 16 outputs x 4 inputs, byte (lane, i) holding
//       q[lane, 32b + 8j + i] in its low nibble and q[lane, 32b + 8j + 4 + i] in its high one, so one AND and one
//       shift make two operands of AVX512-VNNI's vpdpbusd (unsigned weights x signed activations, 4 products a lane).
//   dm: [N / 16, K / 32, 2, 16] float16: the 16 outputs' d, then their mn.
//
// A row's float sum for an output runs over its blocks in order, the same however many rows the call has and
// wherever the row sits in them: a row's result does not depend on its batch.
//
// w4a8_linear.py builds this with Inductor's C++ toolchain, on CPUs with AVX512-VNNI only, and loads it: the
// library registers `kiln::linear_w4a8`'s CPU kernel, which compiled pieces then call without Python.

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

// One row's block of 32 inputs: xq = round(x * 127 / max|x|) (to nearest even), its scale and the exact sum.
template <typename act_t>
static inline void quantize_block(const act_t* x, int8_t* xq, float* scale, float* sum) {
    __m512 a = load16(x), b = load16(x + 16);
    float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
    *scale = top / 127.f;
    *sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

// R rows against one tile of 16 outputs: each block's weights are unpacked once and used for every row.
template <int R, typename act_t>
static inline void tile(const int8_t* xq, const float* xs, int64_t K, int64_t KB, const uint8_t* w, const uint16_t* dm,
                        act_t* out, int64_t N, int64_t n0) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < KB; ++b) {
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
            const int32_t* x4 = reinterpret_cast<const int32_t*>(xq + r * K + b * 32);
            __m512i dot = _mm512_setzero_si512();
            for (int i = 0; i < 8; ++i) dot = _mm512_dpbusd_epi32(dot, q[i], _mm512_set1_epi32(x4[i]));
            const float* s = xs + r * 2 * KB;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(s[b])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(s[KB + b]), acc[r]);
        }
    }
    __mmask16 keep = N - n0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n0)) - 1);
    for (int r = 0; r < R; ++r) store16(out + r * N + n0, acc[r], keep);
}

// x [M, K] -> out [M, N]; xq [M, K] int8 and xs [M, 2, K / 32] (scales, then sums) are the call's scratch.
template <typename act_t>
static void w4a8(const act_t* x, const uint8_t* w, const uint16_t* dm, act_t* out, int8_t* xq, float* xs, int64_t M,
                       int64_t N, int64_t K, int64_t threads) {
    constexpr int64_t ROWS = 4;  // rows a tile takes at once: 4 float accumulators and 8 weight operands in registers
    const int64_t KB = K / 32, tiles = (N + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for
        for (int64_t i = 0; i < M * KB; ++i) {
            int64_t m = i / KB, b = i % KB;
            quantize_block(x + m * K + b * 32, xq + m * K + b * 32, xs + m * 2 * KB + b, xs + m * 2 * KB + KB + b);
        }
#pragma omp for collapse(2)
        for (int64_t t = 0; t < tiles; ++t)
            for (int64_t m = 0; m < M; m += ROWS) {
                const uint8_t* wt = w + t * KB * 256;
                const uint16_t* dt = dm + t * KB * 32;
                const int8_t* q = xq + m * K;
                const float* s = xs + m * 2 * KB;
                act_t* o = out + m * N;
                switch (M - m < ROWS ? M - m : ROWS) {
                    case 1: tile<1>(q, s, K, KB, wt, dt, o, N, t * 16); break;
                    case 2: tile<2>(q, s, K, KB, wt, dt, o, N, t * 16); break;
                    case 3: tile<3>(q, s, K, KB, wt, dt, o, N, t * 16); break;
                    default: tile<4>(q, s, K, KB, wt, dt, o, N, t * 16); break;
                }
            }
    }
}

at::Tensor linear_w4a8(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& dm, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
    const int64_t K = weights.size(1) * 32;
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4 x int8 linear of ", K, " inputs got x of shape ", x.sizes());
    TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous() && weights.dim() == 4 && weights.size(2) == 4 &&
                    weights.size(3) == 64 && weights.size(0) * 16 >= out_features,
                "int4 x int8 linear: weights are not w4a8_linear.pack's layout");
    TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 4 && dm.size(0) == weights.size(0) &&
                    dm.size(1) == weights.size(1) && dm.size(2) == 2 && dm.size(3) == 16,
                "int4 x int8 linear: d and m are not w4a8_linear.pack's layout");
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0);
    at::Tensor out = at::empty({M, out_features}, xc.options());
    at::Tensor xq = at::empty({M, K}, xc.options().dtype(at::kChar));
    at::Tensor xs = at::empty({M, 2, K / 32}, xc.options().dtype(at::kFloat));
    const auto* w = weights.const_data_ptr<uint8_t>();
    const auto* d = reinterpret_cast<const uint16_t*>(dm.const_data_ptr());
    const int64_t threads = at::get_num_threads();
    switch (xc.scalar_type()) {
        case at::kFloat:
            w4a8(xc.const_data_ptr<float>(), w, d, out.data_ptr<float>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(), M, out_features, K, threads);
            break;
        case at::kBFloat16:
            w4a8(xc.const_data_ptr<c10::BFloat16>(), w, d, out.data_ptr<c10::BFloat16>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(), M,
                 out_features, K, threads);
            break;
        case at::kHalf:
            w4a8(xc.const_data_ptr<c10::Half>(), w, d, out.data_ptr<c10::Half>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(), M,
                 out_features, K, threads);
            break;
        default:
            TORCH_CHECK(false, "int4 x int8 linear has no kernel for ", xc.scalar_type(), " activations");
    }
    if (bias.has_value()) out.add_(*bias);
    return out;
}

#pragma GCC pop_options

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("linear_w4a8", &linear_w4a8); }
