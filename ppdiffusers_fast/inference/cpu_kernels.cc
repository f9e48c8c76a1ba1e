// Fused float32 CPU kernels for the FLUX transformer graph run by the Paddle Inference predictor.
//
// Each kernel does in one pass over a [B, L, C] (or [B, L, H, D]) tensor what the exported graph does in 4-8
// separate ops (each its own pass, plus the expansion of the broadcast operand). They are inserted by
// ppdiffusers_fast/inference/kernel_fusions.py; ppdiffusers_fast/inference/cpu_kernels.py compiles and loads
// them. Built with -ffp-contract=off (no fused multiply-adds): the gate, rotary and packing kernels round every
// product and sum as the unfused ops do; the LayerNorm's mean and variance sum in another order (~1e-7 relative).
//
//   flux_layer_norm_modulate  out = LN(x) * scale + shift           (adaLN, DiT (Peebles & Xie 2023): scale = 1 + s)
//   flux_gated_residual       out = residual + gate * y             (adaLN-Zero gate)
//   flux_rope                 out = x * cos + rot(x) * sin          (RoFormer eq. 34, pairs (2j, 2j + 1))
//   flux_rope_pack_qkv        [B, L, 3, H, D] = stack([rope(q), rope(k), v], 2), q / k / v given as sequence parts
//                             concatenated along L (text then image tokens): the input of self_dp_attention
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "paddle/extension.h"

namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

void CheckFloat32(const paddle::Tensor& t, const char* op, const char* name) {
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", name, " must be float32");
  PD_CHECK(t.is_cpu(), op, ": ", name, " must be on the CPU");
}

// A per-sample vector [B, 1, C] (or [1, 1, C]) used with x [B, L, C]: returns the row stride (C, or 0 when the
// batch dimension is 1 and broadcast).
int64_t SampleVectorStride(const paddle::Tensor& v, int64_t batch, int64_t channels, const char* op,
                           const char* name) {
  const auto& s = v.shape();
  PD_CHECK(s.size() == 3 && s[1] == 1 && s[2] == channels && (s[0] == batch || s[0] == 1), op, ": ", name,
           " must be [", batch, ", 1, ", channels, "] (or batch 1), got ", ShapeText(s));
  return s[0] == 1 ? 0 : channels;
}

// sum_c term(row[c]) with kLanes independent partial sums (vectorised without reordering any one sum).
constexpr int64_t kLanes = 16;

template <typename Term>
float LaneSum(const float* __restrict row, int64_t n, Term term) {
  float lanes[kLanes] = {0.f};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += term(row[c + k]);
  float sum = 0.f;
  for (; c < n; ++c) sum += term(row[c]);
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  return sum;
}

// One head of the rotary embedding: out_j = v_j c_j + v_(j xor 1) n_j, with n = sin carrying the sign of rot(x)
// (-sin on even channels): the same products and sums as v cos + rot(v) sin (negation is exact).
inline void RotatePairs(const float* __restrict v, const float* __restrict c, const float* __restrict n,
                        float* __restrict o, int64_t dim) {
  for (int64_t j = 0; j < dim; j += 2) {
    o[j] = v[j] * c[j] + v[j + 1] * n[j];
    o[j + 1] = v[j + 1] * c[j + 1] + v[j] * n[j + 1];
  }
}

// cos / sin of the rotary embedding: float32 [1, length, 1, dim].
void CheckRopeTables(const paddle::Tensor& cos, const paddle::Tensor& sin, int64_t length, int64_t dim,
                     const char* op) {
  CheckFloat32(cos, op, "cos");
  CheckFloat32(sin, op, "sin");
  const std::vector<int64_t> table{1, length, 1, dim};
  PD_CHECK(cos.shape() == table && sin.shape() == table, op, ": cos and sin must be ", ShapeText(table), ", got ",
           ShapeText(cos.shape()), " and ", ShapeText(sin.shape()));
}

// sin [1, L, 1, D] with its even channels negated, for RotatePairs.
std::vector<float> SignedSin(const paddle::Tensor& sin) {
  std::vector<float> values(sin.data<float>(), sin.data<float>() + sin.numel());
  for (size_t i = 0; i < values.size(); i += 2) values[i] = -values[i];
  return values;
}

}  // namespace

