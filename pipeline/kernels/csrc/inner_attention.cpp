// Fused CPU kernel for TNT's inner attention: softmax(q k^T * scale) v over the few
// (16) pixel tokens of each patch, per head, forward and backward.
//
// Our own code, measured faster (bench/tnt_bench.py, bench/README.md): in eager
// PyTorch this attention is ~20 small passes over memory (head layout copies, a batched
// 16x16x6 matmul that runs at a few % of the GEMM peak, dtype casts, a softmax whose
// vector code is idle on 16-element rows), ~9 ms per TNT-S block, fwd+bwd, on 2 cores.
// Here one pass per patch (all its heads) does all of it in registers and L1: it reads q, k
// and v straight from the layout the qk and v linear layers wrote, writes the output
// in the layout the projection reads, and stores only the max and 1/sum of each
// softmax row for the backward pass (which recomputes the probabilities, as flash
// attention does).
// Maths in float32 for every input dtype (float32, bfloat16, float16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kMaxTokens = 64;
constexpr int64_t kMaxHeadDim = 64;

void check(const at::Tensor& qk, const at::Tensor& v, int64_t heads) {
  TORCH_CHECK(qk.dim() == 3 && v.dim() == 3, "inner_attention: qk (P, T, 2C) and v (P, T, C) expected");
  TORCH_CHECK(qk.is_contiguous() && v.is_contiguous(), "inner_attention: contiguous inputs expected");
  const int64_t T = v.size(1), C = v.size(2);
  TORCH_CHECK(qk.size(0) == v.size(0) && qk.size(1) == T && qk.size(2) == 2 * C, "inner_attention: qk and v shapes differ");
  TORCH_CHECK(heads > 0 && C % heads == 0, "inner_attention: width not divisible by heads");
  TORCH_CHECK(T <= kMaxTokens && C / heads <= kMaxHeadDim, "inner_attention: too many tokens or too wide heads");
  TORCH_CHECK(qk.scalar_type() == v.scalar_type(), "inner_attention: qk and v dtypes differ");
}

// One (patch, head): T tokens of head width D, read from / written to rows of width C
// (q at column h*D of the qk rows, k at C + h*D). Scalars are passed by value so the
// compiler knows no store aliases them. Every inner loop runs over tokens, with no
// reduction across vector lanes: the forward pass keeps one query per lane (scores
// stored key-major, so the softmax max/sum are lane-wise); the backward pass keeps one
// key per lane for dK/dV and a transposed copy of dS for dQ. stats holds the row max m
// and 1/sum of the softmax (2 x T floats); the backward pass recomputes P from them.
template <int64_t kT, int64_t kD>
void forward_task(const float* __restrict qk, const float* __restrict v, float* __restrict out, float* __restrict stats,
                  const int64_t tokens, const int64_t C, const int64_t dim, const float scale) {
  const int64_t T = kT > 0 ? kT : tokens;  // compile-time sizes for TNT's 16 tokens and head widths
  const int64_t D = kD > 0 ? kD : dim;
  alignas(64) float qt[kMaxHeadDim * kMaxTokens], k[kMaxTokens * kMaxHeadDim], vv[kMaxTokens * kMaxHeadDim];
  alignas(64) float e[kMaxTokens * kMaxTokens], ot[kMaxHeadDim * kMaxTokens];
  float* __restrict m = stats;
  float* __restrict inv = stats + T;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      qt[d * T + t] = qk[t * 2 * C + d] * scale;
      k[t * D + d] = qk[t * 2 * C + C + d];
      vv[t * D + d] = v[t * C + d];
    }
  }
  for (int64_t j = 0; j < T; ++j) {  // e[j][i] = score of query i against key j
    float* __restrict ej = e + j * T;
#pragma omp simd
    for (int64_t i = 0; i < T; ++i) ej[i] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float kd = k[j * D + d];
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) ej[i] += kd * qt[d * T + i];
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < T; ++i) m[i] = e[i];
  for (int64_t j = 1; j < T; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < T; ++i) m[i] = e[j * T + i] > m[i] ? e[j * T + i] : m[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < T; ++i) inv[i] = 0.0f;
  for (int64_t j = 0; j < T; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < T; ++i) {
      e[j * T + i] = tntp::exp_nonpos(e[j * T + i] - m[i]);
      inv[i] += e[j * T + i];
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < T; ++i) inv[i] = 1.0f / inv[i];
  for (int64_t d = 0; d < D; ++d) {  // accumulate in registers, one output column at a time
    alignas(64) float acc[kT > 0 ? kT : kMaxTokens] = {};
    for (int64_t j = 0; j < T; ++j) {
      const float vd = vv[j * D + d];
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) acc[i] += vd * e[j * T + i];
    }
