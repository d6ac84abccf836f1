// Fused float32 CPU kernels for the Wukong-Huahua UNet, run by MindSpore as AOT custom operators.
//
// Every exported function has MindSpore's AOT signature: `params` holds the inputs, then the output;
// all tensors are contiguous float32. Scalar settings (groups, eps, flags) come in a small float32
// tensor, the last input. Work is split over rows (or normalisation groups) between plain
// std::threads that exist for one call only, so no thread spins between calls and MindSpore's own
// thread pool keeps the cores. Inner loops are branch-free and written for GCC's vectoriser: the
// reductions keep `kLanes` partial results side by side.

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int64_t kMaxAlpha = 8;
constexpr int64_t kMinWorkPerThread = 32 * 1024;  // floats: below this a thread costs more than it saves

int worker_count() {
  static const int count = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return count;
}

// Calls fn(begin, end) on consecutive ranges of [0, units) from up to worker_count() threads (the
// caller runs the last range, and any range no thread could be started for); `work` is the number of
// floats touched per unit.
template <typename Fn>
void parallel_for(int64_t units, int64_t work, const Fn &fn) {
  if (units <= 0) return;
  int64_t threads = std::min<int64_t>(worker_count(), units);
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, units * work / kMinWorkPerThread));
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int64_t t = 0; t + 1 < threads; ++t) {
    const int64_t begin = units * t / threads;
    const int64_t end = units * (t + 1) / threads;
    try {
      pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    } catch (const std::system_error &) {
      fn(begin, end);
    }
  }
  fn(units * (threads - 1) / threads, units);
  for (auto &thread : pool) thread.join();
}

// Sixteen floats (GCC's vector extension: one AVX-512 register, two AVX ones, or plain code elsewhere)
// for the loops GCC does not vectorise by itself (the row maximum, the exp-and-sum of the softmax).
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));

inline vfloat splat(float value) { return vfloat{} + value; }

inline vfloat load(const float *p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float *p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline int32_t to_int(float v) { return static_cast<int32_t>(v); }
inline vint to_int(vfloat v) { return __builtin_convertvector(v, vint); }

inline float from_bits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline vfloat from_bits(vint bits) {
  vfloat value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// e^x (float or vfloat) with a relative error of about 1e-7: e^x = 2^n e^r, n = round(x / ln 2),
// r = x - n ln 2 with ln 2 split in two parts so n ln 2 is nearly exact, |r| <= ln(2) / 2, e^r by its
// Taylor series to degree 7 (truncation error < 6e-9). Inputs below -87.336 (results under the
// smallest normal float, -inf included) give 0; inputs above 88 are taken as 88 (e^88 = 1.65e38).
template <typename T>
inline T exp_fast(T x) {
  const T low = T{} + -87.336f;
  const T high = T{} + 88.0f;
  const T round = T{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  T xc = x < low ? low : x;
  xc = xc > high ? high : xc;
  const T n = (xc * 1.44269504088896341f + round) - round;
  T r = xc - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (the first part is exact)
  r = r + n * 2.12194440e-4f;
  T p = T{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const T scale = from_bits((to_int(n) + 127) << 23);
  return x < low ? T{} : p * scale;
}

// y * sigmoid(y) = y / (1 + e^-y).
inline float silu(float y) { return y / (1.0f + exp_fast(-y)); }

// The tanh approximation of GELU: 0.5 x (1 + tanh(z)) = x / (1 + e^(-2z)), z = sqrt(2/pi)(x + 0.044715 x^3).
inline float gelu_tanh(float x) {
  constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;
  const float two_z = x * (kTwoSqrt2OverPi + (0.044715f * kTwoSqrt2OverPi) * x * x);
  return x / (1.0f + exp_fast(-two_z));
}

// Sum of (v[i] + offset) over n floats, and sum of (v[i] + offset - mean)^2, both in double.
double sum_shifted(const float *v, int64_t n, float offset) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(v[i + k] + offset);
  }
  double total = 0.0;
  for (; i < n; ++i) total += static_cast<double>(v[i] + offset);
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

double sum_squares_centred(const float *v, int64_t n, float offset, double mean) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(v[i + k] + offset) - mean;
      acc[k] += d * d;
    }
  }
  double total = 0.0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(v[i] + offset) - mean;
    total += d * d;
  }
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

