// Decode steps (one position per sequence) of a Llama-family model whose block linears are Q4_1 blocks and whose
// LM head is 8-bit symmetric blocks, on the CPU, in one call: the native fast path of
// cfm_runtime/kernels/native.py. Any span of layers [first, last), with or without the final norm and head, for a
// batch of sequences each with its own position and KV cache (the center batches decode steps of many sessions);
// optional low-rank side terms y += B (A x) on any of a layer's seven linears (LoRA bricks, unfused).
// Built with torch.utils.cpp_extension (g++ -O3 -march=native -fopenmp); needs AVX2 and FMA (the `available()`
// probe says whether this build has them).
//
// Weights stay in the layout cfm_runtime.kernels.packing gives them (scheme "mid", block 32):
//   4-bit codes [n, k/32, 16] (byte j holds elements 2j (low nibble) and 2j+1 (high)), fp32 scales d [n, k/32],
//   fp32 offsets M [n, k/32] (row-major here), value = d * (code - 8) + M: exactly Q4_1's d * q + m.
// Activations are rounded to int8 per block of 32 (scale max|x| / 127), as llama.cpp's Q8 activations and
// onnxruntime's MatMulNBits accuracy level 4 do; the offset term uses the exact fp32 block sums. The integer
// dot products are AVX2 `vpmaddubsw` (unsigned x signed bytes -> int16 pairs; 4-bit codes cannot saturate it)
// and `vpmaddwd`, as llama.cpp's AVX2 path does. Each weight row is read once per call and dotted with every
// sequence's activation (a batch of B costs little more than one sequence: decode is memory-bound).
// Per row:  y = sum_b d_b * sx_b * (sum_i code_i * qx_i - 8 * sum_i qx_i) + sum_b M_b * S_b.
// Side terms are fp32 (x [in] -> A x [r] -> B (A x) [out]) on the unrounded activation.

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
  std::vector<int32_t> corr;           // per pair of blocks: 2 * qsum of each, 4 lanes each (the -8 code offset)
  std::vector<float> sx2;              // per pair of blocks: each block's scale in its 4 lanes
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
  a.corr.assign(static_cast<size_t>(kb / 2) * 8, 0);
  a.sx2.assign(static_cast<size_t>(kb / 2) * 8, 0.f);
  for (int p = 0; p < kb / 2; ++p) {
    for (int l = 0; l < 8; ++l) {
      a.corr[p * 8 + l] = a.qsum[2 * p + l / 4] * 2;
      a.sx2[p * 8 + l] = a.sx[2 * p + l / 4];
    }
  }
}

#if CFM_NATIVE
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Per int32 lane, sum(code * qx) over the lane's 8 products (4 bytes of lo x qe, 4 of hi x qo) minus corr (the
// -8 code offset). Exact integers either way: VNNI's vpdpbusd sums the same byte groups as vpmaddubsw + vpmaddwd.
inline __m256i dot_pair(__m256i lo, __m256i hi, __m256i qe, __m256i qo, __m256i corr) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), corr), lo, qe), hi, qo);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), corr), lo, qe), hi, qo);
#else
  // int16 pairs: |15 * 127 * 2| * 2 terms < 2^15, no saturation
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qe), _mm256_maddubs_epi16(hi, qo));
  return _mm256_sub_epi32(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)), corr);
#endif
}

// The offset term sum_b M_b * S_b of one row and one activation, accumulated in double (the block sums carry this
// model's massive activations), in a fixed order: 4 lanes over the blocks, then the tail.
inline float offset_sum(const float* mr, const float* sums, int kb) {
  __m256d acc = _mm256_setzero_pd();
  int b = 0;
  for (; b + 4 <= kb; b += 4)
    acc = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(mr + b)), _mm256_cvtps_pd(_mm_loadu_ps(sums + b)), acc);
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
  double off = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  for (; b < kb; ++b) off += static_cast<double>(mr[b]) * sums[b];
  return static_cast<float>(off);
}