#pragma omp simd
    for (int64_t i = 0; i < T; ++i) ot[d * T + i] = acc[i];
  }
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t d = 0; d < D; ++d) out[i * C + d] = ot[d * T + i] * inv[i];
  }
}

template <int64_t kT, int64_t kD>
void backward_task(const float* __restrict grad, const float* __restrict qk, const float* __restrict v,
                   const float* __restrict out, const float* __restrict stats, float* __restrict dqk, float* __restrict dv,
                   const int64_t tokens, const int64_t C, const int64_t dim, const float scale) {
  const int64_t T = kT > 0 ? kT : tokens;
  const int64_t D = kD > 0 ? kD : dim;
  alignas(64) float q[kMaxTokens * kMaxHeadDim], kt[kMaxHeadDim * kMaxTokens], vt[kMaxHeadDim * kMaxTokens];
  alignas(64) float dkt[kMaxHeadDim * kMaxTokens], dvt[kMaxHeadDim * kMaxTokens], dqt[kMaxHeadDim * kMaxTokens];
  alignas(64) float p[kMaxTokens * kMaxTokens], dsm[kMaxTokens * kMaxTokens], dst[kMaxTokens * kMaxTokens];
  alignas(64) float g[kMaxTokens * kMaxHeadDim];
  const float* __restrict m = stats;
  const float* __restrict inv = stats + T;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      q[t * D + d] = qk[t * 2 * C + d] * scale;
      kt[d * T + t] = qk[t * 2 * C + C + d];
      vt[d * T + t] = v[t * C + d];
    }
  }
  for (int64_t i = 0; i < T; ++i) {  // one query row, one key per lane: P and dS rows
    float di = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      g[i * D + d] = grad[i * C + d];
      di += g[i * D + d] * out[i * C + d];
    }
    float* __restrict pr = p + i * T;
    float* __restrict ds = dsm + i * T;
#pragma omp simd
    for (int64_t j = 0; j < T; ++j) pr[j] = ds[j] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[i * D + d], gd = g[i * D + d];
#pragma omp simd
      for (int64_t j = 0; j < T; ++j) {
        pr[j] += qd * kt[d * T + j];  // scores
        ds[j] += gd * vt[d * T + j];  // dP = dO v^T
      }
    }
    const float mi = m[i], invi = inv[i];
#pragma omp simd
    for (int64_t j = 0; j < T; ++j) {
      pr[j] = tntp::exp_nonpos(pr[j] - mi) * invi;
      ds[j] = pr[j] * (ds[j] - di);
    }
    for (int64_t j = 0; j < T; ++j) dst[j * T + i] = ds[j];
  }
  // dK = dS^T Q, dV = P^T dO (one key per lane), dQ = dS K (one query per lane), each
  // output column accumulated in registers: with compile-time sizes all 3 x D columns
  // at once (each row of dS, P and dS^T read once), otherwise one column at a time.
  if constexpr (kT > 0 && kD > 0) {
    alignas(64) float ak[kD][kT] = {}, av[kD][kT] = {}, aq[kD][kT] = {};
    for (int64_t r = 0; r < T; ++r) {
      for (int64_t d = 0; d < kD; ++d) {
        const float qd = q[r * D + d], gd = g[r * D + d], kd = kt[d * T + r];  // q carries the scale
#pragma omp simd
        for (int64_t l = 0; l < kT; ++l) {
          ak[d][l] += qd * dsm[r * T + l];
          av[d][l] += gd * p[r * T + l];
          aq[d][l] += kd * dst[r * T + l];
        }
      }
    }
    for (int64_t d = 0; d < kD; ++d) {
#pragma omp simd
      for (int64_t l = 0; l < kT; ++l) {
        dkt[d * T + l] = ak[d][l];
        dvt[d * T + l] = av[d][l];
        dqt[d * T + l] = aq[d][l];
      }
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      alignas(64) float ak[kT > 0 ? kT : kMaxTokens] = {}, av[kT > 0 ? kT : kMaxTokens] = {}, aq[kT > 0 ? kT : kMaxTokens] = {};
      for (int64_t r = 0; r < T; ++r) {
        const float qd = q[r * D + d], gd = g[r * D + d], kd = kt[d * T + r];  // q carries the scale
#pragma omp simd
        for (int64_t l = 0; l < T; ++l) {
          ak[l] += qd * dsm[r * T + l];
          av[l] += gd * p[r * T + l];
          aq[l] += kd * dst[r * T + l];
        }
      }
#pragma omp simd
      for (int64_t l = 0; l < T; ++l) {
        dkt[d * T + l] = ak[l];
        dvt[d * T + l] = av[l];
        dqt[d * T + l] = aq[l];
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      dqk[t * 2 * C + d] = dqt[d * T + t] * scale;
      dqk[t * 2 * C + C + d] = dkt[d * T + t];
      dv[t * C + d] = dvt[d * T + t];
    }
  }
}

