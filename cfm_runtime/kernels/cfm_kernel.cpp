// The native kernel of cfm_runtime (kernels/native.py): decode steps and prompt chunks of a Llama-family model
// whose block linears are GGUF Q4_1 blocks and whose LM head (the tied embedding) is GGUF Q8_0 blocks, read in
// place (a memory-mapped file: no copy, no conversion), on the CPU. A plain C ABI (ctypes): no torch, no Python
// headers. Built at install time by setup.py (or on first use) with -O3 -march=native -fopenmp; needs AVX2, FMA
// and F16C (`cfm_available()` says whether this build has them).
//
// One call runs any span of layers [first, last) for B rows: row i is position pos[i] of a sequence whose KV
// caches are given for that row (B sessions' decode steps, or T positions of one prompt chunk, whose keys and
// values are all written before any row attends, each row attending over its own prefix). Each weight row is
// read once per call and dotted with every row's activation; each (weight row, activation) product is computed
// exactly as it would be alone, so a chunk gives the same bits as the same tokens one step at a time.
//
// Q4_1 block (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles (low: elements 0..15, high: 16..31); w = d q + m.
// Q8_0 block (34 bytes): fp16 d, 32 int8 q; w = d q.
// Activations are rounded to int8 per block of 32 (scale max|x| / 127), as llama.cpp's Q8 activations. A Q4_1
// row times one activation is computed around the block's middle code:
//   sum_b d_b sx_b (sum_i q_i qx_i - 8 sum_i qx_i) + (m_b + 8 d_b) S_b,   S_b the exact fp32 block sum,
// so the activation's rounding error is weighted by q - 8 (centred, errors cancel) instead of q in 0..15: the
// uncentred form measured 2-3x the per-layer error (and 96.1% vs 98.7% top-1 agreement with fp32). The integer
// dot products are AVX2 `vpmaddubsw` (4-bit codes unsigned x int8: no saturation) and `vpmaddwd`, or VNNI's
// `vpdpbusd` where the CPU has it (the same integers). Where it has AVX-512 VNNI, the linears and the head run 16
// rows at a time instead, one row per 32-bit lane (`group_tile_q41`): the same integers, the float sums in another
// order: measured on a Xeon, a decode step 3.9-4.1 ms against the row path's 15 ms (docs/fast-decode.md).
// Optional low-rank side terms y += B (A x) in fp32 on any of a layer's seven linears (LoRA bricks, unfused).
// Optional sparse FFN per layer (SparseDown): the top neurons of each position's activation through the down
// projection read as columns, in fp32 over the file's own codes, scales and mins.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CFM_NATIVE 1
#else
#define CFM_NATIVE 0
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kQ41 = 20;  // bytes per Q4_1 block
constexpr int kQ80 = 34;  // bytes per Q8_0 block
constexpr int kTile = 4;  // activations dotted with one weight row at a time (its unpacked codes are reused)

struct Act {  // one activation vector rounded to int8 blocks
  int kb = 0;
  std::vector<int8_t> q;       // [kb][32]
  std::vector<float> sx, sums;  // int8 scale and exact fp32 sum per block
  std::vector<int32_t> qsum;    // sum of the int8 codes per block
};

#if CFM_NATIVE
inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One activation vector rounded to int8 per block of 32: scale max|x| / 127, codes rounded to nearest (even),
// and per block the exact fp32 sum and the codes' sum.
void quantize(const float* x, int k, Act& a) {
  const int kb = k / kBlock;
  a.kb = kb;
  a.q.resize(static_cast<size_t>(kb) * kBlock);
  a.sx.resize(kb);
  a.sums.resize(kb);
  a.qsum.resize(kb);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
  for (int b = 0; b < kb; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                          _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
    const float s = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    // a block holding NaN or inf (a brick whose weights overflow) gets a NaN scale: the NaN reaches the
    // logits, where the caller refuses them, instead of being rounded to int8 zeros and looking like a token
    const bool finite = std::isfinite(s);
    const float scale = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
    const __m256 inv = _mm256_set1_ps(finite && scale > 0.f ? 1.f / scale : 0.f);
    __m256i c[4];
    for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + b * kBlock), _mm256_permutevar8x32_epi32(bytes, order));
    a.sx[b] = scale;
    a.sums[b] = s;
    a.qsum[b] = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3])));
  }
}
#endif

// Rows of a linear, possibly from several tensors (q|k|v, gate|up): a row index maps to its tensor.
struct Linear {
  std::vector<const uint8_t*> data;
  std::vector<int> first;  // first row of each tensor
  int n = 0, k = 0;

  void add(const uint8_t* d, int rows, int cols) {
    data.push_back(d);
    first.push_back(n);
    n += rows;
    k = cols;
  }
  bool grouped() const {  // every tensor's rows come in whole groups of 16
    for (size_t t = 0; t < first.size(); ++t)
      if (((t + 1 < first.size() ? first[t + 1] : n) - first[t]) % 16 != 0) return false;
    return true;
  }
  const uint8_t* row(int r) const {
    int t = static_cast<int>(data.size()) - 1;
    while (first[t] > r) --t;
    return data[t] + static_cast<size_t>(r - first[t]) * (k / kBlock) * kQ41;
  }
};

