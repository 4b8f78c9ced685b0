// The CPU sparse kernels: the SDDMM of the value gradient and the in-place merge of S into W.
//
// SDDMM without materialised transposes: v[k] = sum_t dy[t, row(k)] * x[t, col(k)], the value
// gradient of the sparse adapter. Both operands arrive token-major (T x out, T x in),
// while each non-zero needs a dot product over tokens. torch's sampled_addmm first copies both
// operands whole into feature-major layout; that copy (density-independent) costs more than the
// dot products at RoSA's densities. Here the tokens are taken in blocks of kTokens: each block of
// both operands is transposed into a buffer that stays in L2 (8x8 AVX tiles where available), and
// the dot products of the block are accumulated from there, eight non-zeros of a row at a time
// (four, then one, for a row's remainder) so the row's block is loaded once for eight columns and
// the eight sums are reduced together.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTokens = 64;  // tokens per block
constexpr int64_t kPrefetch = 32;  // W positions fetched ahead by the merge and the restore

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

inline vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }

inline float sum8(vec8 s) {
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

#ifdef __AVX2__
inline __m256 load_as_float8(const float* p) { return _mm256_loadu_ps(p); }

// bf16 is the top half of an fp32: widen and shift, exact.
inline __m256 load_as_float8(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// dst[k * kTokens + t] = src[t * ld + k] for an 8 x 8 tile, in fp32.
template <typename scalar_t>
inline void transpose_tile8(const scalar_t* src, int64_t ld, float* dst) {
  __m256 r0 = load_as_float8(src), r1 = load_as_float8(src + ld),
         r2 = load_as_float8(src + 2 * ld), r3 = load_as_float8(src + 3 * ld),
         r4 = load_as_float8(src + 4 * ld), r5 = load_as_float8(src + 5 * ld),
         r6 = load_as_float8(src + 6 * ld), r7 = load_as_float8(src + 7 * ld);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
         t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
         t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
         u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
         u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
         u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
         u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
         u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
         u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
         u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst + 0 * kTokens, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * kTokens, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * kTokens, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * kTokens, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * kTokens, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * kTokens, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * kTokens, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * kTokens, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// dst[k * kTokens + t] = src[t * ld + k] in fp32 for features k in [begin, end) and t < rows;
// zero for t >= rows, so a short last block adds nothing.
template <typename scalar_t>
void transpose_block(const scalar_t* src, int64_t ld, int64_t rows, int64_t begin, int64_t end,
                     float* dst) {
  int64_t k = begin;
#ifdef __AVX2__
  if (rows == kTokens) {
    for (; k + 8 <= end; k += 8)
      for (int64_t t = 0; t < kTokens; t += 8)
        transpose_tile8(src + t * ld + k, ld, dst + k * kTokens + t);
  }
#endif
  for (; k < end; ++k) {
    float* d = dst + k * kTokens;
    for (int64_t t = 0; t < rows; ++t) d[t] = static_cast<float>(src[t * ld + k]);
    for (int64_t t = rows; t < kTokens; ++t) d[t] = 0.f;
  }
}

template <typename scalar_t>
void transpose_parallel(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  const int64_t tiles = (cols + 7) / 8;
  at::parallel_for(0, tiles, 16, [&](int64_t b, int64_t e) {
    transpose_block(src, ld, rows, b * 8, std::min(cols, e * 8), dst);
  });
}

#ifdef __AVX2__
// The eight lane sums of s0..s7 as one vector: {sum(s0), ..., sum(s7)}. Three rounds of
// horizontal adds reduce eight accumulators together, where a lane-by-lane sum per non-zero
// cost more than its dot product.
inline __m256 sum8x8(__m256 s0, __m256 s1, __m256 s2, __m256 s3, __m256 s4, __m256 s5,
                     __m256 s6, __m256 s7) {
  const __m256 h01 = _mm256_hadd_ps(s0, s1), h23 = _mm256_hadd_ps(s2, s3);
  const __m256 h45 = _mm256_hadd_ps(s4, s5), h67 = _mm256_hadd_ps(s6, s7);
  const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
  // q0 = {s0 s1 s2 s3 | s0 s1 s2 s3} halves (low lane, high lane), q1 likewise for s4..s7
  const __m256 lo = _mm256_permute2f128_ps(q0, q1, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(q0, q1, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif

// v[k] += dot(a_buf row i, b_buf row col[k]) for the non-zeros of rows [begin, end): eight
// non-zeros of a row per pass (the row's block loaded once for eight columns), reduced together.
void accumulate_rows(const float* a_buf, const float* b_buf, const int32_t* row_ptr,
                     const int32_t* col, int64_t begin, int64_t end, float* v) {
  for (int64_t i = begin; i < end; ++i) {
    const float* a = a_buf + i * kTokens;
    int64_t k = row_ptr[i];
    const int64_t k_end = row_ptr[i + 1];
#ifdef __AVX2__
    for (; k + 8 <= k_end; k += 8) {
      const float* b[8];
      for (int j = 0; j < 8; ++j) b[j] = b_buf + int64_t(col[k + j]) * kTokens;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0,
             s7 = s0;
      for (int64_t t = 0; t < kTokens; t += 8) {
        const __m256 av = _mm256_loadu_ps(a + t);
        s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[0] + t), s0);
        s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[1] + t), s1);
        s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[2] + t), s2);
        s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[3] + t), s3);
        s4 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[4] + t), s4);
        s5 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[5] + t), s5);
        s6 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[6] + t), s6);
        s7 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[7] + t), s7);
      }
      const __m256 sums = sum8x8(s0, s1, s2, s3, s4, s5, s6, s7);
      _mm256_storeu_ps(v + k, _mm256_add_ps(_mm256_loadu_ps(v + k), sums));
    }