// x [B, L, C], scale / shift [B, 1, C] -> [B, L, C]: (x - mean) / sqrt(var + epsilon) * scale + shift, with the
// mean and the (biased) variance over C.
std::vector<paddle::Tensor> LayerNormModulate(const paddle::Tensor& x, const paddle::Tensor& scale,
                                              const paddle::Tensor& shift, float epsilon) {
  const char* op = "flux_layer_norm_modulate";
  CheckFloat32(x, op, "x");
  CheckFloat32(scale, op, "scale");
  CheckFloat32(shift, op, "shift");
  PD_CHECK(x.shape().size() == 3, op, ": x must be [B, L, C], got ", ShapeText(x.shape()));
  const int64_t batch = x.shape()[0], length = x.shape()[1], channels = x.shape()[2];
  const int64_t scale_stride = SampleVectorStride(scale, batch, channels, op, "scale");
  const int64_t shift_stride = SampleVectorStride(shift, batch, channels, op, "shift");
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* __restrict xs = x.data<float>();
  float* __restrict os = out.data<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* sc = scale.data<float>() + b * scale_stride;
    const float* sh = shift.data<float>() + b * shift_stride;
    for (int64_t l = 0; l < length; ++l) {
      const float* __restrict row = xs + (b * length + l) * channels;
      float* __restrict o = os + (b * length + l) * channels;
      const float mean = LaneSum(row, channels, [](float v) { return v; }) / channels;
      const float variance = LaneSum(row, channels, [mean](float v) { return (v - mean) * (v - mean); }) / channels;
      const float inv_std = 1.f / std::sqrt(variance + epsilon);
      for (int64_t c = 0; c < channels; ++c) o[c] = (row[c] - mean) * inv_std * sc[c] + sh[c];
    }
  }
  return {out};
}

// residual, y [B, L, C], gate [B, 1, C] -> residual + gate * y.
std::vector<paddle::Tensor> GatedResidual(const paddle::Tensor& residual, const paddle::Tensor& gate,
                                          const paddle::Tensor& y) {
  const char* op = "flux_gated_residual";
  CheckFloat32(residual, op, "residual");
  CheckFloat32(gate, op, "gate");
  CheckFloat32(y, op, "y");
  PD_CHECK(residual.shape().size() == 3 && residual.shape() == y.shape(), op,
           ": residual and y must be the same [B, L, C], got ", ShapeText(residual.shape()), " and ",
           ShapeText(y.shape()));
  const int64_t batch = y.shape()[0], length = y.shape()[1], channels = y.shape()[2];
  const int64_t gate_stride = SampleVectorStride(gate, batch, channels, op, "gate");
  auto out = paddle::empty(y.shape(), y.dtype(), y.place());
  const float* __restrict rs = residual.data<float>();
  const float* __restrict ys = y.data<float>();
  float* __restrict os = out.data<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* g = gate.data<float>() + b * gate_stride;
    for (int64_t l = 0; l < length; ++l) {
      const int64_t offset = (b * length + l) * channels;
      for (int64_t c = 0; c < channels; ++c) os[offset + c] = rs[offset + c] + g[c] * ys[offset + c];
    }
  }
  return {out};
}

// x [B, L, H, D], cos / sin [1, L, 1, D] -> [B, L, H, D]: out_2j = x_2j cos_2j - x_2j+1 sin_2j,
// out_2j+1 = x_2j+1 cos_2j+1 + x_2j sin_2j+1.
std::vector<paddle::Tensor> Rope(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin) {
  const char* op = "flux_rope";
  CheckFloat32(x, op, "x");
  const auto& s = x.shape();
  PD_CHECK(s.size() == 4 && s[3] % 2 == 0, op, ": x must be [B, L, H, D] with an even D, got ", ShapeText(s));
  const int64_t batch = s[0], length = s[1], heads = s[2], dim = s[3];
  CheckRopeTables(cos, sin, length, dim, op);
  const std::vector<float> signed_sin = SignedSin(sin);
  auto out = paddle::empty(s, x.dtype(), x.place());
  const float* __restrict xs = x.data<float>();
  float* __restrict os = out.data<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t l = 0; l < length; ++l) {
      const float* __restrict c = cos.data<float>() + l * dim;
      const float* __restrict n = signed_sin.data() + l * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t offset = ((b * length + l) * heads + h) * dim;
        RotatePairs(xs + offset, c, n, os + offset, dim);
      }
    }
  }
  return {out};
}