#if CFM_NATIVE
// Per int32 lane: acc + sum of the lane's 4 byte products (unsigned u x signed s). VNNI's vpdpbusd sums the same
// byte groups as vpmaddubsw + vpmaddwd, and neither saturates here (|u| <= 127 on every path): the same integers.
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// One Q4_1 row dotted with NT activations; NT is a compile-time size so the accumulators stay in registers. Every
// (row, activation) pair goes through the same operations in the same order whatever NT is: a chunk of positions
// gives the bits of single steps.
template <int NT>
inline void row_tile_q41(const uint8_t* row, int kb, const Act* acts, float* const* y, int r, bool add) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc[NT];
  float off[NT];
  for (int j = 0; j < NT; ++j) {
    acc[j] = _mm256_setzero_ps();
    off[j] = 0.f;
  }
  for (int b = 0; b < kb; ++b) {
    const uint8_t* blk = row + b * kQ41;
    const float d = f16(blk), m = f16(blk + 2);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low));
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const Act& a = acts[j];
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + b * kBlock));
      // 8 lanes, one block: each lane carries -8 * qsum / 8 so that their sum is sum(q qx) - 8 sum(qx)
      const __m256i dot = dot4(_mm256_set1_epi32(-a.qsum[b]), codes, q);
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * a.sx[b]), acc[j]);
      off[j] += (m + 8.f * d) * a.sums[b];
    }
  }
  for (int j = 0; j < NT; ++j) y[j][r] = (add ? y[j][r] : 0.f) + hsum(acc[j]) + off[j];
}

// y[j][r] (+)= Q4_1 row r times activation j, for every j, a row at a time; each row's codes are unpacked once
// per tile (the path without AVX-512 VNNI, or for tensors whose rows do not come in 16s).
void gemv_q41_rows(const Linear& l, const Act* acts, int nb, float* const* y, bool add, int threads) {
  const int kb = l.k / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < l.n; ++r) {
    const uint8_t* row = l.row(r);
    int t0 = 0;
    for (; t0 + kTile <= nb; t0 += kTile) row_tile_q41<kTile>(row, kb, &acts[t0], y + t0, r, add);
    switch (nb - t0) {  // the last tile, 1-3 activations
      case 3: row_tile_q41<3>(row, kb, &acts[t0], y + t0, r, add); break;
      case 2: row_tile_q41<2>(row, kb, &acts[t0], y + t0, r, add); break;
      case 1: row_tile_q41<1>(row, kb, &acts[t0], y + t0, r, add); break;
      default: break;
    }
  }
}

// One Q8_0 row dotted with NT activations, each block's bytes loaded once (signed x signed bytes: |w| times
// sign(w) q, as llama.cpp does).
template <int NT>
inline void row_tile_q80(const uint8_t* row, int kb, const Act* acts, float* const* y, int r) {
  __m256 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps();
  for (int b = 0; b < kb; ++b) {
    const uint8_t* blk = row + b * kQ80;
    const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    const __m256i aw = _mm256_sign_epi8(wq, wq);
    const float d = f16(blk);
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const Act& a = acts[j];
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + b * kBlock));
      const __m256i dot = dot4(_mm256_setzero_si256(), aw, _mm256_sign_epi8(q, wq));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * a.sx[b]), acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) y[j][r] = hsum(acc[j]);
}

// y[j][r] = Q8_0 row r times activation j, in tiles of activations as gemv_q41.
void gemv_q80_rows(const uint8_t* w, int n, int k, const Act* acts, int nb, float* const* y, int threads) {
  const int kb = k / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < n; ++r) {
    const uint8_t* row = w + static_cast<size_t>(r) * kb * kQ80;
    int t0 = 0;
    for (; t0 + kTile <= nb; t0 += kTile) row_tile_q80<kTile>(row, kb, &acts[t0], y + t0, r);
    switch (nb - t0) {
      case 3: row_tile_q80<3>(row, kb, &acts[t0], y + t0, r); break;
      case 2: row_tile_q80<2>(row, kb, &acts[t0], y + t0, r); break;
      case 1: row_tile_q80<1>(row, kb, &acts[t0], y + t0, r); break;
      default: break;
    }
  }
}
#endif

#if CFM_NATIVE && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define CFM_GROUPED 1
// Rows in groups of 16, one output row per 32-bit lane of a 512-bit register (as llama.cpp's repacked GEMVs):
// a block's 32 codes of 16 rows are transposed into 8 registers (lane r holds row r's codes 4kk..4kk+3), each
// dotted by `vpdpbusd` with one activation's 4 bytes broadcast. A lane ends holding its row's whole block dot
// product, so no horizontal sum is needed, and the per-block scale is one multiply for 16 rows. The codes are
// transposed once per block and reused by every activation of the call: an extra activation (a verified draft
// token, a prompt position) costs 8 `vpdpbusd` per 16 rows and block. Every (row, activation) goes through the
// same operations in the same order whatever the number of activations: a chunk gives the bits of single steps.
constexpr int kGroup = 16;
constexpr int kGroupTile = 16;  // activations per pass over a group at most (one accumulator register each)

// The 16 bytes at base + i * stride of 16 rows i (4 dwords each), transposed into 4 registers: out[g] lane i =
// row i's dword g.
inline void transpose16x4(const uint8_t* base, size_t stride, __m512i out[4]) {
  __m512i a[4];
  for (int j = 0; j < 4; ++j) {  // a[j]: 128-bit lane L holds row 4L + j
    __m512i v = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + j * stride)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (4 + j) * stride)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (8 + j) * stride)), 2);
    a[j] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (12 + j) * stride)), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
  out[0] = _mm512_unpacklo_epi64(t0, t2);
  out[1] = _mm512_unpackhi_epi64(t0, t2);
  out[2] = _mm512_unpacklo_epi64(t1, t3);
  out[3] = _mm512_unpackhi_epi64(t1, t3);
}

