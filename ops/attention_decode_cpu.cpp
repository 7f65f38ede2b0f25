// Decode attention over the slot pool, one new token per request, reading each cached K/V row where it lies.
//
// attention_decode_cpu.py puts the variant's types and sizes in front of this file (q_t, kv_t: the query's and
// the pool's element types; KVH, G, D: KV heads, query heads per KV head, head dim) and builds it with
// Inductor's C++ toolchain, whose at::vec picks this CPU's vector width.
//
// A task is one request's KV head over one chunk of its context. Each K row is loaded and converted once
// for the G query heads of its group; scores are taken for a block of keys, their softmax updated online
// (the running max and sum per head), then the same block's V rows are summed into G accumulators. Only the
// slots a request sees are read: a sliding window skips the rest, and slots past the length (which may
// hold anything, NaN included) are never touched. Chunks of one request and head are merged at the end
// through a scratch buffer of (max, sum, accumulator) per head.

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();
constexpr int64_t NV = (D + VL - 1) / VL;  // vectors per head row
constexpr int64_t BLOCK = 32;  // keys scored before their values are summed
constexpr int64_t PART = 2 + D;  // a chunk's partial result per head in scratch: max, sum, accumulator

constexpr int64_t AHEAD = 8;  // keys whose rows are fetched before they are needed (slots are scattered)

template <typename T>
inline void prefetch_row(const T* p) {
    for (int64_t i = 0; i < D * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + i);
}

template <typename T>
inline Vec load(const T* p, int64_t d) {
    int64_t n = std::min<int64_t>(VL, D - d);
    if constexpr (std::is_same_v<T, float>) {
        return Vec::loadu(p + d, n);
    } else {
        return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p + d, n));
    }
}

template <typename T>
inline void store(T* p, int64_t d, const Vec& x) {
    int64_t n = std::min<int64_t>(VL, D - d);
    if constexpr (std::is_same_v<T, float>) {
        x.store(p + d, n);
    } else {
        at::vec::convert<T>(x).store(p + d, n);
    }
}

inline float hsum(const Vec& x) {
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x);
}

// The G heads' attention over keys [begin, end): into `out` when that is the whole context, else their softmax
// state (max, sum, unnormalised output) into `part`.
static void attend_chunk(const q_t* q, const kv_t* k_cache, const kv_t* v_cache, const int32_t* slots, int64_t begin,
                         int64_t end, float scale, float cap, q_t* out, float* part) {
    Vec qv[G][NV];
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < NV; ++j) qv[g][j] = load(q + g * D, j * VL) * Vec(scale);
    Vec acc[G][NV];
    float run_max[G], run_sum[G];
    for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = 0; j < NV; ++j) acc[g][j] = Vec(0.f);
        run_max[g] = -std::numeric_limits<float>::infinity();
        run_sum[g] = 0.f;
    }
    alignas(64) float score[G][BLOCK];
    for (int64_t start = begin; start < end; start += BLOCK) {
        int64_t n = std::min<int64_t>(BLOCK, end - start);
        for (int64_t t = 0; t < n; ++t) {
            if (start + t + AHEAD < end) prefetch_row(k_cache + static_cast<int64_t>(slots[start + t + AHEAD]) * KVH * D);
            int64_t row = static_cast<int64_t>(slots[start + t]) * KVH * D;
            prefetch_row(v_cache + row);
            const kv_t* k = k_cache + row;
            Vec kv[NV];
            for (int64_t j = 0; j < NV; ++j) kv[j] = load(k, j * VL);
            for (int64_t g = 0; g < G; ++g) {
                Vec s = qv[g][0] * kv[0];
                for (int64_t j = 1; j < NV; ++j) s = at::vec::fmadd(qv[g][j], kv[j], s);
                score[g][t] = hsum(s);
            }
        }
        for (int64_t g = 0; g < G; ++g) {
            float* s = score[g];
            if (cap > 0.f)
                for (int64_t t = 0; t < n; t += VL) {
                    Vec x = Vec::loadu(s + t, std::min<int64_t>(VL, n - t));
                    (Vec(cap) * (x / Vec(cap)).tanh()).store(s + t, std::min<int64_t>(VL, n - t));
                }
            float block_max = run_max[g];
            for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, s[t]);
            float rescale = std::exp(run_max[g] - block_max);  // 0 on the first block (exp(-inf))
            run_max[g] = block_max;
            Vec total(0.f);
            for (int64_t t = 0; t < n; t += VL) {
                int64_t m = std::min<int64_t>(VL, n - t);
                Vec p = (Vec::loadu(s + t, m) - Vec(block_max)).exp_u20();
                p = Vec::set(Vec(0.f), p, m);  // lanes past the block's keys count nothing
                p.store(s + t, m);
                total = total + p;
            }
            run_sum[g] = run_sum[g] * rescale + hsum(total);
            for (int64_t j = 0; j < NV; ++j) acc[g][j] = acc[g][j] * Vec(rescale);
        }
        for (int64_t t = 0; t < n; ++t) {
            const kv_t* v = v_cache + static_cast<int64_t>(slots[start + t]) * KVH * D;
            Vec vv[NV];
            for (int64_t j = 0; j < NV; ++j) vv[j] = load(v, j * VL);
            for (int64_t g = 0; g < G; ++g) {
                Vec p(score[g][t]);
                for (int64_t j = 0; j < NV; ++j) acc[g][j] = at::vec::fmadd(p, vv[j], acc[g][j]);
            }
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        if (out != nullptr) {
            // The whole context in one chunk: the result itself. An empty request (padding) sees nothing: zeros.
            Vec inv(run_sum[g] > 0.f ? 1.f / run_sum[g] : 0.f);
            for (int64_t j = 0; j < NV; ++j) store(out + g * D, j * VL, acc[g][j] * inv);
        } else {
            float* p = part + g * PART;
            p[0] = run_max[g];
            p[1] = run_sum[g];
            for (int64_t j = 0; j < NV; ++j) store(p + 2, j * VL, acc[g][j]);
        }
    }
}

