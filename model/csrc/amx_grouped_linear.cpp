// Grouped bf16 linear on AMX tiles: every segment of sorted tokens times its own prepacked weight, in one call.
//
// moeyard::amx_grouped_linear(x [N, K] bf16, counts [S], weights S x [N_out / 32, K / 32, 2, 16, 16, 2] bf16,
//   swiglu, out) -> [N, N_out] bf16 ([N, N_out / 2] with swiglu).  Segment s is rows sum(counts[:s]) ..
//   + counts[s] of x; its output rows are x_s @ W_s^T with fp32 accumulation, rounded to bf16 once (round
//   to nearest even). With swiglu, each block's two 16-column tiles are an expert's gate and up columns
//   16j .. 16j + 16 (model/amx.py packs them so), and the block writes silu(gate) * up, computed from the
//   fp32 sums and rounded once, to output columns 16j .. 16j + 16: SwiGLU's activation with no [N, 2I]
//   intermediate. out (optional): where to write the result (a scratch buffer the caller keeps).
//
// Weight layout (model/amx.py packs it): for output block j (32 columns, two 16-column tiles) and
// K chunk c (32 inputs), two AMX B tiles of 16 rows x 64 bytes; tile t row r holds columns
// 32j + 16t .. + 16 at inputs 32c + 2r and 32c + 2r + 1, interleaved (the VNNI pairs TDPBF16PS reads).
// A block's tiles are contiguous in K order, so a block is one sequential stream.
//
// Work: (segment, output block) pairs split evenly over torch's intra-op threads; each pair runs its
// segment's rows in chunks of 32 (two A tiles) against the block's stream, re-read from cache for the
// second and later chunks. Tile registers: C 0-3 (rows 0-15 / 16-31 x columns 0-15 / 16-31), A 4-5, B 6-7.
// No per-call allocation beyond the result: the packed A tiles live in a buffer kept per calling thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;
constexpr int64_t kBlock = 32;      // output columns per block and inputs per K chunk
constexpr int64_t kRunChunks = 16;  // K chunks of a block's stream that several row chunks share from L1
constexpr int64_t kGroupBytes = 1024 * 1024;  // A tiles of the row chunks that share a pass over the weights

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// exp(x) for 16 floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial, 2^n by scalef); within
// 2 ulp of expf over [-87, 88], saturating outside (0 / inf after the clamp's 2^127 scale).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// One row of a SwiGLU block: silu(gate) * up from the fp32 sums (gate columns 0-15, up 16-31), to 16 bf16.
inline void store_swiglu_row(const float* src, at::BFloat16* dst) {
  const __m512 g = _mm512_loadu_ps(src);
  const __m512 u = _mm512_loadu_ps(src + 16);
  const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u))));
}

inline void store_bf16_row(const float* src, at::BFloat16* dst) {
  __m512 lo = _mm512_loadu_ps(src);
  __m512 hi = _mm512_loadu_ps(src + 16);
  __m512bh packed = _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0-15 from lo, 16-31 from hi
  _mm512_storeu_si512(reinterpret_cast<void*>(dst), reinterpret_cast<__m512i>(packed));
}