// The two fp16 at base + i * stride of 16 rows i (a block's d, and m where it has one) as fp32: the first in lo,
// the second in *hi.
inline void scales16(const uint8_t* base, __m512i idx, __m512& lo, __m512* hi) {
  const __m512i w = _mm512_i32gather_epi32(idx, base, 1);
  lo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
  if (hi != nullptr) *hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Block dot products of 16 rows (codes w[8], unsigned) with one activation block (32 int8), started at `init`.
inline __m512i dot16(const __m512i w[8], const int8_t* q, __m512i init) {
  __m512i s0 = init, s1 = _mm512_setzero_si512();
  s0 = _mm512_dpbusd_epi32(s0, w[0], bcast4(q));
  s1 = _mm512_dpbusd_epi32(s1, w[1], bcast4(q + 4));
  s0 = _mm512_dpbusd_epi32(s0, w[2], bcast4(q + 8));
  s1 = _mm512_dpbusd_epi32(s1, w[3], bcast4(q + 12));
  s0 = _mm512_dpbusd_epi32(s0, w[4], bcast4(q + 16));
  s1 = _mm512_dpbusd_epi32(s1, w[5], bcast4(q + 20));
  s0 = _mm512_dpbusd_epi32(s0, w[6], bcast4(q + 24));
  s1 = _mm512_dpbusd_epi32(s1, w[7], bcast4(q + 28));
  return _mm512_add_epi32(s0, s1);
}

// The next group's rows are one contiguous span (bytes per block x blocks); while block b of this group is
// computed, block b's share of that span is fetched into the cache (16 interleaved row streams are more than the
// hardware prefetcher follows).
inline void prefetch_share(const uint8_t* next, int b, int bytes_per_block) {
  const uint8_t* p = next + static_cast<size_t>(b) * bytes_per_block;
  for (int i = 0; i < bytes_per_block; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

inline __m512i row_offsets16(size_t stride) {  // i * stride in lane i: the 16 rows' offsets for a gather
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

inline void store16(float* y, __m512 v, bool add) {
  _mm512_storeu_ps(y, add ? _mm512_add_ps(_mm512_loadu_ps(y), v) : v);
}

// 16 Q4_1 rows (row i at base + i * stride) dotted with NT activations: y[j][r0 + i] (+)= row i . act j, the
// same sum as row_tile_q41 (centred codes, exact block sums), in lanes.
template <int NT>
void group_tile_q41(const uint8_t* base, size_t stride, int kb, const Act* acts, float* const* y, int r0, bool add,
                    const uint8_t* next) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i idx = row_offsets16(stride);
  __m512 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
  for (int b = 0; b < kb; ++b) {
    const uint8_t* blk = base + b * kQ41;
    if (next != nullptr) prefetch_share(next, b, kGroup * kQ41);
    __m512i g[4], w[8];
    transpose16x4(blk + 4, stride, g);
    for (int i = 0; i < 4; ++i) {
      w[i] = _mm512_and_si512(g[i], nib);                             // elements 4i..4i+3 (low nibbles)
      w[4 + i] = _mm512_and_si512(_mm512_srli_epi32(g[i], 4), nib);  // elements 16+4i.. (high nibbles)
    }
    __m512 d, m;
    scales16(blk, idx, d, &m);
    const __m512 mo = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d, m);  // m + 8 d (8 d is exact)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const Act& a = acts[j];
      const __m512i dot = dot16(w, a.q.data() + b * kBlock, _mm512_set1_epi32(-8 * a.qsum[b]));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(a.sx[b])), acc[j]);
      acc[j] = _mm512_fmadd_ps(mo, _mm512_set1_ps(a.sums[b]), acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) store16(y[j] + r0, acc[j], add);
}

// 16 Q8_0 rows dotted with NT activations: the signed codes shifted by 128 to unsigned (vpdpbusd's operand),
// 128 times the activation's code sum taken back, exactly.
template <int NT>
void group_tile_q80(const uint8_t* base, size_t stride, int kb, const Act* acts, float* const* y, int r0,
                    const uint8_t* next) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i idx = row_offsets16(stride);
  __m512 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
  for (int b = 0; b < kb; ++b) {
    const uint8_t* blk = base + b * kQ80;
    if (next != nullptr) prefetch_share(next, b, kGroup * kQ80);
    __m512i w[8];
    transpose16x4(blk + 2, stride, w);
    transpose16x4(blk + 18, stride, w + 4);
    for (int i = 0; i < 8; ++i) w[i] = _mm512_xor_si512(w[i], flip);
    __m512 d;
    scales16(blk, idx, d, nullptr);
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const Act& a = acts[j];
      const __m512i dot = dot16(w, a.q.data() + b * kBlock, _mm512_set1_epi32(-128 * a.qsum[b]));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(a.sx[b])), acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) store16(y[j] + r0, acc[j], false);
}

// tile(std::integral_constant<int, nt>{}) for a run-time nt in [1, N]: one compiled tile per size.
template <int N, typename Tile>
inline void with_size(int nt, Tile& tile) {
  if constexpr (N == 1) {
    tile(std::integral_constant<int, 1>{});
  } else {
    if (nt == N) return tile(std::integral_constant<int, N>{});
    with_size<N - 1>(nt, tile);
  }
}

// The activations of a call over one group of rows, in as few passes as kGroupTile allows, of equal sizes (each
// pass transposes the group's codes again): tile(size, first activation).
template <typename Tile>
inline void group_passes(int nb, Tile tile) {
  const int passes = (nb + kGroupTile - 1) / kGroupTile, size = (nb + passes - 1) / passes;
  for (int t0 = 0; t0 < nb; t0 += size) {
    auto at = [&](auto nt) { tile(nt, t0); };
    with_size<kGroupTile>(std::min(size, nb - t0), at);
  }
}
#else
#define CFM_GROUPED 0
#endif