// The mean as a float pair (hi + lo): x - hi is exact for the values near the mean (Sterbenz), so a
// large mean with a small spread keeps its precision when subtracted in float.
struct SplitMean {
  float hi;
  float lo;
};

SplitMean split(double mean) {
  const float hi = static_cast<float>(mean);
  return {hi, static_cast<float>(mean - static_cast<double>(hi))};
}

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t count = 1;
  for (int i = 0; i < ndim; ++i) count *= shape[i];
  return count;
}

bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  }
  return true;
}

// y = ((x + bias[n, c]) - mean) * rstd * gamma[c] + beta[c] per (n, group), SiLU applied if asked.
int group_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias) {
  const int inputs = has_bias ? 5 : 4;
  if (nparam != inputs + 1 || ndims[0] < 2 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = has_bias ? static_cast<const float *>(params[1]) : nullptr;
  const float *gamma = static_cast<const float *>(params[inputs - 3]);
  const float *beta = static_cast<const float *>(params[inputs - 2]);
  const float *settings = static_cast<const float *>(params[inputs - 1]);
  float *y = static_cast<float *>(params[inputs]);
  const int64_t n = shapes[0][0];
  const int64_t c = shapes[0][1];
  const int64_t spatial = element_count(ndims[0] - 2, shapes[0] + 2);
  const int64_t groups = static_cast<int64_t>(settings[0]);
  const double eps = settings[1];
  const bool with_silu = settings[2] != 0.0f;
  if (groups <= 0 || c % groups != 0) return 1;
  if (has_bias && element_count(ndims[1], shapes[1]) != n * c) return 1;
  for (int i = inputs - 3; i < inputs - 1; ++i) {
    if (element_count(ndims[i], shapes[i]) != c) return 1;  // gamma, beta
  }
  const int64_t per_group = c / groups;
  const int64_t group_size = per_group * spatial;

  parallel_for(n * groups, group_size, [=](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t first_channel = (unit % groups) * per_group;
      const int64_t row = unit / groups;
      const float *channel_bias = has_bias ? bias + row * c + first_channel : nullptr;
      const float *gx = x + unit * group_size;
      float *gy = y + unit * group_size;
      double total = 0.0;
      for (int64_t ch = 0; ch < per_group; ++ch) {
        total += sum_shifted(gx + ch * spatial, spatial, has_bias ? channel_bias[ch] : 0.0f);
      }
      const double mean = total / static_cast<double>(group_size);
      double squares = 0.0;
      for (int64_t ch = 0; ch < per_group; ++ch) {
        squares += sum_squares_centred(gx + ch * spatial, spatial, has_bias ? channel_bias[ch] : 0.0f, mean);
      }
      const double rstd = 1.0 / std::sqrt(squares / static_cast<double>(group_size) + eps);
      const SplitMean m = split(mean);
      for (int64_t ch = 0; ch < per_group; ++ch) {
        const float offset = has_bias ? channel_bias[ch] : 0.0f;
        const float scale = static_cast<float>(rstd * gamma[first_channel + ch]);
        const float shift = beta[first_channel + ch];
        const float *cx = gx + ch * spatial;
        float *cy = gy + ch * spatial;
        if (with_silu) {
          for (int64_t i = 0; i < spatial; ++i) cy[i] = silu(((cx[i] + offset) - m.hi - m.lo) * scale + shift);
        } else {
          for (int64_t i = 0; i < spatial; ++i) cy[i] = ((cx[i] + offset) - m.hi - m.lo) * scale + shift;
        }
      }
    }
  });
  return 0;
}

// Softmax of one row of `width` floats from rx into ry (may be the same row).
void softmax_row(const float *rx, float *ry, int64_t width) {
  const int64_t full = width - width % kLanes;
  const int64_t rest = width - full;
  float tail[kLanes];  // the last width % 16 entries, padded with -inf (whose exp is 0)
  for (int k = 0; k < kLanes; ++k) tail[k] = k < rest ? rx[full + k] : -INFINITY;

  vfloat top = load(tail);
  for (int64_t i = 0; i < full; i += kLanes) {
    const vfloat v = load(rx + i);
    top = v > top ? v : top;
  }
  float peak = top[0];
  for (int k = 1; k < kLanes; ++k) peak = top[k] > peak ? top[k] : peak;
  peak = peak == -INFINITY ? 0.0f : peak;  // all -inf: every exp is 0 below

  const vfloat tail_exp = exp_fast(load(tail) - peak);
  vfloat sums = tail_exp;
  for (int64_t i = 0; i < full; i += kLanes) {
    const vfloat e = exp_fast(load(rx + i) - peak);
    store(ry + i, e);
    sums += e;
  }
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += sums[k];
  const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
  for (int64_t i = 0; i < full; i += kLanes) store(ry + i, load(ry + i) * inverse);
  for (int64_t k = 0; k < rest; ++k) ry[full + k] = tail_exp[k] * inverse;
}