// K chunks [c0, c1) of one row chunk (a: its packed A tiles) times one 32-column block (b: its stream),
// added to acc ([32 rows][32 columns] fp32; zero: start from 0 instead of acc), written back to acc. A row's
// sum runs over the K chunks in order whatever the split into ranges: the fp32 store and reload are exact.
template <bool kTwoTiles>
void accumulate(const at::BFloat16* a, const at::BFloat16* b, int64_t c0, int64_t c1, float* acc, bool zero) {
  if (zero) {
    _tile_zero(0);
    _tile_zero(1);
    if (kTwoTiles) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, acc, 128);
    _tile_loadd(1, acc + 16, 128);
    if (kTwoTiles) {
      _tile_loadd(2, acc + 16 * 32, 128);
      _tile_loadd(3, acc + 16 * 32 + 16, 128);
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    const at::BFloat16* bt = b + c * 2 * 512;
    const at::BFloat16* at_ = a + c * 1024;
    _tile_loadd(4, at_, 64);
    _tile_loadd(6, bt, 64);
    _tile_loadd(7, bt + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoTiles) {
      _tile_loadd(5, at_ + 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  if (kTwoTiles) {
    _tile_stored(2, acc + 16 * 32, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
  }
}

at::Tensor amx_grouped_linear(const at::Tensor& x, at::IntArrayRef counts, at::TensorList weights, bool swiglu,
                              const c10::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(amx_permitted(), "amx_grouped_linear: the kernel refused AMX tile state to this process");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "amx_grouped_linear: x must be a 2-D bfloat16 CPU tensor");
  TORCH_CHECK(counts.size() == weights.size(), "amx_grouped_linear: ", counts.size(), " counts for ",
              weights.size(), " weights");
  const int64_t n_rows = x.size(0);
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kBlock == 0, "amx_grouped_linear: K=", k, " is not a multiple of 32");
  const int64_t k_chunks = k / kBlock;
  int64_t out_features = -1;
  int64_t total = 0;
  for (size_t s = 0; s < weights.size(); ++s) {
    const at::Tensor& w = weights[s];
    TORCH_CHECK(w.dim() == 6 && w.size(1) == k_chunks && w.size(2) == 2 && w.size(3) == 16 && w.size(4) == 16 &&
                    w.size(5) == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
                "amx_grouped_linear: weight ", s, " is not a packed [N/32, K/32, 2, 16, 16, 2] bf16 block for K=", k);
    const int64_t n = w.size(0) * kBlock;
    TORCH_CHECK(out_features < 0 || n == out_features, "amx_grouped_linear: weights differ in output size");
    out_features = n;
    TORCH_CHECK(counts[s] >= 0, "amx_grouped_linear: negative count");
    total += counts[s];
  }
  TORCH_CHECK(total == n_rows, "amx_grouped_linear: counts sum to ", total, ", x has ", n_rows, " rows");
  const int64_t out_cols = swiglu ? out_features / 2 : out_features;
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.dim() == 2 && out.size(0) == n_rows && out.size(1) == (out_features < 0 ? 0 : out_cols) &&
                    out.scalar_type() == at::kBFloat16 && out.is_contiguous(),
                "amx_grouped_linear: out must be a contiguous [", n_rows, ", ", out_cols, "] bfloat16 tensor");
  }
  if (out_features < 0) return out.defined() ? out : at::empty({n_rows, 0}, x.options());
  if (!out.defined()) out = at::empty({n_rows, out_cols}, x.options());
  const at::Tensor xc = x.contiguous();

  // Row chunks: each segment's rows in chunks of at most 32, chunk q's A tiles packed into
  // ap[q] = [K/32][32 rows][32 inputs] (zero rows past the chunk), so every tile load is 1 KB contiguous.
  struct Chunk {
    int64_t row, rows;
    const at::BFloat16* w;
  };
  std::vector<Chunk> chunks;
  std::vector<int64_t> seg_first;  // each segment's first chunk, and the end
  int64_t row = 0;
  for (size_t s = 0; s < weights.size(); ++s) {
    if (counts[s] > 0) {
      seg_first.push_back(static_cast<int64_t>(chunks.size()));
      for (int64_t m0 = 0; m0 < counts[s]; m0 += kBlock)
        chunks.push_back({row + m0, std::min<int64_t>(kBlock, counts[s] - m0), weights[s].data_ptr<at::BFloat16>()});
    }
    row += counts[s];
  }
  seg_first.push_back(static_cast<int64_t>(chunks.size()));
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t chunk_elems = k_chunks * kBlock * kBlock;
  // The packed A tiles: a buffer kept per calling thread and grown as needed (a fresh one per call would
  // page-fault its megabytes in again on every prefill-sized call).
  thread_local at::Tensor ap_buffer;
  if (!ap_buffer.defined() || ap_buffer.numel() < n_chunks * chunk_elems)
    ap_buffer = at::empty({n_chunks * chunk_elems}, x.options());
  const at::Tensor& ap = ap_buffer;
  const at::BFloat16* xd = xc.data_ptr<at::BFloat16>();
  at::BFloat16* apd = ap.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      at::BFloat16* dst = apd + q * chunk_elems;
      for (int64_t c = 0; c < k_chunks; ++c)
        for (int64_t r = 0; r < kBlock; ++r) {
          at::BFloat16* d = dst + (c * kBlock + r) * kBlock;
          if (r < chunks[q].rows)
            std::memcpy(d, xd + (chunks[q].row + r) * k + c * kBlock, kBlock * sizeof(at::BFloat16));
          else
            std::memset(d, 0, kBlock * sizeof(at::BFloat16));
        }
    }
  });

  const int64_t blocks = out_features / kBlock;
  // Row groups: a segment's row chunks in groups whose A tiles take at most kGroupBytes, so that a thread
  // going through a group's blocks one after another reads the group's A from its L2 every time.
  const int64_t group_chunks = std::max<int64_t>(1, kGroupBytes / (chunk_elems * 2));
  std::vector<int64_t> group_first;  // each group's first chunk, and the end
  for (size_t g = 0; g + 1 < seg_first.size(); ++g)
    for (int64_t q = seg_first[g]; q < seg_first[g + 1]; q += group_chunks) group_first.push_back(q);
  group_first.push_back(n_chunks);
  const int64_t groups = static_cast<int64_t>(group_first.size()) - 1;
  const int64_t items = groups * blocks;
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  const int64_t block_elems = k_chunks * 2 * 512;

  int64_t most_chunks = 1;
  for (int64_t g = 0; g < groups; ++g) most_chunks = std::max(most_chunks, group_first[g + 1] - group_first[g]);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(most_chunks) * kBlock * kBlock);
    load_tile_config();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / blocks;
      const int64_t j = item % blocks;
      const int64_t first = group_first[g], last = group_first[g + 1];
      // One row chunk: the block's whole stream at once. More: the stream in runs of kRunChunks K chunks
      // (32 KiB, kept in L1) that every row chunk takes in turn, its sums parked in acc between runs.
      const int64_t run = last - first == 1 ? k_chunks : kRunChunks;
      for (int64_t c0 = 0; c0 < k_chunks; c0 += run) {
        const int64_t c1 = std::min(k_chunks, c0 + run);
        for (int64_t q = first; q < last; ++q) {
          const at::BFloat16* a = apd + q * chunk_elems;
          const at::BFloat16* b = chunks[q].w + j * block_elems;
          float* aq = acc.data() + (q - first) * kBlock * kBlock;
          if (chunks[q].rows > 16)
            accumulate<true>(a, b, c0, c1, aq, c0 == 0);
          else
            accumulate<false>(a, b, c0, c1, aq, c0 == 0);
        }
      }
      for (int64_t q = first; q < last; ++q) {
        const float* aq = acc.data() + (q - first) * kBlock * kBlock;
        if (swiglu) {
          at::BFloat16* o = od + chunks[q].row * out_cols + j * 16;
          for (int64_t r = 0; r < chunks[q].rows; ++r) store_swiglu_row(aq + r * kBlock, o + r * out_cols);
        } else {
          at::BFloat16* o = od + chunks[q].row * out_cols + j * kBlock;
          for (int64_t r = 0; r < chunks[q].rows; ++r) store_bf16_row(aq + r * kBlock, o + r * out_cols);
        }
      }
    }
    _tile_release();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(moeyard_amx, m) {
  m.def("grouped_linear(Tensor x, int[] counts, Tensor[] weights, bool swiglu=False, Tensor? out=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeyard_amx, CPU, m) {
  m.impl("grouped_linear", &amx_grouped_linear);
}