#if CFM_NATIVE
// y[j][r] (+)= Q4_1 row r times activation j, for every j: in groups of 16 rows where the CPU has AVX-512 VNNI
// (and `groups`), else a row at a time.
void gemv_q41(const Linear& l, const Act* acts, int nb, float* const* y, bool add, int threads, bool groups) {
#if CFM_GROUPED
  if (groups && l.grouped()) {
    const int kb = l.k / kBlock;
    const size_t stride = static_cast<size_t>(kb) * kQ41;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < l.n / kGroup; ++g) {
      const uint8_t* base = l.row(g * kGroup);
      const uint8_t* next = g + 1 < l.n / kGroup ? l.row((g + 1) * kGroup) : nullptr;
      group_passes(nb, [&](auto nt, int t0) {
        group_tile_q41<decltype(nt)::value>(base, stride, kb, &acts[t0], y + t0, g * kGroup, add,
                                            t0 == 0 ? next : nullptr);
      });
    }
    return;
  }
#endif
  gemv_q41_rows(l, acts, nb, y, add, threads);
}

// y[j][r] = Q8_0 row r (of n) times activation j, for every j.
void gemv_q80(const uint8_t* w, int n, int k, const Act* acts, int nb, float* const* y, int threads,
              bool groups) {
#if CFM_GROUPED
  if (groups && n % kGroup == 0) {
    const int kb = k / kBlock;
    const size_t stride = static_cast<size_t>(kb) * kQ80;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < n / kGroup; ++g) {
      const uint8_t* base = w + g * kGroup * stride;
      const uint8_t* next = g + 1 < n / kGroup ? base + kGroup * stride : nullptr;
      group_passes(nb, [&](auto nt, int t0) {
        group_tile_q80<decltype(nt)::value>(base, stride, kb, &acts[t0], y + t0, g * kGroup,
                                            t0 == 0 ? next : nullptr);
      });
    }
    return;
  }
#endif
  gemv_q80_rows(w, n, k, acts, nb, y, threads);
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

struct Side {  // y += B (A x): A [r, in], B [out, r], fp32 (the brick's weight and scale folded into B)
  std::vector<float> a, b;
  int r = 0;
};

void side_term(const Side& s, const float* x, int in, float* y, int out) {
  if (s.r == 0) return;
  thread_local std::vector<float> tmp;
  tmp.assign(s.r, 0.f);
  for (int j = 0; j < s.r; ++j) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < in; ++i) acc += s.a[static_cast<size_t>(j) * in + i] * x[i];
    tmp[j] = acc;
  }
  for (int o = 0; o < out; ++o) {
    float acc = 0.f;
    for (int j = 0; j < s.r; ++j) acc += s.b[static_cast<size_t>(o) * s.r + j] * tmp[j];
    y[o] += acc;
  }
}

// The sparse FFN of a layer (cfm_set_sparse): per position, only the `keep` neurons of largest |SwiGLU activation|
// (the activation computed from the layer's own gate and up rows: the exact selection) go through the down
// projection, read as columns: the file's own 4-bit codes, neuron-major (`cols` [f][d/2], two codes a byte along
// the hidden axis), with the file's block scales and mins (`shared` [f/32][2][d] fp16): the weights of the file.
struct SparseDown {
  int keep = 0;  // 0: dense
  const uint8_t* cols = nullptr;
  const uint8_t* shared = nullptr;
};

struct Layer {
  const float *ln1 = nullptr, *ln2 = nullptr;
  Linear qkv, o, gu, down;
  Side side[7];  // q, k, v, o, gate, up, down
  SparseDown sparse;
};

}  // namespace

struct CfmDecoder {
  int n_layers, d, h, hkv, hd, f, vocab, ctx, threads;
  float eps;
  std::vector<float> cos, sin;  // [ctx, hd/2]
  std::vector<Layer> layers;
  const float* final_norm = nullptr;
  const uint8_t* head = nullptr;   // Q8_0 [vocab, d/32]
  const uint8_t* embed = nullptr;  // Q8_0 [vocab, d/32] (the same rows as the head when they are tied)
  bool groups = CFM_GROUPED;  // rows in groups of 16 (AVX-512 VNNI), else a row at a time
  std::vector<Act> acts, head_acts;  // rows' activations rounded to int8 (kept between calls)
  std::vector<std::vector<float>> xn, qkv, attn, gu, act;
  std::vector<std::vector<int>> sel;  // per row: the neurons a sparse FFN computes, ascending
  std::vector<std::vector<float>> part;  // per row: the sparse down projection's partial sums [threads][d]
};

namespace {

void resize(CfmDecoder& m, int nb) {  // buffers for nb rows; kept when a later call has fewer (no reallocation)
  if (static_cast<int>(m.acts.size()) >= nb) return;
  const int had = static_cast<int>(m.acts.size());
  m.acts.resize(nb);
  m.xn.resize(nb);
  m.qkv.resize(nb);
  m.attn.resize(nb);
  m.gu.resize(nb);
  m.act.resize(nb);
  m.sel.resize(nb);
  m.part.resize(nb);
  for (int b = had; b < nb; ++b) m.part[b].resize(static_cast<size_t>(m.threads) * m.d);
  for (int b = had; b < nb; ++b) {
    m.xn[b].resize(m.d);
    m.qkv[b].resize((m.h + 2 * m.hkv) * m.hd);
    m.attn[b].resize(m.h * m.hd);
    m.gu[b].resize(2 * m.f);
    m.act[b].resize(m.f);
  }
}

#if CFM_NATIVE
// e^x for 8 floats, x <= 0 (softmax scores less their maximum): Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a
// degree-5 polynomial for e^r, 2^n put in the exponent bits), within 2 ulp of std::exp; 0 below -87.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // a NaN score stays NaN (max takes the second operand when either is NaN)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
}