// oneDNN's row-major sgemm (C = alpha A B + beta C), from the libdnnl that MindSpore itself loads: found
// at run time, so the library builds and its other kernels work without it (Attention then fails).
typedef int (*Sgemm)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                     int64_t, float, float *, int64_t);

Sgemm find_sgemm() {
  static const Sgemm sgemm = [] {
    void *symbol = dlsym(RTLD_DEFAULT, "dnnl_sgemm");
    if (symbol == nullptr) {  // loaded privately (RTLD_LOCAL) by MindSpore: ask that copy by name
      void *library = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_NOLOAD);
      if (library != nullptr) symbol = dlsym(library, "dnnl_sgemm");
    }
    return reinterpret_cast<Sgemm>(symbol);
  }();
  return sgemm;
}

constexpr int64_t kAttentionRows = 64;  // queries per block: their scores (64 x keys) stay in cache
// queries per block for heads wider than 256 (the VAE's one 512-wide head): their keys and values
// (width x keys each, 8 MiB at 64x64) do not stay in cache, so a block reuses them for more rows
constexpr int64_t kWideHeadRows = 512;

}  // namespace

extern "C" {

// x (n, c, ...), gamma (c), beta (c), settings (groups, eps, silu) -> y like x.
int GroupNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return group_norm(nparam, params, ndims, shapes, dtypes, false);
}

// x (n, c, ...), bias (n, c) added to x first, gamma, beta, settings -> y like x.
int GroupNormBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return group_norm(nparam, params, ndims, shapes, dtypes, true);
}

// x (..., c), gamma (c), beta (c), settings (eps) -> y like x, normalised over the last axis.
int LayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || ndims[0] < 1 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const double eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]);
  const int64_t width = shapes[0][ndims[0] - 1];
  if (element_count(ndims[1], shapes[1]) != width || element_count(ndims[2], shapes[2]) != width) return 1;
  if (width <= 0) return 0;
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;

  parallel_for(rows, width, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *rx = x + r * width;
      float *ry = y + r * width;
      const double mean = sum_shifted(rx, width, 0.0f) / static_cast<double>(width);
      const double var = sum_squares_centred(rx, width, 0.0f, mean) / static_cast<double>(width);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      const SplitMean m = split(mean);
      for (int64_t i = 0; i < width; ++i) ry[i] = (rx[i] - m.hi - m.lo) * rstd * gamma[i] + beta[i];
    }
  });
  return 0;
}

// x (..., m) -> softmax over the last axis. -inf entries give 0; a row of only -inf gives zeros.
int Softmax(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || ndims[0] < 1 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t width = shapes[0][ndims[0] - 1];
  if (width <= 0) return 0;
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;

  parallel_for(rows, width, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) softmax_row(x + r * width, y + r * width, width);
  });
  return 0;
}

// h (..., 2 * inner), bias (2 * inner) -> (..., inner): with u = h + bias,
// u[..., :inner] * gelu_tanh(u[..., inner:]).
int Geglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] < 1 || !all_float32(nparam, dtypes)) return 1;
  const float *h = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1];
  if (width % 2 != 0 || element_count(ndims[1], shapes[1]) != width) return 1;
  const int64_t inner = width / 2;
  if (inner == 0) return 0;
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;

  parallel_for(rows, 3 * inner, [=](int64_t begin, int64_t end) {
    const float *value_bias = bias;
    const float *gate_bias = bias + inner;
    for (int64_t r = begin; r < end; ++r) {
      const float *value = h + r * width;
      const float *gate = value + inner;
      float *out = y + r * inner;
      for (int64_t i = 0; i < inner; ++i) {
        out[i] = (value[i] + value_bias[i]) * gelu_tanh(gate[i] + gate_bias[i]);
      }
    }
  });
  return 0;
}