#endif
    for (; k + 4 <= k_end; k += 4) {
      const float* b0 = b_buf + int64_t(col[k]) * kTokens;
      const float* b1 = b_buf + int64_t(col[k + 1]) * kTokens;
      const float* b2 = b_buf + int64_t(col[k + 2]) * kTokens;
      const float* b3 = b_buf + int64_t(col[k + 3]) * kTokens;
      vec8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
      for (int64_t t = 0; t < kTokens; t += 8) {
        const vec8 av = load8(a + t);
        s0 += av * load8(b0 + t);
        s1 += av * load8(b1 + t);
        s2 += av * load8(b2 + t);
        s3 += av * load8(b3 + t);
      }
      v[k] += sum8(s0);
      v[k + 1] += sum8(s1);
      v[k + 2] += sum8(s2);
      v[k + 3] += sum8(s3);
    }
    for (; k < k_end; ++k) {
      const float* b = b_buf + int64_t(col[k]) * kTokens;
      vec8 s = {};
      for (int64_t t = 0; t < kTokens; t += 8) s += load8(a + t) * load8(b + t);
      v[k] += sum8(s);
    }
  }
}

template <typename scalar_t>
void sddmm_blocks(const scalar_t* dy, const scalar_t* x, int64_t tokens, int64_t out, int64_t in,
                  const int32_t* row, const int32_t* col, float* a, float* b, float* v) {
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
    const int64_t rows = std::min(kTokens, tokens - t0);
    transpose_parallel(dy + t0 * out, out, rows, out, a);
    transpose_parallel(x + t0 * in, in, rows, in, b);
    at::parallel_for(0, out, 32, [&](int64_t begin, int64_t end) {
      accumulate_rows(a, b, row, col, begin, end, v);
    });
  }
}

// Every position inside W, checked before anything is written (torch's index_copy_ checks too),
// so a bad position raises with W untouched instead of writing past it.
void check_positions(const torch::Tensor& positions, int64_t numel, const char* op) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t k = 0; k < positions.numel(); ++k)
    TORCH_CHECK(pos[k] >= 0 && pos[k] < numel, op, ": position ", pos[k],
                " is outside the weight (", numel, " entries)");
}

}  // namespace