// One head: softmax(q k^T / sqrt(hd)) v over positions [0, t) of KV group g of a cache [hkv, cap, hd]. HD > 0 is
// the head size known at compile time (the output accumulates in registers across positions); 0 reads it from
// the model.
template <int HD>
void attend(const CfmDecoder& m, const float* qh, const float* kc, const float* vc, int cap, int g, int t, float* out) {
  const int hd = HD > 0 ? HD : m.hd;
  const float* kg = kc + static_cast<size_t>(g) * cap * hd;
  const float* vg = vc + static_cast<size_t>(g) * cap * hd;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  thread_local std::vector<float> scores;
  scores.resize(t);
  float* p = scores.data();
  float mx = -INFINITY;
  for (int j = 0; j < t; ++j) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int e = 0; e < hd; ++e) s += qh[e] * kg[static_cast<size_t>(j) * hd + e];
    p[j] = s * scale;
    mx = std::max(mx, p[j]);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vden = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= t; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmx));
    _mm256_storeu_ps(p + j, e);
    vden = _mm256_add_ps(vden, e);
  }
  float den = hsum(vden);
  for (; j < t; ++j) {
    p[j] = std::exp(p[j] - mx);
    den += p[j];
  }
  const float inv = 1.f / den;
  if constexpr (HD > 0) {
    float acc[HD] = {};
    for (j = 0; j < t; ++j) {
      const float w = p[j] * inv;
      const float* vj = vg + static_cast<size_t>(j) * HD;
#pragma omp simd
      for (int e = 0; e < HD; ++e) acc[e] += w * vj[e];
    }
    std::memcpy(out, acc, sizeof(acc));
  } else {
    std::fill(out, out + hd, 0.f);
    for (j = 0; j < t; ++j) {
      const float w = p[j] * inv;
      const float* vj = vg + static_cast<size_t>(j) * hd;
#pragma omp simd
      for (int e = 0; e < hd; ++e) out[e] += w * vj[e];
    }
  }
}

void attend_head(const CfmDecoder& m, const float* qh, const float* kc, const float* vc, int cap, int g, int t,
                 float* out) {
  switch (m.hd) {
    case 64: return attend<64>(m, qh, kc, vc, cap, g, t, out);
    case 128: return attend<128>(m, qh, kc, vc, cap, g, t, out);
    default: return attend<0>(m, qh, kc, vc, cap, g, t, out);
  }
}

// The `keep` neurons of largest |act| (ties: the lower indices; NaN counts as largest, so it reaches the logits),
// ascending in `sel`; the others' activations are set to 0 (what the down side term then sees). The keep-th
// largest magnitude is found with one nth_element over a copy of the magnitudes, then one pass in index order
// takes everything above it and the first of its ties.
void select_neurons(float* act, int f, int keep, std::vector<int>& sel) {
  thread_local std::vector<float> mag, work;
  mag.resize(f);
  for (int i = 0; i < f; ++i) mag[i] = std::isnan(act[i]) ? INFINITY : std::fabs(act[i]);
  work.assign(mag.begin(), mag.end());
  std::nth_element(work.begin(), work.begin() + (keep - 1), work.end(), std::greater<float>());
  const float threshold = work[keep - 1];
  int above = 0;
  for (int i = 0; i < f; ++i) above += mag[i] > threshold;
  int ties = keep - above;
  sel.clear();
  for (int i = 0; i < f; ++i) {
    if (mag[i] > threshold || (mag[i] == threshold && ties-- > 0))
      sel.push_back(i);
    else
      act[i] = 0.f;
  }
}

// The first selected neuron of part p of P (parts of the ascending selection, cut at blocks of 32 neurons).
int part_start(const int* sel, int k, int parts, int p) {
  if (p >= parts) return k;
  int i = static_cast<int>(static_cast<int64_t>(k) * p / parts);
  while (i > 0 && i < k && sel[i] / kBlock == sel[i - 1] / kBlock) ++i;
  return i;
}

// The V * 8 outputs from r0 of the down columns of neurons sel[lo, hi) (one block of 32 neurons), times their
// activations: scale[r] * sum(a_n q_n[r]) + min[r] * sum(a_n), added to out.
template <int V>
inline void down_block_chunk(const SparseDown& s, int d, const float* act, const int* sel, int lo, int hi,
                             float asum, int r0, float* out) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(15);
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  const size_t col = static_cast<size_t>(d) / 2;
  for (int i = lo; i < hi; ++i) {
    const __m256 va = _mm256_set1_ps(act[sel[i]]);
    const uint8_t* p = s.cols + sel[i] * col + r0 / 2;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      uint32_t codes;
      std::memcpy(&codes, p + 4 * v, 4);
      const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(codes), shifts), low4));
      acc[v] = _mm256_fmadd_ps(va, q, acc[v]);
    }
  }
  const uint8_t* scales = s.shared + static_cast<size_t>(sel[lo] / kBlock) * 4 * d;
  const __m256 vsum = _mm256_set1_ps(asum);
  for (int v = 0; v < V; ++v) {
    const int r = r0 + 8 * v;
    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 2 * r)));
    const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 2 * (d + r))));
    _mm256_storeu_ps(out + r, _mm256_fmadd_ps(sc, acc[v], _mm256_fmadd_ps(mn, vsum, _mm256_loadu_ps(out + r))));
  }
}

// out[0, d) = the down columns of neurons sel[lo, hi) times their activations, block by block (a block's columns,
// 9 KB at most, are read once from memory and then from L1 for each chunk of 64 outputs), in fp32 over the file's
// codes, scales and mins.
void sparse_down_part(const SparseDown& s, int d, const float* act, const int* sel, int lo, int hi, float* out) {
  std::fill(out, out + d, 0.f);
  for (int i = lo; i < hi;) {
    const int blk = sel[i] / kBlock;
    int j = i;
    float asum = 0.f;
    for (; j < hi && sel[j] / kBlock == blk; ++j) asum += act[sel[j]];
    int r0 = 0;
    for (; r0 + 64 <= d; r0 += 64) down_block_chunk<8>(s, d, act, sel, i, j, asum, r0, out);
    for (; r0 < d; r0 += 32) down_block_chunk<4>(s, d, act, sel, i, j, asum, r0, out);
    i = j;
  }
}