template <typename scalar_t>
void to_float_block(const scalar_t* __restrict src, float* __restrict dst, const int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = tntp::to_float(src[i]);
}

template <typename scalar_t>
void from_float_block(const float* __restrict src, scalar_t* __restrict dst, const int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = tntp::from_float<scalar_t>(src[i]);
}

// The kernels run a patch at a time, all heads of it. float32 patches are read and
// written in place; 16-bit ones are converted to float32 a whole patch at a time (a
// contiguous block: vectorised, where per-element conversions in the heads' strided
// loops were not). With the compile-time head widths below, bf16 fwd+bwd per TNT-S
// block went 3.3 -> 1.8 ms (0.89 + 2.38 -> 0.49 + 1.31).
template <typename scalar_t, int64_t kT, int64_t kD>
void forward_patches(const scalar_t* qk, const scalar_t* v, scalar_t* out, float* stats, int64_t begin, int64_t end,
                     int64_t T, int64_t C, int64_t H, float scale) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t D = C / H, n = T * C;
  std::vector<float> buf(kFloat ? 0 : 4 * n);  // qk (2n), v, out
  for (int64_t p = begin; p < end; ++p) {
    const float *qkp, *vp;
    float* op;
    if constexpr (kFloat) {
      qkp = qk + p * 2 * n, vp = v + p * n, op = out + p * n;
    } else {
      to_float_block(qk + p * 2 * n, buf.data(), 2 * n);
      to_float_block(v + p * n, buf.data() + 2 * n, n);
      qkp = buf.data(), vp = buf.data() + 2 * n, op = buf.data() + 3 * n;
    }
    for (int64_t h = 0; h < H; ++h) forward_task<kT, kD>(qkp + h * D, vp + h * D, op + h * D, stats + (p * H + h) * 2 * T, T, C, D, scale);
    if constexpr (!kFloat) from_float_block(op, out + p * n, n);
  }
}

template <typename scalar_t, int64_t kT, int64_t kD>
void backward_patches(const scalar_t* grad, const scalar_t* qk, const scalar_t* v, const scalar_t* out, const float* stats,
                      scalar_t* dqk, scalar_t* dv, int64_t begin, int64_t end, int64_t T, int64_t C, int64_t H, float scale) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t D = C / H, n = T * C;
  std::vector<float> buf(kFloat ? 0 : 8 * n);  // grad, qk (2n), v, out, dqk (2n), dv
  for (int64_t p = begin; p < end; ++p) {
    const float *gp, *qkp, *vp, *op;
    float *dqkp, *dvp;
    if constexpr (kFloat) {
      gp = grad + p * n, qkp = qk + p * 2 * n, vp = v + p * n, op = out + p * n, dqkp = dqk + p * 2 * n, dvp = dv + p * n;
    } else {
      float* b = buf.data();
      to_float_block(grad + p * n, b, n);
      to_float_block(qk + p * 2 * n, b + n, 2 * n);
      to_float_block(v + p * n, b + 3 * n, n);
      to_float_block(out + p * n, b + 4 * n, n);
      gp = b, qkp = b + n, vp = b + 3 * n, op = b + 4 * n, dqkp = b + 5 * n, dvp = b + 7 * n;
    }
    for (int64_t h = 0; h < H; ++h) {
      backward_task<kT, kD>(gp + h * D, qkp + h * D, vp + h * D, op + h * D, stats + (p * H + h) * 2 * T, dqkp + h * D,
                            dvp + h * D, T, C, D, scale);
    }
    if constexpr (!kFloat) {
      from_float_block(dqkp, dqk + p * 2 * n, 2 * n);
      from_float_block(dvp, dv + p * n, n);
    }
  }
}