// dy (T x out) and x (T x in), both fp32 or both bf16, contiguous; row_ptr (out + 1) and
// col_idx (nnz), int32. Returns the nnz values in fp32 (bf16 operands are widened exactly).
torch::Tensor sddmm(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& row_ptr,
                    const torch::Tensor& col_idx) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0),
              "sddmm: dy (T, out) and x (T, in) must share T");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() &&
                  (dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kBFloat16),
              "sddmm: dy and x must be both float32 or both bfloat16");
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "sddmm: dy and x must be contiguous");
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt,
              "sddmm: row_ptr and col_idx must be int32");
  TORCH_CHECK(row_ptr.numel() == dy.size(1) + 1, "sddmm: row_ptr must have out + 1 entries");
  const int64_t tokens = dy.size(0), out = dy.size(1), in = x.size(1);
  const auto rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const int32_t* row = rp.data_ptr<int32_t>();
  TORCH_CHECK(ci.numel() == row[out], "sddmm: col_idx must have row_ptr[-1] entries");
  const auto f32 = dy.options().dtype(at::kFloat);
  auto values = torch::zeros({ci.numel()}, f32);
  if (ci.numel() == 0 || tokens == 0) return values;
  auto a_buf = torch::empty({out * kTokens}, f32);
  auto b_buf = torch::empty({in * kTokens}, f32);
  float* a = a_buf.data_ptr<float>();
  float* b = b_buf.data_ptr<float>();
  float* v = values.data_ptr<float>();
  const int32_t* col = ci.data_ptr<int32_t>();
  if (dy.scalar_type() == at::kFloat) {
    sddmm_blocks(dy.data_ptr<float>(), x.data_ptr<float>(), tokens, out, in, row, col, a, b, v);
  } else {
    sddmm_blocks(dy.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), tokens, out, in, row,
                 col, a, b, v);
  }
  return values;
}

// S merged into W in place for one GEMM: saved[k] = W[p[k]], then W[p[k]] = W0 + S summed in
// fp32 and rounded once to W's dtype (as torch's index_select / index_copy_ path does), in one
// pass over the mask. Returns the saved W0 values for restore().
torch::Tensor merge_in_place(torch::Tensor& weight, const torch::Tensor& values,
                             const torch::Tensor& positions) {
  TORCH_CHECK(weight.is_contiguous(), "merge_in_place: weight must be contiguous");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(),
              "merge_in_place: values must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "merge_in_place: positions must be contiguous int64");
  TORCH_CHECK(values.numel() == positions.numel(), "merge_in_place: one value per position");
  check_positions(positions, weight.numel(), "merge_in_place");
  auto saved = torch::empty({positions.numel()}, weight.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  const int64_t n = positions.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "merge", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* out = saved.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (k + kPrefetch < end) __builtin_prefetch(w + pos[k + kPrefetch], 1);
        const scalar_t w0 = w[pos[k]];
        out[k] = w0;
        w[pos[k]] = static_cast<scalar_t>(static_cast<float>(w0) + v[k]);
      }
    });
  });
  return saved;
}

// W[p[k]] = saved[k] + S[k], summed in fp32 and rounded once to W's dtype: S merged again from
// the saved W0 after S changed (the bits merge_in_place gives), in one pass over the mask.
void write_merged(torch::Tensor& weight, const torch::Tensor& saved, const torch::Tensor& values,
                  const torch::Tensor& positions) {
  TORCH_CHECK(weight.is_contiguous() && saved.scalar_type() == weight.scalar_type(),
              "write_merged: weight must be contiguous and saved of its dtype");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(),
              "write_merged: values must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "write_merged: positions must be contiguous int64");
  TORCH_CHECK(values.numel() == positions.numel() && saved.numel() == positions.numel(),
              "write_merged: one value and one saved value per position");
  check_positions(positions, weight.numel(), "write_merged");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  const int64_t n = positions.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "write_merged",
                                  [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* w0 = saved.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (k + kPrefetch < end) __builtin_prefetch(w + pos[k + kPrefetch], 1);
        w[pos[k]] = static_cast<scalar_t>(static_cast<float>(w0[k]) + v[k]);
      }
    });
  });
}

// W[p[k]] = saved[k]: W0 back after the GEMM.
void restore(torch::Tensor& weight, const torch::Tensor& saved, const torch::Tensor& positions) {
  TORCH_CHECK(weight.is_contiguous() && saved.scalar_type() == weight.scalar_type(),
              "restore: weight must be contiguous and saved of its dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && saved.numel() == positions.numel(),
              "restore: one saved value per int64 position");
  check_positions(positions, weight.numel(), "restore");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t n = positions.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "restore", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* in = saved.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (k + kPrefetch < end) __builtin_prefetch(w + pos[k + kPrefetch], 1);
        w[pos[k]] = in[k];
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sddmm", &sddmm, "SDDMM of token-major operands at a CSR mask (fp32 or bf16 in, fp32 out)");
  m.def("merge_in_place", &merge_in_place, "W[p] += S in place, returning the old W[p]");
  m.def("write_merged", &write_merged, "W[p] = saved + S, S merged again from the saved W0");
  m.def("restore", &restore, "W[p] = saved");
}