// One layer for every row; x [nb, d] is the residual stream, updated in place. k[i]/v[i]: row i's cache of
// this layer ([hkv, caps[i], hd]).
void layer(CfmDecoder& m, const Layer& L, float* x, const int64_t* pos, float* const* k, float* const* v,
           const int* caps, int nb) {
  const int d = m.d, group = m.h / m.hkv, f = m.f;
  std::vector<float*> y(nb);
  // the rows' own work between the matrix products (norms, rounding, rotary, SwiGLU) is split across the threads
  // too when there are several rows: left to one thread, the others waited at each product for it
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1)
  for (int b = 0; b < nb; ++b) {
    rmsnorm(x + static_cast<size_t>(b) * d, L.ln1, d, m.eps, m.xn[b].data());
    quantize(m.xn[b].data(), d, m.acts[b]);
    y[b] = m.qkv[b].data();
  }
  gemv_q41(L.qkv, m.acts.data(), nb, y.data(), false, m.threads, m.groups);
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1)
  for (int b = 0; b < nb; ++b) {
    float* q = m.qkv[b].data();
    float* kn = q + m.h * m.hd;
    float* vn = kn + m.hkv * m.hd;
    side_term(L.side[0], m.xn[b].data(), d, q, m.h * m.hd);
    side_term(L.side[1], m.xn[b].data(), d, kn, m.hkv * m.hd);
    side_term(L.side[2], m.xn[b].data(), d, vn, m.hkv * m.hd);
    const float* cs = m.cos.data() + pos[b] * (m.hd / 2);
    const float* sn = m.sin.data() + pos[b] * (m.hd / 2);
    for (int hh = 0; hh < m.h; ++hh) rotate(q + hh * m.hd, cs, sn, m.hd);
    for (int g = 0; g < m.hkv; ++g) {
      rotate(kn + g * m.hd, cs, sn, m.hd);
      std::memcpy(k[b] + (static_cast<size_t>(g) * caps[b] + pos[b]) * m.hd, kn + g * m.hd, m.hd * sizeof(float));
      std::memcpy(v[b] + (static_cast<size_t>(g) * caps[b] + pos[b]) * m.hd, vn + g * m.hd, m.hd * sizeof(float));
    }
  }
#pragma omp parallel for num_threads(m.threads) schedule(static) collapse(2)
  for (int b = 0; b < nb; ++b)
    for (int hh = 0; hh < m.h; ++hh)
      attend_head(m, m.qkv[b].data() + hh * m.hd, k[b], v[b], caps[b], hh / group, static_cast<int>(pos[b]) + 1,
             m.attn[b].data() + hh * m.hd);
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1)
  for (int b = 0; b < nb; ++b) {
    quantize(m.attn[b].data(), m.h * m.hd, m.acts[b]);
    y[b] = x + static_cast<size_t>(b) * d;
  }
  gemv_q41(L.o, m.acts.data(), nb, y.data(), true, m.threads, m.groups);  // residual += o
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1)
  for (int b = 0; b < nb; ++b) {
    side_term(L.side[3], m.attn[b].data(), m.h * m.hd, y[b], d);
    rmsnorm(x + static_cast<size_t>(b) * d, L.ln2, d, m.eps, m.xn[b].data());
    quantize(m.xn[b].data(), d, m.acts[b]);
    y[b] = m.gu[b].data();
  }
  gemv_q41(L.gu, m.acts.data(), nb, y.data(), false, m.threads, m.groups);
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1)
  for (int b = 0; b < nb; ++b) {
    float* gu = m.gu[b].data();
    side_term(L.side[4], m.xn[b].data(), d, gu, f);
    side_term(L.side[5], m.xn[b].data(), d, gu + f, f);
    float* act = m.act[b].data();
    for (int i = 0; i < f; ++i) act[i] = gu[i] / (1.f + std::exp(-gu[i])) * gu[f + i];
    if (L.sparse.keep > 0)
      select_neurons(act, f, L.sparse.keep, m.sel[b]);
    else
      quantize(act, f, m.acts[b]);
    y[b] = x + static_cast<size_t>(b) * d;
  }
  if (L.sparse.keep > 0) {  // residual += the selected neurons' down columns, each row's in m.threads parts (the
    // same parts and order whatever the number of rows: a chunk gives the bits of single steps)
    const int parts = m.threads, keep = L.sparse.keep;
#pragma omp parallel for num_threads(m.threads) schedule(static) collapse(2)
    for (int b = 0; b < nb; ++b)
      for (int p = 0; p < parts; ++p) {
        const int* sel = m.sel[b].data();
        sparse_down_part(L.sparse, d, m.act[b].data(), sel, part_start(sel, keep, parts, p),
                         part_start(sel, keep, parts, p + 1), m.part[b].data() + static_cast<size_t>(p) * d);
      }
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1)
    for (int b = 0; b < nb; ++b)
      for (int p = 0; p < parts; ++p)
        for (int r = 0; r < d; ++r) y[b][r] += m.part[b][static_cast<size_t>(p) * d + r];
  } else {
    gemv_q41(L.down, m.acts.data(), nb, y.data(), true, m.threads, m.groups);  // residual += down
  }
#pragma omp parallel for num_threads(m.threads) schedule(static) if (nb > 1 && L.side[6].r > 0)
  for (int b = 0; b < nb; ++b) side_term(L.side[6], m.act[b].data(), f, y[b], d);
}

