// One decode step (a single token) of a Llama-family model whose block linears are Q4_1 blocks and whose
// LM head is 8-bit symmetric blocks, on the CPU, in one call: the native fast path of
// cfm_runtime/kernels/native.py. Built at first use with torch.utils.cpp_extension (g++ -O3 -march=native
// -fopenmp); needs AVX2 and FMA (the `available()` probe says whether this build has them).
//
// Weights stay in the layout cfm_runtime.kernels.packing gives them (scheme "mid", block 32):
//   4-bit codes [n, k/32, 16] (byte j holds elements 2j (low nibble) and 2j+1 (high)), fp32 scales d [n, k/32],
//   fp32 offsets M [n, k/32] (row-major here), value = d * (code - 8) + M: exactly Q4_1's d * q + m.
// Activations are rounded to int8 per block of 32 (scale max|x| / 127), as llama.cpp's Q8 activations and
// onnxruntime's MatMulNBits accuracy level 4 do; the offset term uses the exact fp32 block sums. The integer
// dot products are AVX2 `vpmaddubsw` (unsigned x signed bytes -> int16 pairs; 4-bit codes cannot saturate it)
// and `vpmaddwd`, as llama.cpp's AVX2 path does.
// Per row:  y = sum_b d_b * sx_b * (sum_i code_i * qx_i - 8 * sum_i qx_i) + sum_b M_b * S_b.

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CFM_NATIVE 1
#else
#define CFM_NATIVE 0
#endif

namespace {

constexpr int kBlock = 32;

struct Act {  // one activation vector rounded to int8 blocks, even and odd elements split (matches the nibbles)
  int kb = 0;
  std::vector<int8_t> even, odd, all;  // [kb][16], [kb][16], [kb][32]
  std::vector<float> sx, sums;         // int8 scale and exact fp32 sum per block
  std::vector<int32_t> qsum;           // sum of the int8 codes per block
};

void quantize(const float* x, int k, Act& a) {
  const int kb = k / kBlock;
  a.kb = kb;
  a.even.resize(kb * 16);
  a.odd.resize(kb * 16);
  a.all.resize(kb * 32);
  a.sx.resize(kb);
  a.sums.resize(kb);
  a.qsum.resize(kb);
  for (int b = 0; b < kb; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f, s = 0.f;
    for (int i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(xb[i]));
      s += xb[i];
    }
    const float scale = amax / 127.f;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    int32_t qs = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int q = static_cast<int>(std::nearbyint(xb[i] * inv));
      a.all[b * 32 + i] = static_cast<int8_t>(q);
      (i % 2 ? a.odd : a.even)[b * 16 + i / 2] = static_cast<int8_t>(q);
      qs += q;
    }
    a.sx[b] = scale;
    a.sums[b] = s;
    a.qsum[b] = qs;
  }
}

#if CFM_NATIVE
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// y[n] (+)= row n of the 4-bit matrix times the activation.
void gemv4(const uint8_t* codes, const float* d, const float* m, int n, const Act& a, float* y, bool add,
           int threads) {
  const int kb = a.kb;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < n; ++r) {
    const uint8_t* c = codes + static_cast<size_t>(r) * kb * 16;
    const float* dr = d + static_cast<size_t>(r) * kb;
    const float* mr = m + static_cast<size_t>(r) * kb;
    __m256 acc = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= kb; b += 2) {
      const __m256i cc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 16));
      const __m256i lo = _mm256_and_si256(cc, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(cc, 4), low);
      const __m256i qe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.even.data() + b * 16));
      const __m256i qo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.odd.data() + b * 16));
      // int16 pairs: |15 * 127 * 2| * 2 terms < 2^15, no saturation
      const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qe), _mm256_maddubs_epi16(hi, qo));
      __m256i dot = _mm256_madd_epi16(p16, ones);
      // each block's 4 lanes carry -8 * sum(qx) / 4 so that the lane sum is sum(code * qx) - 8 * sum(qx)
      const __m256i corr = _mm256_setr_epi32(a.qsum[b] * 2, a.qsum[b] * 2, a.qsum[b] * 2, a.qsum[b] * 2,
                                             a.qsum[b + 1] * 2, a.qsum[b + 1] * 2, a.qsum[b + 1] * 2,
                                             a.qsum[b + 1] * 2);
      dot = _mm256_sub_epi32(dot, corr);
      const __m256 sc = _mm256_set_m128(_mm_set1_ps(dr[b + 1] * a.sx[b + 1]), _mm_set1_ps(dr[b] * a.sx[b]));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc);
    }
    float s = hsum(acc);
    for (; b < kb; ++b) {  // an odd last block
      int32_t dot = 0;
      for (int i = 0; i < 16; ++i)
        dot += (c[b * 16 + i] & 0x0F) * a.even[b * 16 + i] + (c[b * 16 + i] >> 4) * a.odd[b * 16 + i];
      s += dr[b] * a.sx[b] * static_cast<float>(dot - 8 * a.qsum[b]);
    }
    float off = 0.f;
