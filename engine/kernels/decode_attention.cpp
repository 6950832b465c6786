// genserve::decode_attention (and append_kv, below): attention for one new token per sequence, over that sequence's own cached
// keys and values (the decode step's attention; why: docs/design/decode-loop.md).
//
//   out[b, h, 0, :] = softmax(q[b, h, 0, :] . k[b, h, j, :] * scale, j < lengths[b]) @ v[b, h, j < lengths[b], :]
//
// Each (sequence, head) is computed alone, in a fixed order, over its own length only: a row's result does
// not depend on its neighbours, the batch's longest context, or the thread count. The schema is defined
// in engine/kernels/__init__.py; this file only implements them for CPU: float32 queries, keys and
// values, over a float32 or float16 cache (--decode-precision int8 keeps its cache in float16).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

namespace {

// IEEE half as the compiler's own type (GCC 12+, clang 15+): converts with one instruction where the CPU
// has one; rows of it convert 8 at a time with F16C (below).
using Half = _Float16;
static_assert(sizeof(Half) == sizeof(at::Half), "_Float16 and at::Half must share their layout");

// q . k over D values, and o += p * v: float32 cache rows, and float16 ones (8 at a time with F16C).
inline float dot(const float* q, const float* k, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
}

inline void axpy(float p, const float* v, float* o, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
}

inline float dot(const float* q, const Half* k, int64_t D) {
  int64_t d = 0;
  float acc = 0.f;
#if defined(__F16C__) && defined(__AVX__)
  __m256 sum = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) {
    const __m256 kf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + d)));
    sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_loadu_ps(q + d), kf));
  }
  const __m128 half4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 half2 = _mm_add_ps(half4, _mm_movehl_ps(half4, half4));
  acc = _mm_cvtss_f32(_mm_add_ss(half2, _mm_movehdup_ps(half2)));
#endif
  for (; d < D; ++d) acc += q[d] * static_cast<float>(k[d]);
  return acc;
}

inline void axpy(float p, const Half* v, float* o, int64_t D) {
  int64_t d = 0;
#if defined(__F16C__) && defined(__AVX__)
  const __m256 pp = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8) {
    const __m256 vf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + d)));
    _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), _mm256_mul_ps(pp, vf)));
  }
#endif
  for (; d < D; ++d) o[d] += p * static_cast<float>(v[d]);
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* lp, float sc, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), L = k.size(2), D = q.size(3);
  const float* qp = q.data_ptr<float>();
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s(L), qv(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lp[b];
      const float* qr = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) qv[d] = qr[d * q.stride(3)];  // contiguous, so the dot products vectorise
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      float* o = op + i * D;
      float top = 0.f;  // no infinities: the build uses -ffast-math (n >= 1, so the first score sets it)
      for (int64_t j = 0; j < n; ++j) {
        s[j] = dot(qv.data(), kb + j * D, D) * sc;
        top = j == 0 ? s[j] : std::max(top, s[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - top);
        sum += s[j];
      }
      const float inv = 1.f / sum;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        axpy(s[j] * inv, vb + j * D, o, D);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, heads, 1, head_size), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: k and v must be (B, heads, L, head_size) alike, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "decode_attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat, "decode_attention: q must be float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "decode_attention: the cache must be float32 or float16, k and v alike");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == k.size(3) && v.stride(2) == v.size(3),
              "decode_attention: each head's cached positions must be contiguous rows");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0), "decode_attention: one length per sequence");
  const int64_t B = q.size(0), L = k.size(2);
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: length ", lp[b], " of sequence ", b, " outside 1..", L);
  }
  at::Tensor out = at::empty({B, q.size(1), 1, q.size(3)}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (k.scalar_type() == at::kHalf) {
    attend<Half>(q, k, v, lp, static_cast<float>(scale), out);
  } else {
    attend<float>(q, k, v, lp, static_cast<float>(scale), out);
  }
  return out;
}

// kv[:, b, :, positions[b], :] = fresh[b] for every b: a decode step's new keys and values into the cache,
// without the generic indexing path (index_put took 5% of a step).
template <typename T>
void append(const at::Tensor& kv, const at::Tensor& fresh, const int64_t* pp) {
  const int64_t B = kv.size(1), H = kv.size(2), D = kv.size(4);
  T* kvp = static_cast<T*>(kv.data_ptr());
  const float* fp = fresh.data_ptr<float>();
  for (int64_t c = 0; c < 2; ++c) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* src = fp + b * fresh.stride(0) + c * fresh.stride(1) + h * fresh.stride(2);
        T* dst = kvp + c * kv.stride(0) + b * kv.stride(1) + h * kv.stride(2) + pp[b] * kv.stride(3);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
      }
    }
  }
}

void append_kv(const at::Tensor& kv, const at::Tensor& fresh, const at::Tensor& positions) {
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2, "append_kv: kv must be (2, B, heads, L, head_size), got ", kv.sizes());
  TORCH_CHECK(fresh.dim() == 4 && fresh.size(0) == kv.size(1) && fresh.size(1) == 2 && fresh.size(2) == kv.size(2) && fresh.size(3) == kv.size(4),
              "append_kv: fresh must be (B, 2, heads, head_size) for kv ", kv.sizes(), ", got ", fresh.sizes());
  TORCH_CHECK(fresh.scalar_type() == at::kFloat && (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf),
              "append_kv: float32 keys and values into a float32 or float16 cache");
  TORCH_CHECK(kv.stride(4) == 1 && fresh.stride(3) == 1, "append_kv: head_size must be the contiguous dimension");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == kv.size(1), "append_kv: one position per sequence");
  const int64_t B = kv.size(1), L = kv.size(3);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < L, "append_kv: position ", pp[b], " of sequence ", b, " outside 0..", L - 1);
  }
  if (kv.scalar_type() == at::kHalf) {
    append<Half>(kv, fresh, pp);
  } else {
    append<float>(kv, fresh, pp);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("append_kv", &append_kv);
}