// Calls fn with compile-time token count and head width for TNT's inner attention
// (16 tokens; head width 6 in TNT-S, 10 in TNT-B), run-time ones otherwise.
template <typename F>
void with_sizes(int64_t T, int64_t D, F&& fn) {
  if (T == 16 && D == 6) return fn(std::integral_constant<int64_t, 16>{}, std::integral_constant<int64_t, 6>{});
  if (T == 16 && D == 10) return fn(std::integral_constant<int64_t, 16>{}, std::integral_constant<int64_t, 10>{});
  if (T == 16) return fn(std::integral_constant<int64_t, 16>{}, std::integral_constant<int64_t, 0>{});
  return fn(std::integral_constant<int64_t, 0>{}, std::integral_constant<int64_t, 0>{});
}

template <typename scalar_t>
void forward_kernel(const scalar_t* qk, const scalar_t* v, scalar_t* out, float* stats, int64_t P, int64_t T, int64_t C,
                    int64_t H, float scale) {
  with_sizes(T, C / H, [=](auto kT, auto kD) {
    at::parallel_for(0, P, 16, [=](int64_t begin, int64_t end) {
      forward_patches<scalar_t, decltype(kT)::value, decltype(kD)::value>(qk, v, out, stats, begin, end, T, C, H, scale);
    });
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* qk, const scalar_t* v, const scalar_t* out, const float* stats,
                     scalar_t* dqk, scalar_t* dv, int64_t P, int64_t T, int64_t C, int64_t H, float scale) {
  with_sizes(T, C / H, [=](auto kT, auto kD) {
    at::parallel_for(0, P, 16, [=](int64_t begin, int64_t end) {
      backward_patches<scalar_t, decltype(kT)::value, decltype(kD)::value>(grad, qk, v, out, stats, dqk, dv, begin, end, T, C, H, scale);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> inner_attention_fwd(const at::Tensor& qk, const at::Tensor& v, int64_t heads,
                                                       double scale) {
  check(qk, v, heads);
  const int64_t P = v.size(0), T = v.size(1), C = v.size(2);
  auto out = at::empty_like(v);
  auto stats = at::empty({P, heads, 2, T}, v.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(v.scalar_type(), "inner_attention_fwd", TNTP_FLOAT_CASES([&] {
    forward_kernel<scalar_t>(qk.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             stats.mutable_data_ptr<float>(), P, T, C, heads, static_cast<float>(scale));
  }));
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> inner_attention_bwd(const at::Tensor& grad_in, const at::Tensor& qk, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& stats, int64_t heads,
                                                       double scale) {
  check(qk, v, heads);
  const int64_t P = v.size(0), T = v.size(1), C = v.size(2);
  const auto grad = grad_in.to(v.scalar_type()).contiguous();
  TORCH_CHECK(grad.sizes() == v.sizes() && out.sizes() == v.sizes() && out.is_contiguous(), "inner_attention: bad grad/out");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == P * heads * 2 * T, "inner_attention: bad stats");
  auto dqk = at::empty_like(qk);
  auto dv = at::empty_like(v);
  AT_DISPATCH_SWITCH(v.scalar_type(), "inner_attention_bwd", TNTP_FLOAT_CASES([&] {
    backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), qk.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              out.const_data_ptr<scalar_t>(), stats.const_data_ptr<float>(), dqk.mutable_data_ptr<scalar_t>(),
                              dv.mutable_data_ptr<scalar_t>(), P, T, C, heads, static_cast<float>(scale));
  }));
  return {dqk, dv};
}

}  // namespace

TORCH_LIBRARY(tntp, m) {
  m.def("inner_attention_fwd(Tensor qk, Tensor v, int heads, float scale) -> (Tensor, Tensor)");
  m.def("inner_attention_bwd(Tensor grad, Tensor qk, Tensor v, Tensor out, Tensor stats, int heads, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tntp, CPU, m) {
  m.impl("inner_attention_fwd", &inner_attention_fwd);
  m.impl("inner_attention_bwd", &inner_attention_bwd);
}