#pragma omp simd reduction(+ : off)
    for (int j = 0; j < kb; ++j) off += mr[j] * a.sums[j];
    y[r] = (add ? y[r] : 0.f) + s + off;
  }
}

// y[n] = row n of the 8-bit (code - 128) matrix times the activation. Signed x signed bytes through
// vpmaddubsw: |w| times sign(w) * q (llama.cpp's trick); |w| <= 127 for symmetric codes, so no saturation.
void gemv8(const uint8_t* codes, const float* d, int n, const Act& a, float* y, int threads) {
  const int kb = a.kb;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < n; ++r) {
    const uint8_t* c = codes + static_cast<size_t>(r) * kb * 32;
    const float* dr = d + static_cast<size_t>(r) * kb;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < kb; ++b) {
      const __m256i cc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32));
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.all.data() + b * 32));
      const __m256i w = _mm256_xor_si256(cc, flip);  // code - 128 as int8
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w)), ones);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dr[b] * a.sx[b]), acc);
    }
    y[r] = hsum(acc);
  }
}
#endif

void rmsnorm(const float* x, const float* gamma, int n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * r * gamma[i];
}

void rotate(float* x, const float* cos, const float* sin, int hd) {  // adjacent pairs (llama.cpp "normal")
  for (int i = 0; i < hd / 2; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * cos[i] - b * sin[i];
    x[2 * i + 1] = a * sin[i] + b * cos[i];
  }
}

struct Linear {
  torch::Tensor codes, scales, mins;  // uint8 [n, kb, 16], fp32 [n * kb], fp32 [n, kb]
  int n = 0, k = 0;
};

Linear make_linear(const std::vector<torch::Tensor>& t) {
  Linear l{t[0].contiguous(), t[1].contiguous(), t[2].contiguous(), 0, 0};
  TORCH_CHECK(l.codes.scalar_type() == torch::kUInt8 && l.codes.dim() == 3 && l.codes.size(2) == 16,
              "codes must be uint8 [n, k/32, 16]");
  l.n = static_cast<int>(l.codes.size(0));
  l.k = static_cast<int>(l.codes.size(1)) * kBlock;
  TORCH_CHECK(l.scales.numel() == l.n * (l.k / kBlock) && l.mins.numel() == l.scales.numel(),
              "scales and offsets must hold one value per row and block");
  return l;
}

}  // namespace

// Holds the weights (sharing memory with the Python-side packed arrays) and one scratch activation: one step
// at a time per decoder (the callers serialize: one generation per model at a time).
class Q4Decoder {
 public:
  // layers: per layer [ln1, ln2, qkv codes, qkv scales, qkv offsets, o ..., gate|up ..., down ...] (14 tensors)
  Q4Decoder(std::vector<std::vector<torch::Tensor>> layers, torch::Tensor final_norm, torch::Tensor head_codes,
            torch::Tensor head_scales, torch::Tensor cos, torch::Tensor sin, int64_t n_heads, int64_t n_kv,
            int64_t head_dim, double eps, int64_t threads)
      : final_norm_(final_norm.contiguous()), head_codes_(head_codes.contiguous()),
        head_scales_(head_scales.contiguous()), cos_(cos.contiguous()), sin_(sin.contiguous()),
        h_(static_cast<int>(n_heads)), hkv_(static_cast<int>(n_kv)), hd_(static_cast<int>(head_dim)),
        eps_(static_cast<float>(eps)), threads_(static_cast<int>(threads)) {
    for (auto& l : layers) {
      TORCH_CHECK(l.size() == 14, "each layer needs 14 tensors");
      Layer y;
      y.ln1 = l[0].contiguous();
      y.ln2 = l[1].contiguous();
      y.qkv = make_linear({l[2], l[3], l[4]});
      y.o = make_linear({l[5], l[6], l[7]});
      y.gu = make_linear({l[8], l[9], l[10]});
      y.down = make_linear({l[11], l[12], l[13]});
      layers_.push_back(std::move(y));
    }
    d_ = layers_.at(0).o.n;
    TORCH_CHECK(layers_[0].qkv.n == (h_ + 2 * hkv_) * hd_, "q|k|v rows do not match the head counts");
    TORCH_CHECK(head_codes_.dim() == 3 && head_codes_.size(2) == 32, "head codes must be uint8 [vocab, k/32, 32]");
  }