// The logits of n rows x [n, d] leaving the last layer (final norm, rounding) against Q8_0 head rows `rows`
// [nrows, d]: out[j * ldo + r] <- row j's logit r. Buffers for n rows must be there (`resize`).
void head_logits(CfmDecoder& m, int n, const float* x, const uint8_t* rows, int nrows, float* out, int ldo) {
  if (static_cast<int>(m.head_acts.size()) < n) m.head_acts.resize(n);
  std::vector<float*> y(n);
  for (int j = 0; j < n; ++j) {
    rmsnorm(x + static_cast<size_t>(j) * m.d, m.final_norm, m.d, m.eps, m.xn[j].data());
    quantize(m.xn[j].data(), m.d, m.head_acts[j]);
    y[j] = out + static_cast<size_t>(j) * ldo;
  }
  gemv_q80(rows, nrows, m.d, m.head_acts.data(), n, y.data(), m.threads, m.groups);
}
#endif

int side_in(const CfmDecoder& m, int kind) { return kind == 3 ? m.h * m.hd : kind == 6 ? m.f : m.d; }
int side_out(const CfmDecoder& m, int kind) {
  const int out[7] = {m.h * m.hd, m.hkv * m.hd, m.hkv * m.hd, m.d, m.f, m.f, m.d};
  return out[kind];
}

#if CFM_NATIVE
// One neuron bundle to fp32 (cfm_bundles_f32). Each value is d q, rounded, then + m, rounded: what numpy computes
// (the fallback, sparse/bundle.py, and the GGUF dequantization), so all give the same bits; no fused multiply-add.
__attribute__((optimize("fp-contract=off"))) void decode_bundle(const uint8_t* p, int d, const int* kinds,
                                                                  const uint8_t* shared, float* y) {
  for (int part = 0; part < 3; ++part, y += d) {
    if (kinds[part] == 2) {  // 4-bit codes, two per byte along the hidden axis; the row's fp16 scales, then mins
      const uint8_t* mins = shared + 2 * d;
      const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(15);
      for (int h = 0; h < d; h += 8) {  // d is a multiple of 32
        uint32_t codes;
        std::memcpy(&codes, p + h / 2, 4);
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(codes), shifts), low4));
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(shared + 2 * h)));
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + 2 * h)));
        _mm256_storeu_ps(y + h, _mm256_add_ps(_mm256_mul_ps(scale, q), mn));
      }
      p += d / 2;
      continue;
    }
    float* out = y;
    for (int b = 0; b < d / kBlock; ++b, out += kBlock) {
      const float scale = f16(p);
      if (kinds[part] == 1) {
        const float mn = f16(p + 2);
        const uint8_t* qs = p + 4;
        for (int j = 0; j < 16; ++j) {
          out[j] = scale * static_cast<float>(qs[j] & 15) + mn;
          out[j + 16] = scale * static_cast<float>(qs[j] >> 4) + mn;
        }
        p += kQ41;
      } else {
        const int8_t* qs = reinterpret_cast<const int8_t*>(p + 2);
        for (int j = 0; j < kBlock; ++j) out[j] = scale * static_cast<float>(qs[j]);
        p += kQ80;
      }
    }
  }
}
#endif

}  // namespace

