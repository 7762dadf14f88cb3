// The vggfast planner: plain C++17, no torch and no CUDA. Structs in, plan out.
//
// Given the network's layer list (from vggfast/configs.py's Table 1), a request (image sizes,
// scales, flips, dense and/or multi-crop views), an element size and an activation memory budget,
// make_plan() returns everything the executor needs to run the request as few, full batches:
//
//   views    one per network input: (image, scale Q, flip, crop box or none, input h x w). The
//            isotropic rescale is the one vggfast/preprocess.py applies (rescaled_size below).
//   shapes   per distinct input size, every layer's output size (pool floor semantics, fc6 as a
//            valid grid x grid convolution).
//   batches  views of identical input size grouped into buckets; a bucket is split into
//            near-equal batches (sizes differ by at most one) that each fit the budget. Batches
//            are ordered by work, largest first.
//   ops      the launch list (conv/fc with fused ReLU and pool, LRN, pool), the same for every
//            batch, with a kernel configuration id per op from a table passed in.
//   arenas   one per batch shape (n, h, w): every tensor the forward touches, with its lifetime
//            in op steps and its byte offset in a single buffer. Tensors live at the same time
//            never share bytes; the size reaches the lower bound (the most bytes live at one
//            step) for a plain chain: greedy by size, else ping-pong from both ends; with kept
//            taps the smallest of those and two more greedy orders.
//   key      a hash of the request's structure: equal keys mean equal plans.
//
// Errors a user can cause are thrown as ArgumentError (a view smaller than the network's native
// size, a bad method...) or BudgetError (a single view whose activations exceed the budget,
// or, for multi-crop, a rescaled image (float32) that alone does).
// Their what() is one line that names the limit and how to raise it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace vggfast {

// One weight layer as configs.Layer describes it: "conv" (features) or "fc" (fc6 is a k x k
// valid convolution when applied densely, fc7/fc8 are 1x1). relu, lrn and a 2x2 stride-2 max-pool
// follow in that order. Convolutions have stride 1.
struct LayerDesc {
    std::string name;
    std::string kind;  // "conv" | "fc"
    int64_t cin = 0, cout = 0, k = 1, pad = 0;
    bool relu = false, lrn = false, pool = false;
};

// What to run. images are (height, width) of the decoded images, before any rescale.
// method: "dense" (the whole rescaled image, Sec. 3.2), "multicrop" (per scale a grid x grid
// regular grid of crop x crop crops), or "dense+multicrop" (both). crop = 0 means the network's
// native size. With flip, each view is also run mirrored (for crops: crop, then mirror).
struct Request {
    std::vector<std::pair<int64_t, int64_t>> images;
    std::vector<int64_t> scales;
    bool flip = true;
    std::string method = "dense";
    int64_t crop = 0;
    int64_t grid = 5;
};

// How to plan. budget: bytes one batch's activation arena may use. elem_size: bytes per
// activation element (2 for bf16/fp16, 4 for fp32). align: every tensor starts at a multiple of
// it. max_batch: cap on views per batch (0 = no cap). fuse_pool: the conv kernel's epilogue does
// the 2x2 max-pool (no pre-pool tensor; never across an LRN). keep: tensor names (see Arena)
// that must stay readable until the end of the batch (feature taps). kernel_table: shape-class
// key -> kernel configuration id (see Op).
struct Options {
    int64_t native_size = 224;
    int64_t elem_size = 2;
    int64_t budget = int64_t(4) << 30;
    int64_t align = 256;
    int64_t max_batch = 0;
    bool fuse_pool = true;
    std::vector<std::string> keep;
    std::vector<std::pair<std::string, int64_t>> kernel_table;
};

// One network input. (x0, y0, x1, y1) is the crop box in the rescaled, unflipped image
// (half-open); for a dense view it is the whole rescaled image and cropped is false.
struct View {
    int64_t image = 0, scale = 0;
    bool flip = false, cropped = false;
    int64_t x0 = 0, y0 = 0, x1 = 0, y1 = 0;
    int64_t rescaled_h = 0, rescaled_w = 0;  // the image after the isotropic rescale
    int64_t height = 0, width = 0;           // the network input
    int64_t shape = 0;                       // index into Plan::shapes
    int64_t batch = -1, slot = -1;           // which batch, which position in it
};

// Output of one layer for one input size: the convolution's output (conv_h x conv_w, after
// ReLU) and the layer's final output (out_h x out_w, after LRN and pool).
struct LayerShape {
    std::string name;
    int64_t channels = 0, conv_h = 0, conv_w = 0, out_h = 0, out_w = 0;
};

struct ShapeInfo {
    int64_t height = 0, width = 0;
    std::vector<LayerShape> layers;
    int64_t out_h = 0, out_w = 0;  // the last layer's output (the class score map)
};

