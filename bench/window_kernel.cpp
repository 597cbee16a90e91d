// A hand-written exact-window kernel, for bench/window_kernel.py (issue 25): would scoring each target's window
// and little more, in AVX2 micro-tiles, beat stt.propagation's tile kernel on this CPU? Not part of the package.
//
// The tile kernel's batched matmuls score each target against its whole tile's (t + 2R)^2 patch (2.17x the
// window's products over DAVIS val at 480p, radius 12). Here a micro-tile of G = 6 consecutive targets of one
// row is scored against blocks of 16 consecutive context cells of one context row, channel by channel: 12 vector
// accumulators, two vector loads and six broadcasts per channel, as a matrix-product micro-kernel does. The
// G targets' windows in that row span G - 1 + D cells, so ceil((G - 1 + D) / 16) blocks cover them: at
// D = 25 two blocks, 6 x 32 products for the 6 x 25 needed (1.28x); window rows off the grid are skipped. Each
// logit is one dot product over the channels in channel order, with fused multiply-adds, so the logits are the
// bits of stt.propagation.kernels.window_logits_by_shift's (checked by the bench).
//
// Layouts (the bench's `kernel_layouts`): context frames n x h x C x (16 + w + 16), each row's channels
// together with 16 zero columns either side; query h x ceil(w / G) x C x G, each micro-tile's targets packed.
// Items are (context frame, context row), each scored by every target row of the call whose window reaches it,
// so a context row is read from memory once per call; channels go in slices that stay in L1 along the row.
// Shapes: n context frames, C channels, h x w grid, r = y1 - y0 target rows, R the reach, D = 2R + 1.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float vec8 __attribute__((vector_size(32)));
constexpr int64_t kTargets = 6;         // G: targets per micro-tile
constexpr int64_t kBlock = 16;          // context cells per block: two vectors
constexpr int64_t kChannelSlice = 128;  // channels per slice: measured best of 32, 64, 128, 256 at C = 256

inline vec8 load(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec8 v) { std::memcpy(p, &v, sizeof v); }

// sums[i][l] += sum over channels k of q[k][i] * ctx[k][l] (i < G, l < 16; from 0 unless `accumulate`); q and
// ctx advance by their channel strides. The fixed trip counts keep all 12 accumulators in registers, and
// continuing from the stored sums gives the bits of one unbroken channel-order sum.
inline void micro_tile(const float* __restrict q, int64_t q_channel, const float* __restrict ctx, int64_t ctx_channel,
                       int64_t channels, float* __restrict sums, bool accumulate) {
  vec8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {};
  vec8 b0 = {}, b1 = {}, b2 = {}, b3 = {}, b4 = {}, b5 = {};
  if (accumulate) {
    a0 = load(sums + 0), b0 = load(sums + 8), a1 = load(sums + 16), b1 = load(sums + 24);
    a2 = load(sums + 32), b2 = load(sums + 40), a3 = load(sums + 48), b3 = load(sums + 56);
    a4 = load(sums + 64), b4 = load(sums + 72), a5 = load(sums + 80), b5 = load(sums + 88);
  }
  for (int64_t k = 0; k < channels; ++k, q += q_channel, ctx += ctx_channel) {
    const vec8 lo = load(ctx), hi = load(ctx + 8);
    a0 += q[0] * lo, b0 += q[0] * hi;
    a1 += q[1] * lo, b1 += q[1] * hi;
    a2 += q[2] * lo, b2 += q[2] * hi;
    a3 += q[3] * lo, b3 += q[3] * hi;
    a4 += q[4] * lo, b4 += q[4] * hi;
    a5 += q[5] * lo, b5 += q[5] * hi;
  }
  store(sums + 0, a0), store(sums + 8, b0), store(sums + 16, a1), store(sums + 24, b1);
  store(sums + 32, a2), store(sums + 40, b2), store(sums + 48, a3), store(sums + 56, b3);
  store(sums + 64, a4), store(sums + 72, b4), store(sums + 80, a5), store(sums + 88, b5);
}

struct Row {
  const float* data;  // column 0 of channel 0
  int64_t channel;    // stride between channels
};