extern "C" {

int cfm_available() { return CFM_NATIVE; }

// cos/sin [ctx, hd/2] are copied; every weight pointer given later must stay valid while the decoder lives.
CfmDecoder* cfm_new(int n_layers, int d, int n_heads, int n_kv, int head_dim, int d_ff, int vocab, int ctx, float eps,
                    int threads, const float* cos, const float* sin) {
  auto* m = new CfmDecoder{n_layers, d, n_heads, n_kv, head_dim, d_ff, vocab, ctx, threads, eps};
  m->cos.assign(cos, cos + static_cast<size_t>(ctx) * head_dim / 2);
  m->sin.assign(sin, sin + static_cast<size_t>(ctx) * head_dim / 2);
  m->layers.resize(n_layers);
  return m;
}

void cfm_free(CfmDecoder* m) { delete m; }

// Rows in groups of 16 (the default where the build has AVX-512 VNNI) or one at a time; returns the path taken.
int cfm_set_groups(CfmDecoder* m, int on) {
  m->groups = on != 0 && CFM_GROUPED;
  return m->groups;
}

// Q4_1 rows: q [h*hd, d], k and v [hkv*hd, d], o [d, h*hd], gate and up [f, d], down [d, f].
void cfm_set_layer(CfmDecoder* m, int i, const float* ln1, const float* ln2, const uint8_t* q, const uint8_t* k,
                   const uint8_t* v, const uint8_t* o, const uint8_t* gate, const uint8_t* up, const uint8_t* down) {
  Layer& L = m->layers[i];  // its side terms are kept: a streamed layer is pointed at new memory every use
  L.qkv = Linear{};
  L.o = Linear{};
  L.gu = Linear{};
  L.down = Linear{};
  L.ln1 = ln1;
  L.ln2 = ln2;
  L.qkv.add(q, m->h * m->hd, m->d);
  L.qkv.add(k, m->hkv * m->hd, m->d);
  L.qkv.add(v, m->hkv * m->hd, m->d);
  L.o.add(o, m->d, m->h * m->hd);
  L.gu.add(gate, m->f, m->d);
  L.gu.add(up, m->f, m->d);
  L.down.add(down, m->d, m->f);
}

void cfm_set_head(CfmDecoder* m, const float* final_norm, const uint8_t* head_q8_0, const uint8_t* embed_q8_0) {
  m->final_norm = final_norm;
  m->head = head_q8_0;
  m->embed = embed_q8_0;
}

// Side term of linear `kind` (0..6: q, k, v, o, gate, up, down) of layer i: A [r, in], B [out, r] (copied);
// r = 0 removes it. Returns 0, or -1 for a bad layer or kind.
int cfm_set_side(CfmDecoder* m, int i, int kind, int r, const float* a, const float* b) {
  if (i < 0 || i >= m->n_layers || kind < 0 || kind > 6) return -1;
  Side& s = m->layers[i].side[kind];
  s = Side{};
  if (r > 0) {
    s.r = r;
    s.a.assign(a, a + static_cast<size_t>(r) * side_in(*m, kind));
    s.b.assign(b, b + static_cast<size_t>(side_out(*m, kind)) * r);
  }
  return 0;
}

// Layer i's sparse FFN: only the `keep` neurons of largest |activation| per position through its down projection,
// from `cols` [f][d/2] and `shared` [f/32][2][d] (struct SparseDown; pointers kept); keep = 0 (or f) is dense.
// Returns 0, or -1 for a bad layer or count.
int cfm_set_sparse(CfmDecoder* m, int i, int keep, const uint8_t* cols, const uint8_t* shared) {
  if (i < 0 || i >= m->n_layers || keep < 0 || keep > m->f || (keep > 0 && keep < m->f && (!cols || !shared)))
    return -1;
  m->layers[i].sparse = keep > 0 && keep < m->f ? SparseDown{keep, cols, shared} : SparseDown{};
  return 0;
}

// Token embeddings from the Q8_0 embedding rows: out [n, d].
void cfm_embed(const CfmDecoder* m, int n, const int64_t* tokens, float* out) {
#if CFM_NATIVE
  const int kb = m->d / kBlock;
  for (int t = 0; t < n; ++t) {
    const uint8_t* row = m->embed + static_cast<size_t>(tokens[t]) * kb * kQ80;
    for (int b = 0; b < kb; ++b) {
      const float d = f16(row + b * kQ80);
      const int8_t* q = reinterpret_cast<const int8_t*>(row + b * kQ80 + 2);
      for (int i = 0; i < kBlock; ++i) out[static_cast<size_t>(t) * m->d + b * kBlock + i] = d * q[i];
    }
  }
#endif
}

// x [nb, d]: rows entering layer `first`, row i at position pos[i]; k[i * span + l], v[...]: row i's cache of layer
// first + l ([hkv, caps[i], hd]; rows of one sequence share them and come in position order). Updates x in place
// to the rows leaving layer last - 1; with head_rows = n > 0 also writes the logits [n, vocab] of the last n rows
// (final norm, LM head) to `logits`. Returns 0, or -1 without the native instructions.
int cfm_forward(CfmDecoder* m, int nb, float* x, const int64_t* pos, int first, int last, float* const* k,
                float* const* v, const int* caps, int head_rows, float* logits) {
#if CFM_NATIVE
  resize(*m, nb);
  const int span = last - first;
  std::vector<float*> kl(nb), vl(nb);
  for (int li = first; li < last; ++li) {
    for (int b = 0; b < nb; ++b) {
      kl[b] = k[static_cast<size_t>(b) * span + (li - first)];
      vl[b] = v[static_cast<size_t>(b) * span + (li - first)];
    }
    layer(*m, m->layers[li], x, pos, kl.data(), vl.data(), caps, nb);
  }
  if (head_rows > 0)
    head_logits(*m, head_rows, x + static_cast<size_t>(nb - head_rows) * m->d, m->head, m->vocab, logits, m->vocab);
  return 0;
#else
  return -1;
#endif
}

// Logits of `n` rows for a part of the vocabulary: x [n, d] rows leaving the last layer (final norm applied
// here), `rows` the Q8_0 head rows [row0, row0 + nrows) (a part of the head held anywhere), out[j * ldo + r]
// <- row j's logit of token row0 + r. With parts in whole groups of 16 rows it gives the bits of the whole head.
int cfm_head_rows(CfmDecoder* m, int n, const float* x, const uint8_t* rows, int nrows, float* out, int ldo) {
#if CFM_NATIVE
  resize(*m, n);
  head_logits(*m, n, x, rows, nrows, out, ldo);
  return 0;
#else
  return -1;
#endif
}

// Neuron bundles (cfm_runtime/sparse/bundle.py) to fp32: n bundles of `bytes` bytes, each three parts of d values
// (gate row, up row, down column) of kind kinds[p]: 0 Q8_0 blocks, 1 Q4_1 blocks, 2 the file's own 4-bit codes of
// a Q4_1 down column, whose scales and mins are the file's: shared [F / 32][2][d] fp16 (scales, then mins), row
// ids[i] / 32 for bundle i (neuron ids[i]). out [n, 3, d].
int cfm_bundles_f32(int64_t n, int64_t bytes, int d, const int* kinds, const uint8_t* src, const int64_t* ids,
                    const uint8_t* shared, float* out, int threads) {
#if CFM_NATIVE
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    decode_bundle(src + i * bytes, d, kinds, shared ? shared + (ids[i] / kBlock) * 4 * static_cast<int64_t>(d) : nullptr,
                  out + i * 3 * static_cast<int64_t>(d));
  return 0;
#else
  return -1;
#endif
}

// y [nb][n] = Q4_1 rows times nb activations x [nb][k] (int8 activations, as a layer's linears compute them), the
// rows given as `nparts` tensors of rows[t] rows each, one after another (a sparse FFN's predictor over a layer's
// own gate and up rows: cfm_runtime/sparse/predictor.py).
int cfm_q41_matmul(int nparts, const uint8_t* const* parts, const int* rows, int k, int nb, const float* x, float* y,
                   int threads) {
#if CFM_NATIVE
  Linear l;
  for (int t = 0; t < nparts; ++t) l.add(parts[t], rows[t], k);
  std::vector<Act> acts(nb);
  std::vector<float*> out(nb);
  for (int j = 0; j < nb; ++j) {
    quantize(x + static_cast<size_t>(j) * k, k, acts[j]);
    out[j] = y + static_cast<size_t>(j) * l.n;
  }
  gemv_q41(l, acts.data(), nb, out.data(), false, threads, CFM_GROUPED);
  return 0;
#else
  return -1;
#endif
}

}  // extern "C"