// Winograd F(m x m, 3x3) data transforms (see winograd.py), alpha = m + 2 <= kMaxAlpha.
// x (n, c, h, w), bt (alpha, alpha) = B^T -> v (alpha^2, c, n * rows * cols): the zero-padded
// alpha x alpha input tiles d (stride m, one row and column of padding) transformed to B^T d B.
// Per image, channel and tile row: first B^T along the rows (contiguous over the columns), then B
// along the columns (contiguous over the tiles).
int WinogradInput(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] != 4 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *bt = static_cast<const float *>(params[1]);
  float *v = static_cast<float *>(params[2]);
  const int64_t n = shapes[0][0], c = shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t alpha = shapes[1][0];
  if (alpha < 3 || alpha > kMaxAlpha || shapes[1][1] != alpha) return 1;
  const int64_t m = alpha - 2, rows = (h + m - 1) / m, cols = (w + m - 1) / m;
  const int64_t tiles = n * rows * cols, padded = cols * m + 2;
  if (n * c * h * w == 0) return 0;
  parallel_for(n * c, h * w * alpha * alpha / (m * m), [=](int64_t begin, int64_t end) {
    std::vector<float> line(alpha * padded), col(cols);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t image = plane / c, channel = plane % c;
      const float *source = x + plane * h * w;
      for (int64_t r = 0; r < rows; ++r) {
        std::fill(line.begin(), line.end(), 0.0f);
        for (int64_t i = 0; i < alpha; ++i) {  // line[i] = sum_k bt[i][k] * padded input row r*m + k
          float *out = line.data() + i * padded + 1;
          for (int64_t k = 0; k < alpha; ++k) {
            const int64_t y = r * m + k - 1;
            const float coefficient = bt[i * alpha + k];
            if (y < 0 || y >= h || coefficient == 0.0f) continue;
            const float *row = source + y * w;
            for (int64_t j = 0; j < w; ++j) out[j] += coefficient * row[j];
          }
        }
        const int64_t first = (image * rows + r) * cols;
        for (int64_t i = 0; i < alpha; ++i) {
          const float *in = line.data() + i * padded;
          for (int64_t j = 0; j < alpha; ++j) {  // v[i*alpha + j] = sum_k in[tile*m + k] * bt[j][k]
            std::fill(col.begin(), col.end(), 0.0f);
            for (int64_t k = 0; k < alpha; ++k) {
              const float coefficient = bt[j * alpha + k];
              if (coefficient == 0.0f) continue;
              for (int64_t t = 0; t < cols; ++t) col[t] += coefficient * in[t * m + k];
            }
            std::copy(col.begin(), col.end(), v + ((i * alpha + j) * c + channel) * tiles + first);
          }
        }
      }
    }
  });
  return 0;
}

// p (alpha^2, c, n * rows * cols) products, at (m, alpha) = A^T, bias (c), shape (n, 1, h, w) whose
// shape alone is read -> y (n, c, h, w): the m x m output tiles A^T P A plus the bias, cropped to h, w.
int WinogradOutput(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || ndims[0] != 3 || ndims[1] != 2 || ndims[3] != 4 || !all_float32(nparam, dtypes)) return 1;
  const float *p = static_cast<const float *>(params[0]);
  const float *at = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  const int64_t m = shapes[1][0], alpha = shapes[1][1];
  const int64_t n = shapes[3][0], h = shapes[3][2], w = shapes[3][3], c = shapes[0][1];
  const int64_t rows = (h + m - 1) / m, cols = (w + m - 1) / m, tiles = n * rows * cols;
  if (alpha != m + 2 || alpha > kMaxAlpha || shapes[0][0] != alpha * alpha || shapes[0][2] != tiles) return 1;
  if (element_count(ndims[2], shapes[2]) != c) return 1;
  if (n * c * h * w == 0) return 0;
  parallel_for(n * c, h * w * alpha * alpha / (m * m), [=](int64_t begin, int64_t end) {
    std::vector<float> half(alpha * m * cols), sum(cols);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t image = plane / c, channel = plane % c;
      float *target = y + plane * h * w;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t first = (image * rows + r) * cols;
        for (int64_t a = 0; a < alpha; ++a) {  // half[a][j] = sum_b p[a*alpha + b] * at[j][b]
          for (int64_t j = 0; j < m; ++j) {
            float *out = half.data() + (a * m + j) * cols;
            std::fill(out, out + cols, 0.0f);
            for (int64_t b = 0; b < alpha; ++b) {
              const float coefficient = at[j * alpha + b];
              if (coefficient == 0.0f) continue;
              const float *in = p + ((a * alpha + b) * c + channel) * tiles + first;
              for (int64_t t = 0; t < cols; ++t) out[t] += coefficient * in[t];
            }
          }
        }
        for (int64_t i = 0; i < m && r * m + i < h; ++i) {  // rows of y: sum_a at[i][a] * half[a]
          float *row = target + (r * m + i) * w;
          for (int64_t j = 0; j < m; ++j) {
            std::fill(sum.begin(), sum.end(), bias[channel]);
            for (int64_t a = 0; a < alpha; ++a) {
              const float coefficient = at[i * alpha + a];
              if (coefficient == 0.0f) continue;
              const float *in = half.data() + (a * m + j) * cols;
              for (int64_t t = 0; t < cols; ++t) sum[t] += coefficient * in[t];
            }
            for (int64_t t = 0; t < cols && t * m + j < w; ++t) row[t * m + j] = sum[t];
          }
        }
      }
    }
  });
  return 0;
}

