// PartialConnection, compiled: the same forward and backward as paca.function.PartialConnectionFn,
// which stays the reference and the fallback wherever this file cannot be built.
//
// Why C++: a Python torch.autograd.Function costs tens of microseconds per call in forward and
// again in backward. On a CPU, with the 7 projections of every decoder layer, that was about a
// fifth of PaCA's step-time overhead over a frozen model (bench/bench_step.py, config A).
//
// Two entry points to one function:
// - the Python module's partial_connection (pybind11): what eager CPU forwards call, the
//   cheapest call from Python (about 3 us less per call than going through torch.ops);
// - the operator paca::partial_connection (TORCH_LIBRARY), which torch.compile can trace. It is
//   registered as CompositeImplicitAutograd: the dispatcher runs it above autograd, so its
//   autograd node is the one below, and every dispatch mode, profiler and tracer sees the aten ops
//   it calls (the gather, the GEMM; in backward the two GEMMs), never an opaque op. So it needs no
//   fake kernel: on fake and meta tensors those aten ops run their own.
#include <torch/extension.h>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct PartialConnection : public torch::autograd::Function<PartialConnection> {
  // y = x @ W.T + b; saves only x[..., indices] (and W, which is a parameter: saved for free).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& paca_weight,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& indices, double scaling) {
    at::Tensor partial_x = x.index_select(-1, indices);
    at::Tensor y = at::linear(x, weight, bias);
    if (partial_x.scalar_type() != y.scalar_type()) {
      // Autocast: keep the r columns in the dtype grad_y will have (see the Python function).
      partial_x = partial_x.to(y.scalar_type());
    }
    ctx->save_for_backward({partial_x, weight});
    ctx->saved_data["scaling"] = scaling;
    return y;
  }

  // grad_x = grad_y @ W, as a frozen linear; grad_P = scaling * (x_idx^T @ grad_y)^T, one GEMM.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& partial_x = saved[0];
    at::Tensor weight = saved[1];
    const at::Tensor& grad_y = grad_outputs[0];
    at::Tensor grad_x, grad_p;
    if (ctx->needs_input_grad(0)) {
      if (weight.scalar_type() != grad_y.scalar_type()) {
        weight = weight.to(grad_y.scalar_type());
      }
      grad_x = grad_y.matmul(weight);
    }
    if (ctx->needs_input_grad(1)) {
      const double scaling = ctx->saved_data["scaling"].toDouble();
      grad_p = at::addmm(partial_x.new_empty({}), partial_x.reshape({-1, partial_x.size(-1)}).t(),
                         grad_y.reshape({-1, grad_y.size(-1)}), /*beta=*/0, /*alpha=*/scaling)
                   .t();
    }
    // One entry per forward argument: x, paca_weight, weight, bias, indices, scaling.
    return {grad_x, grad_p, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor partial_connection(const at::Tensor& x, const at::Tensor& paca_weight,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& indices, double scaling) {
  return PartialConnection::apply(x, paca_weight, weight, bias, indices, scaling);
}

TORCH_LIBRARY(paca, m) {
  m.def(
      "partial_connection(Tensor x, Tensor paca_weight, Tensor weight, Tensor? bias, "
      "Tensor indices, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(paca, CompositeImplicitAutograd, m) {
  m.impl("partial_connection", &partial_connection);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("partial_connection", &partial_connection,
        "PaCA's linear: y = x @ W.T + b, gradient to paca_weight from x[..., indices] only");
}