  // x [d] (the token's embedding) -> logits [vocab]; writes this position's keys/values into k[i], v[i]
  // ([n_kv, capacity, head_dim] each) at `pos` and attends over positions [0, pos].
  torch::Tensor step(torch::Tensor x_in, int64_t pos, std::vector<torch::Tensor> k, std::vector<torch::Tensor> v) {
#if CFM_NATIVE
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "one key and value cache per layer");
    TORCH_CHECK(pos < cos_.size(0), "position beyond the rotary table");
    TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && x_in.numel() == d_, "x must be float32 [d_model]");
    torch::Tensor xt = x_in.contiguous().clone();
    float* x = xt.data_ptr<float>();
    const int d = d_, group = h_ / hkv_;
    std::vector<float> xn(d), qkv(layers_[0].qkv.n), attn(h_ * hd_), gu(layers_[0].gu.n), act(layers_[0].gu.n / 2);
    const float* cs = cos_.data_ptr<float>() + pos * (hd_ / 2);
    const float* sn = sin_.data_ptr<float>() + pos * (hd_ / 2);
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      TORCH_CHECK(k[li].is_contiguous() && v[li].is_contiguous() && k[li].size(1) > pos, "cache too small");
      const int cap = static_cast<int>(k[li].size(1));
      float* kc = k[li].data_ptr<float>();
      float* vc = v[li].data_ptr<float>();
      // attention block
      rmsnorm(x, L.ln1.data_ptr<float>(), d, eps_, xn.data());
      quantize(xn.data(), d, act_);
      run(L.qkv, act_, qkv.data(), false);
      float* q = qkv.data();
      float* kn = q + h_ * hd_;
      float* vn = kn + hkv_ * hd_;
      for (int hh = 0; hh < h_; ++hh) rotate(q + hh * hd_, cs, sn, hd_);
      for (int g = 0; g < hkv_; ++g) {
        rotate(kn + g * hd_, cs, sn, hd_);
        std::memcpy(kc + (static_cast<size_t>(g) * cap + pos) * hd_, kn + g * hd_, hd_ * sizeof(float));
        std::memcpy(vc + (static_cast<size_t>(g) * cap + pos) * hd_, vn + g * hd_, hd_ * sizeof(float));
      }
      const int t = static_cast<int>(pos) + 1;
#pragma omp parallel for num_threads(threads_) schedule(static)
      for (int hh = 0; hh < h_; ++hh) {
        const int g = hh / group;
        const float* qh = q + hh * hd_;
        const float* kg = kc + static_cast<size_t>(g) * cap * hd_;
        const float* vg = vc + static_cast<size_t>(g) * cap * hd_;
        std::vector<float> p(t);
        float mx = -INFINITY;
        for (int j = 0; j < t; ++j) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int e = 0; e < hd_; ++e) s += qh[e] * kg[static_cast<size_t>(j) * hd_ + e];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        float den = 0.f;
        for (int j = 0; j < t; ++j) {
          p[j] = std::exp(p[j] - mx);
          den += p[j];
        }
        float* out = attn.data() + hh * hd_;
        std::fill(out, out + hd_, 0.f);
        for (int j = 0; j < t; ++j) {
          const float w = p[j] / den;
          const float* vj = vg + static_cast<size_t>(j) * hd_;
#pragma omp simd
          for (int e = 0; e < hd_; ++e) out[e] += w * vj[e];
        }
      }
      quantize(attn.data(), h_ * hd_, act_);
      run(L.o, act_, x, true);  // residual += o
      // MLP block
      rmsnorm(x, L.ln2.data_ptr<float>(), d, eps_, xn.data());
      quantize(xn.data(), d, act_);
      run(L.gu, act_, gu.data(), false);
      const int f = L.gu.n / 2;
      for (int i = 0; i < f; ++i) {
        const float g = gu[i];
        act[i] = g / (1.f + std::exp(-g)) * gu[f + i];
      }
      quantize(act.data(), f, act_);
      run(L.down, act_, x, true);  // residual += down
    }
    rmsnorm(x, final_norm_.data_ptr<float>(), d, eps_, xn.data());
    quantize(xn.data(), d, act_);
    const int vocab = static_cast<int>(head_codes_.size(0));
    torch::Tensor logits = torch::empty({vocab}, torch::kFloat32);
    gemv8(head_codes_.data_ptr<uint8_t>(), head_scales_.data_ptr<float>(), vocab, act_, logits.data_ptr<float>(),
          threads_);
    return logits;
#else
    TORCH_CHECK(false, "this build has no AVX2/FMA kernels");
#endif
  }

 private:
  struct Layer {
    torch::Tensor ln1, ln2;
    Linear qkv, o, gu, down;
  };

  void run(const Linear& l, const Act& a, float* y, bool add) {
#if CFM_NATIVE
    gemv4(l.codes.data_ptr<uint8_t>(), l.scales.data_ptr<float>(), l.mins.data_ptr<float>(), l.n, a, y, add,
          threads_);
#endif
  }

  std::vector<Layer> layers_;
  torch::Tensor final_norm_, head_codes_, head_scales_, cos_, sin_;
  int h_, hkv_, hd_, d_ = 0;
  float eps_;
  int threads_;
  Act act_;
};

bool available() { return CFM_NATIVE == 1; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX2/FMA kernels");
  pybind11::class_<Q4Decoder>(m, "Q4Decoder")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, double, int64_t>())
      .def("step", &Q4Decoder::step);
}