// One row's dot products with NT activations: the row's codes are loaded and unpacked once and reused NT times;
// NT is a compile-time constant so the accumulators stay in registers. Every (row, activation) pair goes through
// the same operations in the same order whatever NT is: a chunk of positions gives the bits of single steps.
template <int NT>
inline void row_tile(const uint8_t* c, const float* dr, const float* mr, int kb, const Act* acts, float* const* y,
                     int r, bool add) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps();
  for (int b = 0; b + 2 <= kb; b += 2) {
    const __m256i cc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 16));
    const __m256i lo = _mm256_and_si256(cc, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(cc, 4), low);
    const __m256 d2 = _mm256_set_m128(_mm_set1_ps(dr[b + 1]), _mm_set1_ps(dr[b]));
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const Act& a = acts[j];
      // each block's 4 lanes carry -8 * sum(qx) / 4 so that the lane sum is sum(code * qx) - 8 * sum(qx)
      const __m256i dot = dot_pair(lo, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.even.data() + b * 16)),
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.odd.data() + b * 16)),
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.corr.data() + b * 4)));
      const __m256 sc = _mm256_mul_ps(d2, _mm256_loadu_ps(a.sx2.data() + b * 4));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    const Act& a = acts[j];
    float s = hsum(acc[j]);
    for (int b = kb - kb % 2; b < kb; ++b) {  // an odd last block
      int32_t dot = 0;
      for (int i = 0; i < 16; ++i)
        dot += (c[b * 16 + i] & 0x0F) * a.even[b * 16 + i] + (c[b * 16 + i] >> 4) * a.odd[b * 16 + i];
      s += dr[b] * a.sx[b] * static_cast<float>(dot - 8 * a.qsum[b]);
    }
    y[j][r] = (add ? y[j][r] : 0.f) + s + offset_sum(mr, a.sums.data(), kb);
  }
}

constexpr int kTile = 4;  // activations dotted with one row at a time: its unpacked codes are reused kTile times

// y[b][n] (+)= row n of the 4-bit matrix times activation b, for every b. Each row's codes are read and unpacked
// once per tile of activations; every (row, activation) pair is computed exactly as alone.
void gemv4(const uint8_t* codes, const float* d, const float* m, int n, const std::vector<Act>& acts,
           float* const* y, bool add, int threads) {
  const int kb = acts[0].kb;
  const int nb = static_cast<int>(acts.size());
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < n; ++r) {
    const uint8_t* c = codes + static_cast<size_t>(r) * kb * 16;
    const float* dr = d + static_cast<size_t>(r) * kb;
    const float* mr = m + static_cast<size_t>(r) * kb;
    int t0 = 0;
    for (; t0 + kTile <= nb; t0 += kTile) row_tile<kTile>(c, dr, mr, kb, &acts[t0], y + t0, r, add);
    switch (nb - t0) {  // the last tile, 1-3 activations
      case 3: row_tile<3>(c, dr, mr, kb, &acts[t0], y + t0, r, add); break;
      case 2: row_tile<2>(c, dr, mr, kb, &acts[t0], y + t0, r, add); break;
      case 1: row_tile<1>(c, dr, mr, kb, &acts[t0], y + t0, r, add); break;
      default: break;
    }
  }
}

// One row of the 8-bit (code - 128) matrix dotted with NT activations, each block's codes loaded once. Signed x
// signed bytes through vpmaddubsw: |w| times sign(w) * q (llama.cpp's trick); |w| <= 127 for symmetric codes, so
// no saturation. Each (row, activation) pair is computed as alone, whatever NT is.
template <int NT>
inline void row_tile8(const uint8_t* c, const float* dr, int kb, const Act* acts, float* const* y, int r) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps();
  for (int b = 0; b < kb; ++b) {
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32)), flip);
    const __m256i aw = _mm256_sign_epi8(w, w);  // |code - 128|
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const Act& a = acts[j];
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.all.data() + b * 32));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(q, w)), ones);
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dr[b] * a.sx[b]), acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) y[j][r] = hsum(acc[j]);
}

