// LayerNorm over the last dimension on CPU, forward and backward, with the output in
// a dtype of the caller's choice and the incoming gradient in any float dtype.
//
// Our own code, measured faster (bench/tnt_bench.py, bench/README.md): TNT's inner
// stream normalises rows of 24 (TNT-S) pixel-embedding channels, 25088 rows per image
// batch of 8. torch's CPU kernels vectorise along a row, which is idle on rows this
// short: the backward pass took 1.3 ms per call in the model (fp32 under autocast).
// Under bf16 autocast the float32 output is then cast to bf16 once per consuming
// linear layer (twice for the attention's qk and v) and the bf16 gradients cast back,
// each a pass over memory. Here the output is written once, in the dtype its consumers
// read (the autocast dtype when they are all linear layers, whose autocast cast of a
// float32 input to bf16 would give exactly these values), and the backward pass reads
// the gradient in whatever dtype it arrives.
// Maths in float32 for every dtype (float32, bfloat16, float16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace {

// Rows of kN (> 0: known at compile time, for TNT's inner widths) or n channels.
template <int64_t kN, typename in_t, typename out_t>
void forward_rows(const in_t* __restrict x, const float* __restrict w, const float* __restrict b, out_t* __restrict y,
                  float* __restrict mean, float* __restrict rstd, int64_t begin, int64_t end, const int64_t n,
                  const float eps) {
  const int64_t N = kN > 0 ? kN : n;
  std::vector<float> buf(N);
  float* __restrict xf = buf.data();
  for (int64_t r = begin; r < end; ++r) {
    const in_t* __restrict xr = x + r * N;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < N; ++i) {
      xf[i] = tntp::to_float(xr[i]);
      s += xf[i];
    }
    const float mu = s / N;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < N; ++i) {
      const float d = xf[i] - mu;
      ss += d * d;
    }
    const float rs = 1.f / std::sqrt(ss / N + eps);
    out_t* __restrict yr = y + r * N;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
      const float xh = (xf[i] - mu) * rs;
      yr[i] = tntp::from_float<out_t>(w ? (b ? xh * w[i] + b[i] : xh * w[i]) : (b ? xh + b[i] : xh));
    }
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w; dw = sum dy xhat and
// db = sum dy over the rows of [begin, end), added into acc (2 x N floats).
template <int64_t kN, typename in_t, typename grad_t>
void backward_rows(const grad_t* __restrict dy, const in_t* __restrict x, const float* __restrict w,
                   const float* __restrict mean, const float* __restrict rstd, in_t* __restrict dx,
                   float* __restrict acc, int64_t begin, int64_t end, const int64_t n) {
  const int64_t N = kN > 0 ? kN : n;
  std::vector<float> buf(2 * N);
  float* __restrict xh = buf.data();
  float* __restrict g = buf.data() + N;
  float* __restrict dw = acc;
  float* __restrict db = acc + N;
  for (int64_t r = begin; r < end; ++r) {
    const in_t* __restrict xr = x + r * N;
    const grad_t* __restrict dyr = dy + r * N;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t i = 0; i < N; ++i) {
      const float d = tntp::to_float(dyr[i]);
      xh[i] = (tntp::to_float(xr[i]) - mu) * rs;
      dw[i] += d * xh[i];
      db[i] += d;
      g[i] = w ? d * w[i] : d;
      sg += g[i];
      sgx += g[i] * xh[i];
    }
    const float c2 = sg / N, c1 = sgx / N;
    in_t* __restrict dxr = dx + r * N;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) dxr[i] = tntp::from_float<in_t>(rs * (g[i] - c2 - xh[i] * c1));
  }
}

template <typename in_t, typename out_t>
void forward_kernel(const in_t* x, const float* w, const float* b, out_t* y, float* mean, float* rstd, int64_t R,
                    int64_t N, float eps) {
  at::parallel_for(0, R, 512, [&](int64_t begin, int64_t end) {
    switch (N) {
      case 12: return forward_rows<12>(x, w, b, y, mean, rstd, begin, end, N, eps);
      case 24: return forward_rows<24>(x, w, b, y, mean, rstd, begin, end, N, eps);
      case 40: return forward_rows<40>(x, w, b, y, mean, rstd, begin, end, N, eps);
      default: return forward_rows<0>(x, w, b, y, mean, rstd, begin, end, N, eps);
    }
  });
}

template <typename in_t, typename grad_t>
void backward_kernel(const grad_t* dy, const in_t* x, const float* w, const float* mean, const float* rstd, in_t* dx,
                     float* acc, int64_t R, int64_t N) {
  // one accumulator (dw, db) per thread, summed at the end
  at::parallel_for(0, R, 512, [&](int64_t begin, int64_t end) {
    float* a = acc + at::get_thread_num() * 2 * N;
    switch (N) {
      case 12: return backward_rows<12>(dy, x, w, mean, rstd, dx, a, begin, end, N);
      case 24: return backward_rows<24>(dy, x, w, mean, rstd, dx, a, begin, end, N);
      case 40: return backward_rows<40>(dy, x, w, mean, rstd, dx, a, begin, end, N);
      default: return backward_rows<0>(dy, x, w, mean, rstd, dx, a, begin, end, N);
    }
  });
}

void check_params(const c10::optional<at::Tensor>& p, int64_t N, const char* what) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == N, "layer_norm: ", what,
              " must be a contiguous float32 vector of the row width");
}

const float* data_or_null(const c10::optional<at::Tensor>& p) { return p.has_value() ? p->data_ptr<float>() : nullptr; }

// x (..., N) -> y (..., N) in out_dtype, mean and rstd (x.numel() / N) in float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                             const c10::optional<at::Tensor>& bias, double eps,
                                                             at::ScalarType out_dtype) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "layer_norm: empty rows");
  const int64_t N = x.size(-1), R = x.numel() / N;
  check_params(weight, N, "weight");
  check_params(bias, N, "bias");
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor mean = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({R}, x.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(x.scalar_type(), "layer_norm_fwd", TNTP_FLOAT_CASES([&] {
    using in_t = scalar_t;
    AT_DISPATCH_SWITCH(out_dtype, "layer_norm_fwd", TNTP_FLOAT_CASES([&] {
      forward_kernel<in_t, scalar_t>(x.data_ptr<in_t>(), data_or_null(weight), data_or_null(bias),
                                     y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), R, N,
                                     static_cast<float>(eps));
    }));
  }));
  return {y, mean, rstd};
}

// -> dx (x's dtype and shape), dw and db (N, float32: the caller casts and drops what
// it does not need).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                             const c10::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd) {
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  TORCH_CHECK(dy.sizes() == x.sizes(), "layer_norm: gradient and input shapes differ");
  const int64_t N = x.size(-1), R = x.numel() / N;
  check_params(weight, N, "weight");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == R &&
                  rstd.numel() == R && mean.is_contiguous() && rstd.is_contiguous(),
              "layer_norm: mean and rstd from layer_norm_fwd expected");
  at::Tensor dx = at::empty_like(x);
  at::Tensor acc = at::zeros({at::get_num_threads(), 2, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(x.scalar_type(), "layer_norm_bwd", TNTP_FLOAT_CASES([&] {
    using in_t = scalar_t;
    AT_DISPATCH_SWITCH(dy.scalar_type(), "layer_norm_bwd", TNTP_FLOAT_CASES([&] {
      backward_kernel<in_t, scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<in_t>(), data_or_null(weight),
                                      mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<in_t>(),
                                      acc.data_ptr<float>(), R, N);
    }));
  }));
  at::Tensor sums = acc.sum(0);
  return {dx, sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tntp, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tntp, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}