// One tensor of a batch's forward, NHWC, elem_size bytes per element: it occupies
// [offset, offset + bytes) of the arena from op step `first` (written) to `last` (last read),
// inclusive. Step 0 is the executor filling "input"; op i runs at step i + 1; the final output
// and kept tensors stay live one step past the last op (the executor reads them).
// Names: "input"; "<layer>" for a conv's output (after ReLU); "<layer>/lrn"; "<layer>/pool".
struct Tensor {
    std::string name;
    int64_t n = 0, c = 0, h = 0, w = 0;
    int64_t bytes = 0, offset = 0, first = 0, last = 0;
};

// One kernel launch. kind: "conv" or "fc" (convolution + bias [+ ReLU] [+ fused 2x2 max-pool]),
// "lrn", "pool". input/output index Arena::tensors: the launch list depends only on the network
// and the options, so a plan holds one (Plan::ops) that matches the tensor list of every arena
// (tensor 0 is the input, op i writes tensor i + 1). config: the kernel configuration id from the
// table for the most specific matching key (config_key), -1 when no key matches. Keys tried,
// most specific first, for a 3x3 conv 64->128 with a fused pool: "conv3x3:64->128+pool",
// "conv3x3:64->128", "conv3x3+pool", "conv3x3", "conv"; for fc6 on a 7x7 grid:
// "fc7x7:512->4096", "fc7x7", "fc"; "lrn"; "pool".
struct Op {
    std::string kind;
    int64_t layer = 0, input = 0, output = 0;
    bool relu = false, pool = false;
    int64_t config = -1;
    std::string config_key;
};

struct Arena {
    int64_t n = 0, height = 0, width = 0;
    std::vector<Tensor> tensors;
    int64_t total_bytes = 0;        // the arena's size (offsets + sizes never pass it)
    int64_t lower_bound_bytes = 0;  // the most bytes live at one step: no layout can do better
    int64_t naive_bytes = 0;        // every tensor its own buffer
    std::string strategy;           // which layout won
    double flops = 0;               // multiply-adds x 2 of the whole batch
};

struct Batch {
    int64_t height = 0, width = 0;
    std::vector<int64_t> views;  // indices into Plan::views, in slot order
    int64_t arena = 0;           // index into Plan::arenas
};

struct Plan {
    std::string key;
    std::vector<View> views;
    std::vector<ShapeInfo> shapes;
    std::vector<Batch> batches;  // largest work first
    std::vector<Arena> arenas;
    std::vector<Op> ops;      // the launch list of every batch
    int64_t peak_bytes = 0;   // the largest arena: one buffer of this size serves every batch
    int64_t naive_bytes = 0;  // the largest no-reuse sum over batches
    int64_t budget_bytes = 0, elem_size = 0;
};

// An error about the request; one about a single image of it also carries that image's index in
// the request and the words after "image K " (Python re-names the image, e.g. by its file).
class PlanError : public std::runtime_error {
  public:
    explicit PlanError(const std::string& what) : std::runtime_error(what) {}
    PlanError(int64_t image, const std::string& reason)
        : std::runtime_error("image " + std::to_string(image) + " " + reason),
          image_(image), reason_(reason) {}
    int64_t image() const { return image_; }  // -1: not about one image
    const std::string& reason() const { return reason_; }

  private:
    int64_t image_ = -1;
    std::string reason_;
};
class ArgumentError : public PlanError {
  public:
    using PlanError::PlanError;
};
class BudgetError : public PlanError {
  public:
    using PlanError::PlanError;
};

// Size after the isotropic rescale that makes the smallest side q: if h <= w, (q, (q*w) // h),
// else ((q*h) // w, q). An image whose short side is already q keeps its size. h, w, q are
// 1..2^31-1, as a request's.
std::pair<int64_t, int64_t> rescaled_size(int64_t h, int64_t w, int64_t q);

// Origins of n crops of side `crop` evenly over a side of length `size`:
// (i * (size - crop)) // (n - 1) for i = 0..n-1, exact at any size; the centre
// (size - crop) // 2 when n == 1. n is 1..64, as a multi-crop grid.
std::vector<int64_t> crop_origins(int64_t size, int64_t crop, int64_t n);

// Per-layer output sizes of an h x w input; ArgumentError when a layer would produce nothing.
ShapeInfo infer_shapes(const std::vector<LayerDesc>& layers, int64_t h, int64_t w);

// The launch list of the network under `opt` (fused pools, LRN, kernel configurations).
std::vector<Op> build_ops(const std::vector<LayerDesc>& layers, const Options& opt);

// The tensors (sizes, lifetimes, byte offsets) of one batch of n views of h x w.
Arena layout_arena(const std::vector<LayerDesc>& layers, int64_t n, int64_t h, int64_t w,
                   const Options& opt);

// 16 hex digits identifying (layers, request, options): equal keys, equal plans.
std::string plan_key(const std::vector<LayerDesc>& layers, const Request& req, const Options& opt);

Plan make_plan(const std::vector<LayerDesc>& layers, const Request& req, const Options& opt);

}  // namespace vggfast
