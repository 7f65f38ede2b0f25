// kiln::attention's CPU kernel for compiled models' decode steps, in C++: the op's Python kernel (dispatcher to
// Python, the checks, the call into the built kernel) cost about 30 us a layer, and each call crossed a CPython
// frame-stack chunk boundary whose mmap/munmap pair interrupted the other core's OpenMP worker (a TLB shootdown).
//
// attention_decode_cpu.py builds one kernel per variant (element types, heads, head dim, KV heads) and hands its
// address to `register_cpu_decode`. A call with `inplace_decode` set, one new token per request, a registered
// variant and the layouts the kernel reads runs it here; every other call goes to `attention_py`, the op's
// Python kernel (prefill, eager models, unbuilt variants, and the errors for inputs the kernel cannot read).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

namespace {

using Kernel = void (*)(const void*, const void*, const void*, const int32_t*, const int64_t*, const int64_t*, void*, float*, const void*,
                        const void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, float, int64_t, float, int64_t, int64_t, int64_t);
using Variant = std::tuple<at::ScalarType, int64_t, int64_t, int64_t, at::ScalarType>;  // q type, heads, head dim, KV heads, pool type

constexpr int64_t MAX_CHUNKS = 64;  // attention_decode_cpu.cpp merges a request's chunks in a fixed-size array

std::mutex registry_lock;
std::map<Variant, Kernel>& registry() {
    static std::map<Variant, Kernel> kernels;
    return kernels;
}

void register_cpu_decode(const at::Tensor& q_like, const at::Tensor& pool_like, int64_t address) {
    std::lock_guard<std::mutex> hold(registry_lock);
    registry()[{q_like.scalar_type(), q_like.size(0), q_like.size(1), pool_like.size(1), pool_like.scalar_type()}] =
        reinterpret_cast<Kernel>(address);
}

Kernel find(const at::Tensor& q, const at::Tensor& pool) {
    std::lock_guard<std::mutex> hold(registry_lock);
    auto it = registry().find({q.scalar_type(), q.size(1), q.size(2), pool.size(1), pool.scalar_type()});
    return it == registry().end() ? nullptr : it->second;
}

bool rows_contiguous(const at::Tensor& t, int64_t batch, int64_t kv_heads, int64_t dim) {
    return t.dim() == 3 && t.size(0) == batch && t.size(1) == kv_heads && t.size(2) == dim && t.stride(1) == dim && t.stride(2) == 1;
}

// Launches a built kernel: the one place that decides how a request's context is chunked and allocates the
// chunks' scratch, for both callers (the op's decode steps here, `decode_inplace_cpu` from Python).
at::Tensor launch(Kernel kernel, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& table,
                  const at::Tensor& rows, const at::Tensor& lens, double scale, int64_t window, double cap, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& slots, int64_t stores) {
    const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), tasks = std::max<int64_t>(batch * kc.size(1), 1);
    const int64_t threads = at::get_num_threads();
    // Enough tasks for the threads: a lone request's context is split (the kernel leaves chunks past a short
    // context empty), a full batch's is not.
    const int64_t chunks = std::min(MAX_CHUNKS, (4 * threads + tasks - 1) / tasks);
    const at::Tensor qc = q.contiguous(), rc = rows.contiguous(), lc = lens.contiguous(), sc = slots.contiguous();
    at::Tensor out = at::empty_like(qc);
    at::Tensor scratch = chunks > 1 ? at::empty({batch * chunks * heads * (dim + 2)}, qc.options().dtype(at::kFloat)) : at::Tensor();
    kernel(qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), table.const_data_ptr<int32_t>(), rc.const_data_ptr<int64_t>(),
           lc.const_data_ptr<int64_t>(), out.data_ptr(), chunks > 1 ? scratch.data_ptr<float>() : nullptr, k.const_data_ptr(),
           v.const_data_ptr(), stores ? sc.const_data_ptr<int64_t>() : nullptr, batch, table.stride(0), chunks, threads,
           static_cast<float>(scale), window, static_cast<float>(cap), stores, stores ? k.stride(0) : 0, stores ? v.stride(0) : 0);
    return out;
}

// decode_inplace's launch, once attention_decode_cpu.py has checked the inputs and built the variant.
at::Tensor decode_inplace_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& req_to_token,
                              const at::Tensor& req_indices, const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                              double logit_cap, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out_slots, int64_t stores) {
    const Kernel kernel = find(q, k_cache);
    TORCH_CHECK(kernel != nullptr, "kiln::decode_inplace_cpu: no kernel was built for this variant");
    return launch(kernel, q, k_cache, v_cache, req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap, k, v, out_slots, stores);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     int64_t layer, const at::Tensor& out_slots, const at::Tensor& req_to_token, const at::Tensor& req_indices,
                     const at::Tensor& seq_lens, const at::Tensor& extend_lens, const at::Tensor& extend_starts, const at::Tensor& max_extend_len,
                     double scale, bool causal, int64_t sliding_window, double logit_cap, bool inplace_decode) {
    if (inplace_decode && q.dim() == 3 && q.size(0) == req_indices.size(0) && max_extend_len.scalar_type() == at::kLong &&
        max_extend_len.numel() > 0 && max_extend_len.const_data_ptr<int64_t>()[0] <= 1) {
        const at::Tensor kc = k_cache.select(0, layer), vc = v_cache.select(0, layer);
        const int64_t batch = q.size(0), dim = q.size(2), kv_heads = kc.size(1);
        const Kernel kernel = find(q, kc);
        // What decode_inplace checks; a call that fails any of it goes to the Python kernel, which raises its error.
        const bool readable = kernel != nullptr && kc.is_contiguous() && vc.is_contiguous() && vc.scalar_type() == kc.scalar_type() &&
                              req_to_token.scalar_type() == at::kInt && req_to_token.stride(1) == 1 && req_indices.scalar_type() == at::kLong &&
                              seq_lens.scalar_type() == at::kLong && out_slots.scalar_type() == at::kLong && out_slots.size(0) == batch &&
                              k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                              rows_contiguous(k, batch, kv_heads, dim) && rows_contiguous(v, batch, kv_heads, dim);
        if (readable)
            return launch(kernel, q, kc, vc, req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap, k, v, out_slots, batch);
    }
    static const auto python = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::attention_py", "").typed<decltype(attention)>();
    return python.call(q, k, v, k_cache, v_cache, layer, out_slots, req_to_token, req_indices, seq_lens, extend_lens, extend_starts,
                       max_extend_len, scale, causal, sliding_window, logit_cap, inplace_decode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
    m.def("register_cpu_decode(Tensor q_like, Tensor pool_like, int address) -> ()", &register_cpu_decode);
    m.def("decode_inplace_cpu(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor req_to_token, Tensor req_indices, "
          "Tensor seq_lens, float scale, int sliding_window, float logit_cap, Tensor k, Tensor v, Tensor out_slots, int stores) -> Tensor",
          &decode_inplace_cpu);
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
    m.impl("attention", &attention);
}