// out[x][dx] (x < w, dx < D, target stride `stride`) = q[:, x] . ctx[:, x + dx - R], 0 where x + dx - R is off
// the row. q's micro-tiles lie `q_group` floats apart; ctx reads up to 16 columns either side of the row and q up
// to G - 1 targets past it (zeros: `window_logits`). `sums` holds ceil(w / G) * blocks micro-tiles' sums.
void score_row(Row q, int64_t q_group, Row ctx, int64_t channels, int64_t w, int64_t reach, int64_t size, float* out,
               int64_t stride, float* sums) {
  const int64_t blocks = (kTargets - 1 + size + kBlock - 1) / kBlock, tile = kTargets * kBlock;
  const int64_t groups = (w + kTargets - 1) / kTargets;
  // Channels in slices whose rows stay in L1 across the sweep along the row (the neighbouring micro-tiles
  // share most of their cells); each slice continues the sums of the one before.
  for (int64_t k0 = 0; k0 < channels; k0 += kChannelSlice) {
    const int64_t slice = std::min(kChannelSlice, channels - k0);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t b = 0; b < blocks; ++b) {
        float* tile_sums = sums + (g * blocks + b) * tile;
        const int64_t j0 = g * kTargets - reach + b * kBlock;  // the block's first context column
        if (j0 + kBlock <= 0 || j0 >= w) {                      // wholly off the row: its products are 0
          if (k0 == 0) std::fill(tile_sums, tile_sums + tile, 0.0f);
        } else {
          micro_tile(q.data + k0 * q.channel + g * q_group, q.channel, ctx.data + k0 * ctx.channel + j0, ctx.channel,
                     slice, tile_sums, k0 > 0);
        }
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* tile_sums = sums + (g * blocks + b) * tile;
      for (int64_t i = 0, x = g * kTargets; i < kTargets && x < w; ++i, ++x) {
        // lane l holds context column j0 + l, offset dx = j0 + l - x + R = b * 16 + l - i
        const int64_t first = std::max<int64_t>(0, i - b * kBlock), last = std::min(kBlock, size + i - b * kBlock);
        if (last > first)
          std::memcpy(out + x * stride + b * kBlock + first - i, tile_sums + i * kBlock + first,
                      (last - first) * sizeof(float));
      }
    }
  }
}

}  // namespace

// context: n x C x h x (16 + w + 16), the frames with 16 zero columns either side (any strides but a unit column
// stride); query: h x ceil(w / G) x C x G, [y, g, k, i] = target (y, g * G + i)'s channel k, zeros past column w;
// out: n x r x w x D x D (contiguous), filled with
// out[f, y - y0, x, dy, dx] = target (y, x) . context[f, :, y + dy - R, 16 + x + dx - R], 0 off the grid.
void window_logits(const torch::Tensor& context, const torch::Tensor& query, int64_t y0, int64_t y1, int64_t reach,
                   torch::Tensor& out) {
  TORCH_CHECK(context.dim() == 4 && query.dim() == 4 && context.size(1) == query.size(2) &&
                  context.size(2) == query.size(0) && query.size(3) == kTargets,
              "window_logits: expected context n x C x h x (w + 32) and query h x ceil(w / G) x C x G");
  TORCH_CHECK(context.scalar_type() == torch::kFloat && query.scalar_type() == torch::kFloat &&
                  out.scalar_type() == torch::kFloat,
              "window_logits: expected float32 tensors");
  TORCH_CHECK(context.stride(3) == 1 && query.stride(3) == 1 && out.is_contiguous(),
              "window_logits: expected unit column strides and a contiguous out");
  const int64_t n = context.size(0), channels = context.size(1), h = context.size(2), w = context.size(3) - 2 * kBlock;
  const int64_t rows = y1 - y0, size = 2 * reach + 1, blocks = (kTargets - 1 + size + kBlock - 1) / kBlock;
  const int64_t groups = (w + kTargets - 1) / kTargets;
  TORCH_CHECK(w > 0 && query.size(1) == groups, "window_logits: expected query h x ceil(w / G) x C x G");
  TORCH_CHECK(0 <= y0 && y0 < y1 && y1 <= h && reach >= 0, "window_logits: expected 0 <= y0 < y1 <= h, reach >= 0");
  TORCH_CHECK(out.numel() == n * rows * w * size * size, "window_logits: out must hold n x r x w x D x D");
  const float* ctx = context.data_ptr<float>() + kBlock;  // column 0 of the grid
  const float* q = query.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t stride = size * size;
  // One item per context frame and row: the target rows whose windows reach that row score against it in
  // turn, so each context row comes from memory once per call.
  const int64_t top = std::max<int64_t>(0, y0 - reach), bottom = std::min(h, y1 + reach), reached = bottom - top;
  for (int64_t f = 0; f < n; ++f)  // the window rows off the grid
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t dy = 0; dy < size; ++dy)
        if (y + dy - reach < 0 || y + dy - reach >= h) {
          float* dst = o + (f * rows + y - y0) * w * stride + dy * size;
          for (int64_t x = 0; x < w; ++x) std::memset(dst + x * stride, 0, size * sizeof(float));
        }
  at::parallel_for(0, n * reached, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(groups * blocks * kTargets * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t f = item / reached, yc = top + item % reached;
      const Row source{ctx + f * context.stride(0) + yc * context.stride(2), context.stride(1)};
      for (int64_t y = std::max(y0, yc - reach); y < std::min(y1, yc + reach + 1); ++y) {
        const Row target{q + y * query.stride(0), query.stride(2)};
        float* dst = o + (f * rows + y - y0) * w * stride + (yc - y + reach) * size;
        score_row(target, query.stride(1), source, channels, w, reach, size, dst, stride, sums.data());
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("window_logits", &window_logits, "exact-window logits"); }
