// genserve::decode_attention (and append_kv, below): attention for one new token per sequence, over that sequence's own cached
// keys and values (the decode step's attention; why: docs/design/decode-loop.md).
//
//   out[b, h, 0, :] = softmax(q[b, h, 0, :] . k[b, h, j, :] * scale, j < lengths[b]) @ v[b, h, j < lengths[b], :]
//
// Each (sequence, head) is computed alone, in a fixed order, over its own length only: a row's result does
// not depend on its neighbours, the batch's longest context, or the thread count. The schema is defined
// in engine/kernels/__init__.py; this file only implements them for CPU float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, heads, 1, head_size), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: k and v must be (B, heads, L, head_size) alike, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "decode_attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == k.size(3) && v.stride(2) == v.size(3),
              "decode_attention: each head's cached positions must be contiguous rows");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0), "decode_attention: one length per sequence");
  const int64_t B = q.size(0), H = q.size(1), L = k.size(2), D = q.size(3);
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: length ", lp[b], " of sequence ", b, " outside 1..", L);
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s(L), qv(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lp[b];
      const float* qr = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) qv[d] = qr[d * q.stride(3)];  // contiguous, so the dot products vectorise
      const float* kb = kp + b * k.stride(0) + h * k.stride(1);
      const float* vb = vp + b * v.stride(0) + h * v.stride(1);
      float* o = op + i * D;
      float top = 0.f;  // no infinities: the build uses -ffast-math (n >= 1, so the first score sets it)
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = kb + j * D;
        const float* qd = qv.data();
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += qd[d] * kr[d];
        s[j] = acc * sc;
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
        const float p = s[j] * inv;
        const float* vr = vb + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * vr[d];
      }
    }
  });
  return out;
}

// kv[:, b, :, positions[b], :] = fresh[b] for every b: a decode step's new keys and values into the cache,
// without the generic indexing path (index_put took 5% of a step).
void append_kv(const at::Tensor& kv, const at::Tensor& fresh, const at::Tensor& positions) {
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2, "append_kv: kv must be (2, B, heads, L, head_size), got ", kv.sizes());
  TORCH_CHECK(fresh.dim() == 4 && fresh.size(0) == kv.size(1) && fresh.size(1) == 2 && fresh.size(2) == kv.size(2) && fresh.size(3) == kv.size(4),
              "append_kv: fresh must be (B, 2, heads, head_size) for kv ", kv.sizes(), ", got ", fresh.sizes());
  TORCH_CHECK(kv.scalar_type() == at::kFloat && fresh.scalar_type() == at::kFloat, "append_kv: float32 only");
  TORCH_CHECK(kv.stride(4) == 1 && fresh.stride(3) == 1, "append_kv: head_size must be the contiguous dimension");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == kv.size(1), "append_kv: one position per sequence");
  const int64_t B = kv.size(1), H = kv.size(2), L = kv.size(3), D = kv.size(4);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < L, "append_kv: position ", pp[b], " of sequence ", b, " outside 0..", L - 1);
  }
  float* kvp = kv.data_ptr<float>();
  const float* fp = fresh.data_ptr<float>();
  for (int64_t c = 0; c < 2; ++c) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* src = fp + b * fresh.stride(0) + c * fresh.stride(1) + h * fresh.stride(2);
        float* dst = kvp + c * kv.stride(0) + b * kv.stride(1) + h * kv.stride(2) + pp[b] * kv.stride(3);
        std::copy(src, src + D, dst);
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("append_kv", &append_kv);
}