// y[b][n] = row n of the 8-bit (code - 128) matrix times activation b, in tiles of activations as gemv4.
void gemv8(const uint8_t* codes, const float* d, int n, const std::vector<Act>& acts, float* const* y, int threads) {
  const int kb = acts[0].kb;
  const int nb = static_cast<int>(acts.size());
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < n; ++r) {
    const uint8_t* c = codes + static_cast<size_t>(r) * kb * 32;
    const float* dr = d + static_cast<size_t>(r) * kb;
    int t0 = 0;
    for (; t0 + kTile <= nb; t0 += kTile) row_tile8<kTile>(c, dr, kb, &acts[t0], y + t0, r);
    switch (nb - t0) {
      case 3: row_tile8<3>(c, dr, kb, &acts[t0], y + t0, r); break;
      case 2: row_tile8<2>(c, dr, kb, &acts[t0], y + t0, r); break;
      case 1: row_tile8<1>(c, dr, kb, &acts[t0], y + t0, r); break;
      default: break;
    }
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

// Low-rank side term of one linear: y += B (A x), A [r, in], B [out, r] (fp32, the brick weights folded in).
struct Side {
  torch::Tensor a, b;
  int r = 0;
};

void side_term(const Side& s, const float* x, int in, float* y, int out, std::vector<float>& tmp) {
  if (s.r == 0) return;
  tmp.assign(s.r, 0.f);
  const float* a = s.a.data_ptr<float>();
  const float* b = s.b.data_ptr<float>();
  for (int j = 0; j < s.r; ++j) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < in; ++i) acc += a[static_cast<size_t>(j) * in + i] * x[i];
    tmp[j] = acc;
  }
  for (int o = 0; o < out; ++o) {
    float acc = 0.f;
    for (int j = 0; j < s.r; ++j) acc += b[static_cast<size_t>(o) * s.r + j] * tmp[j];
    y[o] += acc;
  }
}

// Holds the weights (sharing memory with the Python-side packed arrays) and scratch buffers: one call at a time
// per decoder (the callers serialize: one forward per model at a time).
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

  // Side term of linear `kind` (0..6: q, k, v, o, gate, up, down) of `layer`; empty tensors remove it.
  void set_side(int64_t layer, int64_t kind, torch::Tensor a, torch::Tensor b) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()) && kind >= 0 && kind < 7,
                "no such layer or linear");
    Side& s = layers_[layer].side[kind];
    if (a.numel() == 0) {
      s = Side{};
      return;
    }
    const int in = side_in(kind), out = side_out(kind);
    TORCH_CHECK(a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32 && a.dim() == 2 &&
                    b.dim() == 2 && a.size(1) == in && b.size(0) == out && a.size(0) == b.size(1),
                "a side term needs float32 A [r, in] and B [out, r] of this linear's sizes");
    s = Side{a.contiguous(), b.contiguous(), static_cast<int>(a.size(0))};
  }

  // x [B, d]: B rows of hidden states entering layer `first` (or token embeddings), row i at position pos[i] of
  // its sequence; k[i], v[i]: that sequence's caches ([n_kv, capacity, head_dim]) of layers [first, last). Rows
  // of one sequence (the same cache tensors) come in position order: a prompt chunk is computed exactly as the
  // same tokens one step at a time would be. Writes each row's keys/values, attends over [0, pos[i]];
  // -> h [B, d] leaving layer last - 1, or with head = n > 0 the logits [n, vocab] (final norm, LM head) of the
  // last n rows.
  torch::Tensor forward(torch::Tensor x_in, std::vector<int64_t> pos, int64_t first, int64_t last,
                        std::vector<std::vector<torch::Tensor>> k, std::vector<std::vector<torch::Tensor>> v,
                        int64_t head) {
#if CFM_NATIVE
    const int nb = static_cast<int>(pos.size());
    TORCH_CHECK(nb > 0 && x_in.dim() == 2 && x_in.size(0) == nb && x_in.size(1) == d_ &&
                    x_in.scalar_type() == torch::kFloat32, "x must be float32 [batch, d_model], one row per position");
    TORCH_CHECK(0 <= first && first <= last && last <= static_cast<int64_t>(layers_.size()), "bad span");
    TORCH_CHECK(static_cast<int>(k.size()) == nb && static_cast<int>(v.size()) == nb, "one cache list per sequence");
    for (int b = 0; b < nb; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_.size(0), "position beyond the rotary table");
      TORCH_CHECK(static_cast<int64_t>(k[b].size()) == last - first && k[b].size() == v[b].size(),
                  "one key and value cache per layer of the span");
    }
    torch::Tensor xt = x_in.contiguous().clone();
    const int d = d_;
    resize(nb);
    for (int64_t li = first; li < last; ++li) layer(layers_[li], xt.data_ptr<float>(), pos, k, v, li - first, nb);
    if (head <= 0) return xt;
    TORCH_CHECK(head <= nb, "more head rows than rows");
    const int nh = static_cast<int>(head);
    std::vector<float*> y(nh);
    std::vector<Act> acts(nh);
    const int vocab = static_cast<int>(head_codes_.size(0));
    torch::Tensor logits = torch::empty({nh, vocab}, torch::kFloat32);
    for (int j = 0; j < nh; ++j) {
      const int b = nb - nh + j;
      rmsnorm(xt.data_ptr<float>() + static_cast<size_t>(b) * d, final_norm_.data_ptr<float>(), d, eps_, xn_[b].data());
      quantize(xn_[b].data(), d, acts[j]);
      y[j] = logits.data_ptr<float>() + static_cast<size_t>(j) * vocab;
    }
    gemv8(head_codes_.data_ptr<uint8_t>(), head_scales_.data_ptr<float>(), vocab, acts, y.data(), threads_);
    return logits;