// q (b, n, width), k and v (b, m, width), settings (scale, heads) -> (b, n, width): softmax(scale q k^T) v
// of every head (width / heads columns each), read and written in place in the token layout, so no
// head is split out or merged back by a copy. Per head and block of kAttentionRows queries: the scores
// by oneDNN's sgemm into a per-thread block that stays in cache, the softmax in place, the product
// with v by sgemm; no score matrix is kept.
int AttentionTokens(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                    void *) {
  if (nparam != 5 || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] != 1 ||
      shapes[3][0] != 2 || !all_float32(nparam, dtypes)) {
    return 1;
  }
  const Sgemm sgemm = find_sgemm();
  if (sgemm == nullptr) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *settings = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  const float scale = settings[0];
  const int64_t heads = static_cast<int64_t>(settings[1]);
  const int64_t batch = shapes[0][0], n = shapes[0][1], width = shapes[0][2], m = shapes[1][1];
  if (heads < 1 || width % heads != 0 || shapes[1][0] != batch || shapes[1][2] != width ||
      shapes[2][0] != batch || shapes[2][1] != m || shapes[2][2] != width) {
    return 1;
  }
  if (batch * n * width == 0) return 0;
  if (m == 0) {
    std::fill(out, out + batch * n * width, 0.0f);
    return 0;
  }
  const int64_t d = width / heads, block_rows = d > 256 ? kWideHeadRows : kAttentionRows;
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  // units: per image and head, the query blocks in as many parts as keep every thread busy
  const int64_t parts = std::clamp<int64_t>(2 * worker_count() / (batch * heads), 1, blocks);
  std::atomic<bool> failed{false};
  // per unit: the head's keys copied once into a transposed (d, m) block, which the score products
  // read faster than the strided keys, then the unit's queries in blocks of kAttentionRows
  parallel_for(batch * heads * parts, n * m * 2 / parts, [=, &failed](int64_t begin, int64_t end) {
    std::vector<float> scores(block_rows * m), keys(d * m);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t image = unit / (heads * parts), column = (unit / parts % heads) * d;
      const int64_t part = unit % parts;
      const float *kb = k + image * m * width + column;
      for (int64_t j = 0; j < m; ++j) {
        for (int64_t c = 0; c < d; ++c) keys[c * m + j] = kb[j * width + c];
      }
      const float *vb = v + image * m * width + column;
      for (int64_t block = blocks * part / parts; block < blocks * (part + 1) / parts; ++block) {
        const int64_t first = block * block_rows, rows = std::min(block_rows, n - first);
        const float *qb = q + (image * n + first) * width + column;
        if (sgemm('N', 'N', rows, m, d, scale, qb, width, keys.data(), m, 0.0f, scores.data(), m) != 0) {
          failed = true;
          return;
        }
        for (int64_t r = 0; r < rows; ++r) softmax_row(scores.data() + r * m, scores.data() + r * m, m);
        float *ob = out + (image * n + first) * width + column;
        if (sgemm('N', 'N', rows, d, m, 1.0f, scores.data(), m, vb, width, 0.0f, ob, width) != 0) {
          failed = true;
          return;
        }
      }
    }
  });
  return failed ? 1 : 0;
}

}  // extern "C"