// q_parts, k_parts, v_parts: lists of [B, L_i, H, D] (the same shapes part by part), cos / sin [1, sum L_i, 1, D]
// -> [B, sum L_i, 3, H, D]: rope(concat(q_parts, 1)), rope(concat(k_parts, 1)), concat(v_parts, 1) stacked.
std::vector<paddle::Tensor> RopePackQkv(const std::vector<paddle::Tensor>& q_parts,
                                        const std::vector<paddle::Tensor>& k_parts,
                                        const std::vector<paddle::Tensor>& v_parts, const paddle::Tensor& cos,
                                        const paddle::Tensor& sin) {
  const char* op = "flux_rope_pack_qkv";
  PD_CHECK(!q_parts.empty() && q_parts.size() == k_parts.size() && q_parts.size() == v_parts.size(), op,
           ": q, k and v need the same positive number of parts, got ", q_parts.size(), ", ", k_parts.size(),
           ", ", v_parts.size());
  const auto& first = q_parts[0].shape();
  PD_CHECK(first.size() == 4 && first[3] % 2 == 0, op, ": q part 0 must be [B, L, H, D] with an even D, got ",
           ShapeText(first));
  const int64_t batch = first[0], heads = first[2], dim = first[3];
  int64_t length = 0;
  for (size_t i = 0; i < q_parts.size(); ++i) {
    for (const auto* part : {&q_parts[i], &k_parts[i], &v_parts[i]}) {
      CheckFloat32(*part, op, "every q / k / v part");
      const auto& shape = part->shape();
      PD_CHECK(shape.size() == 4 && shape[0] == batch && shape[2] == heads && shape[3] == dim &&
                   shape[1] == q_parts[i].shape()[1],
               op, ": part ", i, " must be [", batch, ", L, ", heads, ", ", dim, "] in q, k and v alike, got ",
               ShapeText(shape), " (q: ", ShapeText(q_parts[i].shape()), ")");
    }
    length += q_parts[i].shape()[1];
  }
  CheckRopeTables(cos, sin, length, dim, op);
  const std::vector<float> signed_sin = SignedSin(sin);
  auto out = paddle::empty({batch, length, 3, heads, dim}, q_parts[0].dtype(), q_parts[0].place());
  float* __restrict os = out.data<float>();
  const int64_t row = heads * dim;  // one token of q, k or v
  for (int64_t b = 0; b < batch; ++b) {
    int64_t position = 0;
    for (size_t i = 0; i < q_parts.size(); ++i) {
      const int64_t part_length = q_parts[i].shape()[1];
      const float* qs = q_parts[i].data<float>() + b * part_length * row;
      const float* ks = k_parts[i].data<float>() + b * part_length * row;
      const float* vs = v_parts[i].data<float>() + b * part_length * row;
      for (int64_t l = 0; l < part_length; ++l, ++position) {
        const float* c = cos.data<float>() + position * dim;
        const float* n = signed_sin.data() + position * dim;
        float* o = os + (b * length + position) * 3 * row;
        for (int64_t h = 0; h < heads; ++h) {
          RotatePairs(qs + l * row + h * dim, c, n, o + h * dim, dim);
          RotatePairs(ks + l * row + h * dim, c, n, o + row + h * dim, dim);
        }
        std::copy(vs + l * row, vs + (l + 1) * row, o + 2 * row);
      }
    }
  }
  return {out};
}

std::vector<std::vector<int64_t>> RopePackQkvShape(const std::vector<std::vector<int64_t>>& q_parts,
                                                   const std::vector<std::vector<int64_t>>&,
                                                   const std::vector<std::vector<int64_t>>&,
                                                   const std::vector<int64_t>&, const std::vector<int64_t>&) {
  const auto& first = q_parts.at(0);
  int64_t length = 0;
  for (const auto& part : q_parts) length = (length < 0 || part.at(1) < 0) ? -1 : length + part.at(1);
  return {{first.at(0), length, 3, first.at(2), first.at(3)}};
}

std::vector<paddle::DataType> RopePackQkvDtype(const std::vector<paddle::DataType>& q_parts,
                                               const std::vector<paddle::DataType>&,
                                               const std::vector<paddle::DataType>&, const paddle::DataType&,
                                               const paddle::DataType&) {
  return {q_parts.at(0)};
}

std::vector<std::vector<int64_t>> FirstInputShape(const std::vector<int64_t>& first, const std::vector<int64_t>&,
                                                  const std::vector<int64_t>&) {
  return {first};
}

std::vector<std::vector<int64_t>> LastInputShape(const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                 const std::vector<int64_t>& last) {
  return {last};
}

std::vector<paddle::DataType> FirstInputDtype(const paddle::DataType& first, const paddle::DataType&,
                                              const paddle::DataType&) {
  return {first};
}

PD_BUILD_OP(flux_layer_norm_modulate)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Out"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormModulate))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstInputShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstInputDtype));

PD_BUILD_OP(flux_gated_residual)
    .Inputs({"Residual", "Gate", "Y"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(GatedResidual))
    .SetInferShapeFn(PD_INFER_SHAPE(LastInputShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstInputDtype));

PD_BUILD_OP(flux_rope)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(Rope))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstInputShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstInputDtype));

PD_BUILD_OP(flux_rope_pack_qkv)
    .Inputs({paddle::Vec("QParts"), paddle::Vec("KParts"), paddle::Vec("VParts"), "Cos", "Sin"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(RopePackQkv))
    .SetInferShapeFn(PD_INFER_SHAPE(RopePackQkvShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RopePackQkvDtype));