// q: [batch, KVH * G, D]; caches: [slots, KVH, D]; table: req_to_token, rows `table_stride` apart; rows, lens:
// [batch] int64; out: [batch, KVH * G, D]; scratch: [batch, KVH, chunks, G, PART] floats when chunks > 1.
// k_new, v_new: `stores` rows of [KVH, D] (k_new_stride, v_new_stride elements apart) written to the caches at out_slots first.
extern "C" void kernel(const q_t* q, const kv_t* k_cache, const kv_t* v_cache, const int32_t* table, const int64_t* rows,
                       const int64_t* lens, q_t* out, float* scratch, const q_t* k_new, const q_t* v_new, const int64_t* out_slots,
                       int64_t batch, int64_t table_stride, int64_t chunks, int64_t threads, float scale, int64_t window, float cap,
                       int64_t stores, int64_t k_new_stride, int64_t v_new_stride) {
    constexpr float NO_KEY = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(threads)
    {
        // This step's K/V, which every request's newest key is, before any task reads the pool. A few hundred
        // bytes a row: one thread, so padding rows that share a scratch slot do not race; the barrier at its end
        // holds the others.
#pragma omp single
        for (int64_t r = 0; r < stores; ++r) {
            kv_t* k = const_cast<kv_t*>(k_cache) + out_slots[r] * KVH * D;
            kv_t* v = const_cast<kv_t*>(v_cache) + out_slots[r] * KVH * D;
            for (int64_t i = 0; i < KVH * D; ++i) {
                k[i] = static_cast<kv_t>(static_cast<float>(k_new[r * k_new_stride + i]));
                v[i] = static_cast<kv_t>(static_cast<float>(v_new[r * v_new_stride + i]));
            }
        }
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t h = 0; h < KVH; ++h)
                for (int64_t c = 0; c < chunks; ++c) {
                    int64_t len = lens[b];
                    int64_t first = (window > 0 && len > window) ? len - window : 0;
                    // A chunk under one block of keys costs more than it saves; the chunks past the context are empty.
                    int64_t per_chunk = std::max<int64_t>(BLOCK, (len - first + chunks - 1) / chunks);
                    int64_t begin = std::min(len, first + c * per_chunk), end = std::min(len, begin + per_chunk);
                    int64_t head = (b * KVH + h) * G;
                    attend_chunk(q + head * D, k_cache + h * D, v_cache + h * D, table + rows[b] * table_stride, begin, end, scale,
                                 cap, chunks == 1 ? out + head * D : nullptr, scratch + (head * chunks + c * G) * PART);
                }
        if (chunks > 1) {
#pragma omp for collapse(2)
            for (int64_t b = 0; b < batch; ++b)
                for (int64_t h = 0; h < KVH; ++h)
                    for (int64_t g = 0; g < G; ++g) {
                        int64_t head = (b * KVH + h) * G;
                        const float* part = scratch + (head * chunks + g) * PART;
                        constexpr int64_t STEP = G * PART;
                        float top = NO_KEY;
                        for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part[c * STEP]);
                        float weight[64], total = 0.f;  // chunks <= 64 (attention_decode_cpu.py)
                        for (int64_t c = 0; c < chunks; ++c) {
                            weight[c] = part[c * STEP] == NO_KEY ? 0.f : std::exp(part[c * STEP] - top);
                            total += weight[c] * part[c * STEP + 1];
                        }
                        Vec inv(total > 0.f ? 1.f / total : 0.f);  // an empty request (padding) sees nothing: zeros
                        for (int64_t j = 0; j < NV; ++j) {
                            Vec sum(0.f);
                            for (int64_t c = 0; c < chunks; ++c) sum = at::vec::fmadd(Vec(weight[c]), load(part + c * STEP + 2, j * VL), sum);
                            store(out + (head + g) * D, j * VL, sum * inv);
                        }
                    }
        }
    }
}