#else
    TORCH_CHECK(false, "this build has no AVX2/FMA kernels");
#endif
  }

 private:
  struct Layer {
    torch::Tensor ln1, ln2;
    Linear qkv, o, gu, down;
    Side side[7];  // q, k, v, o, gate, up, down
  };

  int side_in(int64_t kind) const { return kind == 3 ? h_ * hd_ : kind == 6 ? layers_[0].gu.n / 2 : d_; }
  int side_out(int64_t kind) const {
    const int kinds[7] = {h_ * hd_, hkv_ * hd_, hkv_ * hd_, d_, layers_[0].gu.n / 2, layers_[0].gu.n / 2, d_};
    return kinds[kind];
  }

  void resize(int nb) {
    const int qkv = layers_[0].qkv.n, gu = layers_[0].gu.n;
    acts_.resize(nb);
    xn_.resize(nb);
    qkv_.resize(nb);
    attn_.resize(nb);
    gu_.resize(nb);
    act_.resize(nb);
    for (int b = 0; b < nb; ++b) {
      xn_[b].resize(d_);
      qkv_[b].resize(qkv);
      attn_[b].resize(h_ * hd_);
      gu_[b].resize(gu);
      act_[b].resize(gu / 2);
    }
  }

#if CFM_NATIVE
  void run(const Linear& l, float* const* y, bool add) {
    gemv4(l.codes.data_ptr<uint8_t>(), l.scales.data_ptr<float>(), l.mins.data_ptr<float>(), l.n, acts_, y, add,
          threads_);
  }

  // One layer for every sequence of the batch; x [nb, d] is updated in place (the residual stream).
  void layer(const Layer& L, float* x, const std::vector<int64_t>& pos, std::vector<std::vector<torch::Tensor>>& k,
             std::vector<std::vector<torch::Tensor>>& v, int64_t ci, int nb) {
    const int d = d_, group = h_ / hkv_, f = L.gu.n / 2;
    std::vector<float*> y(nb);
    // attention block
    for (int b = 0; b < nb; ++b) {
      rmsnorm(x + static_cast<size_t>(b) * d, L.ln1.data_ptr<float>(), d, eps_, xn_[b].data());
      quantize(xn_[b].data(), d, acts_[b]);
      y[b] = qkv_[b].data();
    }
    run(L.qkv, y.data(), false);
    for (int b = 0; b < nb; ++b) {
      float* q = qkv_[b].data();
      side_term(L.side[0], xn_[b].data(), d, q, h_ * hd_, tmp_);
      side_term(L.side[1], xn_[b].data(), d, q + h_ * hd_, hkv_ * hd_, tmp_);
      side_term(L.side[2], xn_[b].data(), d, q + (h_ + hkv_) * hd_, hkv_ * hd_, tmp_);
      store_kv(q, pos[b], k[b][ci], v[b][ci]);
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
#pragma omp parallel for num_threads(threads_) schedule(static) collapse(2)
    for (int b = 0; b < nb; ++b) {
      for (int hh = 0; hh < h_; ++hh) {
        attend(qkv_[b].data() + hh * hd_, k[b][ci], v[b][ci], hh / group, static_cast<int>(pos[b]) + 1, scale,
               attn_[b].data() + hh * hd_);
      }
    }
    for (int b = 0; b < nb; ++b) {
      quantize(attn_[b].data(), h_ * hd_, acts_[b]);
      y[b] = x + static_cast<size_t>(b) * d;
    }
    run(L.o, y.data(), true);  // residual += o
    for (int b = 0; b < nb; ++b) side_term(L.side[3], attn_[b].data(), h_ * hd_, y[b], d, tmp_);
    // MLP block
    for (int b = 0; b < nb; ++b) {
      rmsnorm(x + static_cast<size_t>(b) * d, L.ln2.data_ptr<float>(), d, eps_, xn_[b].data());
      quantize(xn_[b].data(), d, acts_[b]);
      y[b] = gu_[b].data();
    }
    run(L.gu, y.data(), false);
    for (int b = 0; b < nb; ++b) {
      float* gu = gu_[b].data();
      side_term(L.side[4], xn_[b].data(), d, gu, f, tmp_);
      side_term(L.side[5], xn_[b].data(), d, gu + f, f, tmp_);
      float* act = act_[b].data();
      for (int i = 0; i < f; ++i) {
        const float g = gu[i];
        act[i] = g / (1.f + std::exp(-g)) * gu[f + i];
      }
      quantize(act, f, acts_[b]);
      y[b] = x + static_cast<size_t>(b) * d;
    }
    run(L.down, y.data(), true);  // residual += down
    for (int b = 0; b < nb; ++b) side_term(L.side[6], act_[b].data(), f, y[b], d, tmp_);
  }

  // Rotates q and k (adjacent pairs) at `pos`, writes k and v into the caches at `pos`.
  void store_kv(float* q, int64_t pos, torch::Tensor& kc_t, torch::Tensor& vc_t) {
    TORCH_CHECK(kc_t.is_contiguous() && vc_t.is_contiguous() && kc_t.size(1) > pos, "cache too small");
    const int cap = static_cast<int>(kc_t.size(1));
    const float* cs = cos_.data_ptr<float>() + pos * (hd_ / 2);
    const float* sn = sin_.data_ptr<float>() + pos * (hd_ / 2);
    float* kn = q + h_ * hd_;
    float* vn = kn + hkv_ * hd_;
    float* kc = kc_t.data_ptr<float>();
    float* vc = vc_t.data_ptr<float>();
    for (int hh = 0; hh < h_; ++hh) rotate(q + hh * hd_, cs, sn, hd_);
    for (int g = 0; g < hkv_; ++g) {
      rotate(kn + g * hd_, cs, sn, hd_);
      std::memcpy(kc + (static_cast<size_t>(g) * cap + pos) * hd_, kn + g * hd_, hd_ * sizeof(float));
      std::memcpy(vc + (static_cast<size_t>(g) * cap + pos) * hd_, vn + g * hd_, hd_ * sizeof(float));
    }
  }

  // One head: softmax(q k^T * scale) v over positions [0, t) of KV group g.
  void attend(const float* qh, const torch::Tensor& kc_t, const torch::Tensor& vc_t, int g, int t, float scale,
              float* out) const {
    const int cap = static_cast<int>(kc_t.size(1));
    const float* kg = kc_t.data_ptr<float>() + static_cast<size_t>(g) * cap * hd_;
    const float* vg = vc_t.data_ptr<float>() + static_cast<size_t>(g) * cap * hd_;
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
    std::fill(out, out + hd_, 0.f);
    for (int j = 0; j < t; ++j) {
      const float w = p[j] / den;
      const float* vj = vg + static_cast<size_t>(j) * hd_;
#pragma omp simd
      for (int e = 0; e < hd_; ++e) out[e] += w * vj[e];
    }
  }
#endif

  std::vector<Layer> layers_;
  torch::Tensor final_norm_, head_codes_, head_scales_, cos_, sin_;
  int h_, hkv_, hd_, d_ = 0;
  float eps_;
  int threads_;
  std::vector<Act> acts_;
  std::vector<std::vector<float>> xn_, qkv_, attn_, gu_, act_;
  std::vector<float> tmp_;
};

bool available() { return CFM_NATIVE == 1; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX2/FMA kernels");
  pybind11::class_<Q4Decoder>(m, "Q4Decoder")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, double, int64_t>())
      .def("set_side", &Q4Decoder::set_side)
      .def("forward", &Q4Decoder::forward);
}
