// The vggfast planner; see plan.hpp for what a plan holds.
#include "plan.hpp"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <sstream>
#include <tuple>
#include <unordered_map>

namespace vggfast {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
// Sides beyond this are refused outright: their products could not be represented anyway.
constexpr int64_t kMaxSide = (int64_t(1) << 31) - 1;
// Crops per side of a multi-crop grid (and per call of crop_origins): a grid is a handful.
constexpr int64_t kMaxGrid = 64;
// Sides infer_shapes takes: a rescaled image is at most kMaxSide * kMaxSide wide, and a layer's
// h + 2 * pad must not overflow.
constexpr int64_t kMaxInferSide = kMaxSide * kMaxSide;
// Bytes per element of a rescaled image (float32, vggfast/preprocess.py's resize_short).
constexpr int64_t kRescaleElemSize = 4;

// a * b, saturating at kMax (operands are non-negative): an overflowing size is simply "too big".
int64_t mul_sat(int64_t a, int64_t b) {
    if (a == 0 || b == 0) return 0;
    if (a > kMax / b) return kMax;
    return a * b;
}

int64_t add_sat(int64_t a, int64_t b) { return a > kMax - b ? kMax : a + b; }

int64_t align_up(int64_t x, int64_t a) {
    if (x > kMax - (a - 1)) return kMax;
    return (x + a - 1) / a * a;
}

std::string fmt_bytes(int64_t b) {
    char buf[64];
    double v = double(b);
    if (v >= double(int64_t(1) << 60))
        std::snprintf(buf, sizeof buf, "%.2f EiB", v / double(int64_t(1) << 60));
    else if (v >= double(int64_t(1) << 30))
        std::snprintf(buf, sizeof buf, "%.2f GiB", v / double(int64_t(1) << 30));
    else if (v >= double(1 << 20))
        std::snprintf(buf, sizeof buf, "%.1f MiB", v / double(1 << 20));
    else
        std::snprintf(buf, sizeof buf, "%lld bytes", static_cast<long long>(b));
    return buf;
}

std::string size_str(int64_t h, int64_t w) { return std::to_string(h) + "x" + std::to_string(w); }

bool has_dense(const std::string& m) { return m == "dense" || m == "dense+multicrop"; }
bool has_crops(const std::string& m) { return m == "multicrop" || m == "dense+multicrop"; }

void check_layers(const std::vector<LayerDesc>& layers) {
    if (layers.empty()) throw ArgumentError("the network has no layers");
    for (size_t i = 0; i < layers.size(); ++i) {
        const LayerDesc& l = layers[i];
        if (l.kind != "conv" && l.kind != "fc")
            throw ArgumentError("layer " + l.name + ": kind must be 'conv' or 'fc', not '" + l.kind +
                                "'");
        // Bounded so that h + 2 * pad and k * k (shapes, flops) cannot overflow int64.
        if (l.cin < 1 || l.cout < 1 || l.k < 1 || l.pad < 0 || l.cin > kMaxSide ||
            l.cout > kMaxSide || l.k > kMaxSide || l.pad > kMaxSide)
            throw ArgumentError("layer " + l.name + ": channels and kernel size must be 1.." +
                                std::to_string(kMaxSide) + " and padding 0.." +
                                std::to_string(kMaxSide));
        if (i > 0 && l.cin != layers[i - 1].cout)
            throw ArgumentError("layer " + l.name + " reads " + std::to_string(l.cin) +
                                " channels but " + layers[i - 1].name + " writes " +
                                std::to_string(layers[i - 1].cout));
    }
}

void check_options(const Options& opt) {
    if (opt.native_size < 1) throw ArgumentError("native size must be positive");
    if (opt.elem_size < 1 || opt.elem_size > 16)
        throw ArgumentError("element size must be 1..16 bytes, not " +
                            std::to_string(opt.elem_size));
    if (opt.budget < 1)
        throw ArgumentError("memory budget must be a positive number of bytes, not " +
                            std::to_string(opt.budget));
    if (opt.align < 1 || (opt.align & (opt.align - 1)))
        throw ArgumentError("alignment must be a power of two, not " + std::to_string(opt.align));
    if (opt.max_batch < 0)
        throw ArgumentError("max_batch must be 0 (no cap) or positive, not " +
                            std::to_string(opt.max_batch));
}

void check_request(const Request& req, const Options& opt) {
    if (req.images.empty()) throw ArgumentError("no images to plan");
    if (req.scales.empty()) throw ArgumentError("no scales given; pass at least one, e.g. (384,)");
    if (!has_dense(req.method) && !has_crops(req.method))
        throw ArgumentError("unknown method '" + req.method +
                            "'; use 'dense', 'multicrop' or 'dense+multicrop'");
    for (size_t i = 0; i < req.images.size(); ++i) {
        auto [h, w] = req.images[i];
        if (h < 1 || w < 1 || h > kMaxSide || w > kMaxSide)
            throw ArgumentError(int64_t(i), "(" + size_str(h, w) + ", HxW) is out of range: both "
                                "sides must be 1.." + std::to_string(kMaxSide));
    }
    for (int64_t q : req.scales) {
        if (q < opt.native_size)
            throw ArgumentError("scale " + std::to_string(q) +
                                " is below the network's native size " +
                                std::to_string(opt.native_size) + "; use scales >= " +
                                std::to_string(opt.native_size));
        if (q > kMaxSide)
            throw ArgumentError("scale " + std::to_string(q) + " is out of range (at most " +
                                std::to_string(kMaxSide) + ")");
    }
    if (has_crops(req.method)) {
        int64_t crop = req.crop ? req.crop : opt.native_size;
        if (crop < opt.native_size)
            throw ArgumentError("crop size " + std::to_string(crop) +
                                " is below the network's native size " +
                                std::to_string(opt.native_size) + "; use crop >= " +
                                std::to_string(opt.native_size));
        if (req.grid < 1 || req.grid > kMaxGrid)
            throw ArgumentError("multi-crop grid must be 1.." + std::to_string(kMaxGrid) +
                                " crops per side, not " +
                                std::to_string(req.grid));
        for (int64_t q : req.scales)
            if (q < crop)
                throw ArgumentError("scale " + std::to_string(q) + " is smaller than the crop size " +
                                    std::to_string(crop) + " of multi-crop; use scales >= " +
                                    std::to_string(crop));
    }
}

// FNV-1a, 64 bit: stable across runs and platforms (std::hash is neither).
uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) {
        h ^= c;
        h *= 1099511628211ull;
    }
    return h;
}

// Configuration lookup: the most specific shape-class key present in the table wins.
struct KernelTable {
    std::unordered_map<std::string, int64_t> map;
    explicit KernelTable(const std::vector<std::pair<std::string, int64_t>>& t) {
        for (const auto& [k, v] : t) map.emplace(k, v);
    }
    void choose(Op& op, const LayerDesc& l) const {
        std::vector<std::string> keys;
        if (op.kind == "conv" || op.kind == "fc") {
            std::string base = op.kind + std::to_string(l.k) + "x" + std::to_string(l.k);
            std::string chans = ":" + std::to_string(l.cin) + "->" + std::to_string(l.cout);
            if (op.pool) keys.push_back(base + chans + "+pool");
            keys.push_back(base + chans);
            if (op.pool) keys.push_back(base + "+pool");
            keys.push_back(base);
            keys.push_back(op.kind);
        } else {
            keys.push_back(op.kind);
        }
        for (const auto& k : keys) {
            auto it = map.find(k);
            if (it != map.end()) {
                op.config = it->second;
                op.config_key = k;
                return;
            }
        }
        op.config = -1;
        op.config_key.clear();
    }
};

// What the layout needs of a tensor; plain numbers, so trying several layouts stays cheap.
struct Block {
    int64_t bytes, first, last, offset;
};

bool live_together(const Block& a, const Block& b) { return a.first <= b.last && b.first <= a.last; }

bool bytes_overlap(const Block& a, const Block& b) {
    return a.offset < add_sat(b.offset, b.bytes) && b.offset < add_sat(a.offset, a.bytes);
}

int64_t layout_total(const std::vector<Block>& bs) {
    int64_t t = 0;
    for (const Block& b : bs) t = std::max(t, add_sat(b.offset, b.bytes));
    return t;
}

bool layout_valid(const std::vector<Block>& bs) {
    for (size_t i = 0; i < bs.size(); ++i)
        for (size_t j = i + 1; j < bs.size(); ++j)
            if (live_together(bs[i], bs[j]) && bytes_overlap(bs[i], bs[j])) return false;
    return true;
}

// Place blocks one by one in `order`; each goes into a gap between the byte ranges of the
// already placed blocks it is live with (best fit: the smallest gap that holds it; first fit:
// the lowest), or above them all.
void place(std::vector<Block>& bs, const std::vector<size_t>& order, bool best_fit) {
    std::vector<size_t> placed;
    std::vector<const Block*> conflicts;
    placed.reserve(bs.size());
    conflicts.reserve(bs.size());
    for (size_t t : order) {
        Block& x = bs[t];
        conflicts.clear();
        for (size_t p : placed)
            if (live_together(x, bs[p])) conflicts.push_back(&bs[p]);
        std::sort(conflicts.begin(), conflicts.end(),
                  [](const Block* a, const Block* b) { return a->offset < b->offset; });
        int64_t cur = 0, best = -1, best_gap = kMax;
        for (const Block* c : conflicts) {
            if (c->offset > cur) {
                int64_t gap = c->offset - cur;
                if (gap >= x.bytes && gap < best_gap) {
                    best = cur;
                    best_gap = gap;
                    if (!best_fit) break;
                }
            }
            cur = std::max(cur, add_sat(c->offset, c->bytes));
        }
        x.offset = best >= 0 ? best : cur;
        placed.push_back(t);
    }
}

// Offsets for every tensor. No layout can use fewer bytes than the most that are live at one
// step (the lower bound), so the first layout that reaches it wins:
//   1. greedy by size, best fit (the usual winner);
//   2. ping-pong from both ends of a lower-bound-sized buffer: even tensors at the bottom, odd
//      ones flush with the top; when every tensor is live only with its neighbours (a plain
//      chain) two neighbours never meet, so this always reaches the bound;
//   3. kept taps break that, so then also greedy by first use (first fit) and by lifetime (best
//      fit, long-lived tensors at the bottom), and the smallest layout is taken.
void assign_offsets(Arena& a) {
    std::vector<Block> blocks;
    blocks.reserve(a.tensors.size());
    for (const Tensor& t : a.tensors) blocks.push_back({t.bytes, t.first, t.last, 0});
    const size_t count = blocks.size();
    const int64_t bound = a.lower_bound_bytes;

    std::vector<Block> best;
    int64_t best_total = kMax;
    auto consider = [&](std::vector<Block>& cand, const char* name) {
        int64_t total = layout_total(cand);
        if ((best.empty() || total < best_total) && layout_valid(cand)) {
            best_total = total;
            best.swap(cand);
            a.strategy = name;
        }
        return best_total <= bound;
    };
    std::vector<size_t> order(count);
    for (size_t i = 0; i < count; ++i) order[i] = i;
    auto greedy = [&](auto less, bool best_fit, const char* name) {
        std::stable_sort(order.begin(), order.end(), less);
        std::vector<Block> cand = blocks;
        place(cand, order, best_fit);
        return consider(cand, name);
    };
    auto ping_pong = [&]() {
        std::vector<Block> cand = blocks;
        for (size_t i = 0; i < count; ++i) {
            cand[i].offset = (i % 2) ? bound - cand[i].bytes : 0;
            if (cand[i].offset < 0) return false;
        }
        return consider(cand, "ping-pong");
    };
    auto by_size = [&](size_t x, size_t y) {
        return std::tie(blocks[y].bytes, blocks[x].first) < std::tie(blocks[x].bytes, blocks[y].first);
    };
    auto by_first = [&](size_t x, size_t y) {
        return std::tie(blocks[x].first, blocks[y].bytes) < std::tie(blocks[y].first, blocks[x].bytes);
    };
    auto by_lifetime = [&](size_t x, size_t y) {
        int64_t lx = blocks[x].last - blocks[x].first, ly = blocks[y].last - blocks[y].first;
        return std::tie(ly, blocks[y].bytes) < std::tie(lx, blocks[x].bytes);
    };
    if (!greedy(by_size, true, "greedy-size") && !ping_pong() &&
        !greedy(by_first, false, "greedy-first-use"))
        greedy(by_lifetime, true, "greedy-lifetime");

    // The greedy layouts are valid by construction; a wrong one would corrupt activations
    // silently, so `consider` checks every candidate and this is the last line.
    if (best.size() != count) throw std::logic_error("vggfast planner: no valid arena layout");
    for (size_t i = 0; i < count; ++i) a.tensors[i].offset = best[i].offset;
    a.total_bytes = best_total;
}

}  // namespace

std::pair<int64_t, int64_t> rescaled_size(int64_t h, int64_t w, int64_t q) {
    // Bounded as the planner bounds a request, so q * long fits int64 and the size is exact (a
    // saturated product divided by h would be a wrong size, not an error).
    if (h < 1 || w < 1 || q < 1 || h > kMaxSide || w > kMaxSide || q > kMaxSide)
        throw ArgumentError("rescaled_size needs sizes 1.." + std::to_string(kMaxSide) + ", got " +
                            size_str(h, w) + " to " + std::to_string(q));
    if (h <= w) return {q, mul_sat(q, w) / h};
    return {mul_sat(q, h) / w, q};
}

std::vector<int64_t> crop_origins(int64_t size, int64_t crop, int64_t n) {
    // n is bounded like a grid: a huge n was a multi-terabyte allocation (std::bad_alloc).
    if (n < 1 || n > kMaxGrid || crop < 1 || size < crop)
        throw ArgumentError("cannot place " + std::to_string(n) + " crops of " +
                            std::to_string(crop) + " pixels on a side of " + std::to_string(size) +
                            " (1.." + std::to_string(kMaxGrid) + " crops, each at most the side)");
    std::vector<int64_t> o(static_cast<size_t>(n));
    const int64_t span = size - crop;
    if (n == 1) {
        o[0] = span / 2;
        return o;
    }
    // i * span / (n - 1) without forming i * span, which overflows int64 for a rescaled
    // panorama's side (up to kMaxSide^2) and gave negative origins: span = a (n - 1) + b, so
    // i * span / (n - 1) = i a + (i b) / (n - 1) exactly, with i b < (n - 1)^2.
    const int64_t a = span / (n - 1), b = span % (n - 1);
    for (int64_t i = 0; i < n; ++i) o[static_cast<size_t>(i)] = i * a + i * b / (n - 1);
    return o;
}

ShapeInfo infer_shapes(const std::vector<LayerDesc>& layers, int64_t h, int64_t w) {
    // h + 2 * pad - k + 1 below must not overflow (signed overflow is undefined behaviour).
    check_layers(layers);
    if (h < 1 || w < 1 || h > kMaxInferSide || w > kMaxInferSide)
        throw ArgumentError("input size " + size_str(h, w) + " (HxW) is out of range: both sides "
                            "must be 1.." + std::to_string(kMaxInferSide));
    ShapeInfo s;
    s.height = h;
    s.width = w;
    s.layers.reserve(layers.size());
    for (const LayerDesc& l : layers) {
        LayerShape ls;
        ls.name = l.name;
        ls.channels = l.cout;
        ls.conv_h = h + 2 * l.pad - l.k + 1;
        ls.conv_w = w + 2 * l.pad - l.k + 1;
        ls.out_h = l.pool ? ls.conv_h / 2 : ls.conv_h;
        ls.out_w = l.pool ? ls.conv_w / 2 : ls.conv_w;
        if (ls.out_h < 1 || ls.out_w < 1)
            throw ArgumentError("a " + size_str(s.height, s.width) + " (HxW) input is too small "
                                "for " + l.name + " (its output would be " +
                                size_str(ls.out_h, ls.out_w) + "); use a larger scale");
        h = ls.out_h;
        w = ls.out_w;
        s.layers.push_back(std::move(ls));
    }
    s.out_h = h;
    s.out_w = w;
    return s;
}

std::vector<Op> build_ops(const std::vector<LayerDesc>& layers, const Options& opt) {
    check_layers(layers);
    KernelTable table(opt.kernel_table);
    std::vector<Op> ops;
    int64_t cur = 0;  // tensor 0 is the input; op i writes tensor i + 1
    auto push = [&](std::string kind, size_t li, bool relu, bool pool) {
        Op op;
        op.kind = std::move(kind);
        op.layer = int64_t(li);
        op.relu = relu;
        op.pool = pool;
        op.input = cur;
        op.output = ++cur;
        table.choose(op, layers[li]);
        ops.push_back(std::move(op));
    };
    for (size_t li = 0; li < layers.size(); ++li) {
        const LayerDesc& l = layers[li];
        // The pool fuses into the conv epilogue only when nothing sits between them.
        const bool fused = l.pool && opt.fuse_pool && !l.lrn;
        push(l.kind, li, l.relu, fused);
        if (l.lrn) push("lrn", li, false, false);
        if (l.pool && !fused) push("pool", li, false, false);
    }
    return ops;
}

namespace {

Arena layout_ops(const std::vector<LayerDesc>& layers, const std::vector<Op>& ops,
                 const ShapeInfo& shape, int64_t n, const Options& opt) {
    Arena a;
    a.n = n;
    a.height = shape.height;
    a.width = shape.width;
    a.tensors.reserve(ops.size() + 1);
    auto add_tensor = [&](std::string name, int64_t c, int64_t th, int64_t tw, int64_t step) {
        Tensor t;
        t.name = std::move(name);
        t.n = n;
        t.c = c;
        t.h = th;
        t.w = tw;
        int64_t elems = mul_sat(mul_sat(mul_sat(n, c), th), tw);
        t.bytes = align_up(mul_sat(elems, opt.elem_size), opt.align);
        t.first = t.last = step;
        a.tensors.push_back(std::move(t));
    };
    add_tensor("input", layers[0].cin, shape.height, shape.width, 0);
    for (size_t i = 0; i < ops.size(); ++i) {
        const Op& op = ops[i];
        const LayerDesc& l = layers[size_t(op.layer)];
        const LayerShape& s = shape.layers[size_t(op.layer)];
        const int64_t step = int64_t(i) + 1;
        a.tensors[size_t(op.input)].last = step;
        if (op.kind == "lrn") {
            add_tensor(l.name + "/lrn", l.cout, s.conv_h, s.conv_w, step);
        } else if (op.kind == "pool" || op.pool) {
            add_tensor(l.name + "/pool", l.cout, s.out_h, s.out_w, step);
        } else {
            add_tensor(l.name, l.cout, s.conv_h, s.conv_w, step);
        }
        if (op.kind == "conv" || op.kind == "fc")
            a.flops += 2.0 * double(n) * double(s.conv_h) * double(s.conv_w) * double(l.cout) *
                       double(l.cin) * double(l.k * l.k);
    }
    // The executor reads the output (and kept taps) after the last op.
    const int64_t end = int64_t(ops.size()) + 1;
    a.tensors.back().last = end;
    for (const std::string& k : opt.keep) {
        bool found = false;
        for (Tensor& t : a.tensors)
            if (t.name == k) {
                t.last = end;
                found = true;
            }
        if (!found) {
            std::string names;
            for (const Tensor& t : a.tensors) names += (names.empty() ? "" : ", ") + t.name;
            throw ArgumentError("cannot keep '" + k + "': no such tensor; tensors: " + names);
        }
    }

    for (const Tensor& t : a.tensors) a.naive_bytes = add_sat(a.naive_bytes, t.bytes);
    if (a.naive_bytes == kMax) {
        // Sizes past int64: no layout to speak of, and no budget can hold it.
        a.total_bytes = a.lower_bound_bytes = kMax;
        a.strategy = "unrepresentable";
        return a;
    }
    for (int64_t s = 0; s <= end; ++s) {
        int64_t live = 0;
        for (const Tensor& t : a.tensors)
            if (t.first <= s && s <= t.last) live = add_sat(live, t.bytes);
        a.lower_bound_bytes = std::max(a.lower_bound_bytes, live);
    }
    assign_offsets(a);
    return a;
}

}  // namespace

Arena layout_arena(const std::vector<LayerDesc>& layers, int64_t n, int64_t h, int64_t w,
                   const Options& opt) {
    check_options(opt);
    if (n < 1) throw ArgumentError("batch size must be positive");
    std::vector<Op> ops = build_ops(layers, opt);
    return layout_ops(layers, ops, infer_shapes(layers, h, w), n, opt);
}

std::string plan_key(const std::vector<LayerDesc>& layers, const Request& req,
                     const Options& opt) {
    std::ostringstream s;
    s << "vggfast-plan-v1|";
    for (const LayerDesc& l : layers)
        s << l.name << ',' << l.kind << ',' << l.cin << ',' << l.cout << ',' << l.k << ','
          << l.pad << ',' << l.relu << l.lrn << l.pool << ';';
    s << "|img";
    for (const auto& [h, w] : req.images) s << ',' << h << 'x' << w;
    s << "|q";
    for (int64_t q : req.scales) s << ',' << q;
    s << "|f" << req.flip << '|' << req.method << "|c" << req.crop << "|g" << req.grid;
    s << "|ns" << opt.native_size << "|e" << opt.elem_size << "|b" << opt.budget << "|a"
      << opt.align << "|mb" << opt.max_batch << "|fp" << opt.fuse_pool << "|k";
    for (const std::string& k : opt.keep) s << ',' << k;
    s << "|t";
    for (const auto& [k, v] : opt.kernel_table) s << ',' << k << '=' << v;
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(s.str())));
    return buf;
}

Plan make_plan(const std::vector<LayerDesc>& layers, const Request& req, const Options& opt) {
    check_layers(layers);
    check_options(opt);
    check_request(req, opt);

    Plan plan;
    plan.key = plan_key(layers, req, opt);
    plan.budget_bytes = opt.budget;
    plan.elem_size = opt.elem_size;

    // Views, image-major, then scale; per scale the dense view, then the crops row by row; each
    // followed by its mirror image when flipping.
    const int64_t crop = req.crop ? req.crop : opt.native_size;
    const int nflip = req.flip ? 2 : 1;
    std::map<std::pair<int64_t, int64_t>, int64_t> shape_index;
    auto shape_of = [&](int64_t h, int64_t w) {
        auto [it, fresh] = shape_index.emplace(std::make_pair(h, w), int64_t(plan.shapes.size()));
        if (fresh) plan.shapes.push_back(infer_shapes(layers, h, w));
        return it->second;
    };
    for (size_t i = 0; i < req.images.size(); ++i) {
        auto [h, w] = req.images[i];
        for (int64_t q : req.scales) {
            auto [rh, rw] = rescaled_size(h, w, q);
            View base;
            base.image = int64_t(i);
            base.scale = q;
            base.rescaled_h = rh;
            base.rescaled_w = rw;
            if (has_dense(req.method)) {
                View v = base;
                v.x1 = rw;
                v.y1 = rh;
                v.height = rh;
                v.width = rw;
                v.shape = shape_of(rh, rw);
                for (int f = 0; f < nflip; ++f) {
                    v.flip = f == 1;
                    plan.views.push_back(v);
                }
            }
            if (has_crops(req.method)) {
                // Crops are cut from the whole rescaled image, which the executor holds (float32,
                // as preprocess.resize_short makes it) while the crops are small: a huge Q passed
                // every arena check and then allocated tens of GB on the host. It must fit the
                // budget as a dense view's input must (a dense view's arena check covers more).
                const int64_t pixels =
                    mul_sat(mul_sat(mul_sat(rh, rw), layers[0].cin), kRescaleElemSize);
                if (pixels == kMax || pixels > opt.budget)  // saturated: past int64
                    throw BudgetError(
                        int64_t(i), "(" + size_str(h, w) + ", HxW) at scale " + std::to_string(q) +
                        " is rescaled to " + size_str(rh, rw) + " to cut its crops: " +
                        (pixels == kMax ? "more than 8 EiB" : fmt_bytes(pixels)) +
                        " of float32 pixels, over the memory budget of " + fmt_bytes(opt.budget) +
                        "; use smaller scales" +
                        (pixels == kMax
                             ? std::string()
                             : ", or raise the budget to at least " + std::to_string(pixels) +
                                   " bytes with Engine(..., memory_budget=BYTES) or "
                                   "VGGFAST_MEMORY_BUDGET"));
                std::vector<int64_t> ys = crop_origins(rh, crop, req.grid);
                std::vector<int64_t> xs = crop_origins(rw, crop, req.grid);
                View v = base;
                v.cropped = true;
                v.height = v.width = crop;
                v.shape = shape_of(crop, crop);
                for (int64_t y : ys)
                    for (int64_t x : xs) {
                        v.x0 = x;
                        v.y0 = y;
                        v.x1 = x + crop;
                        v.y1 = y + crop;
                        for (int f = 0; f < nflip; ++f) {
                            v.flip = f == 1;
                            plan.views.push_back(v);
                        }
                    }
            }
        }
    }

    // Arenas are memoised by batch shape; the batch-size search asks for the same ones again.
    plan.ops = build_ops(layers, opt);
    std::map<std::tuple<int64_t, int64_t, int64_t>, Arena> memo;
    auto arena = [&](int64_t n, int64_t h, int64_t w) -> const Arena& {
        auto key = std::make_tuple(n, h, w);
        auto it = memo.find(key);
        if (it == memo.end()) {
            const ShapeInfo& shape = plan.shapes[size_t(shape_index.at({h, w}))];
            it = memo.emplace(key, layout_ops(layers, plan.ops, shape, n, opt)).first;
        }
        return it->second;
    };

    auto fits = [&](const Arena& a) { return a.total_bytes != kMax && a.total_bytes <= opt.budget; };

    // Buckets of identical input size, in order of first appearance.
    std::vector<std::vector<int64_t>> buckets(plan.shapes.size());
    for (size_t v = 0; v < plan.views.size(); ++v)
        buckets[size_t(plan.views[v].shape)].push_back(int64_t(v));

    for (size_t b = 0; b < buckets.size(); ++b) {
        const std::vector<int64_t>& vs = buckets[b];
        const int64_t h = plan.shapes[b].height, w = plan.shapes[b].width;
        const int64_t count = int64_t(vs.size());
        const Arena& one = arena(1, h, w);
        if (!fits(one)) {
            const View& v = plan.views[size_t(vs[0])];
            auto [ih, iw] = req.images[size_t(v.image)];
            throw BudgetError(
                v.image, "(" + size_str(ih, iw) + ", HxW) at scale " +
                std::to_string(v.scale) + " gives a " + size_str(h, w) + " view that needs " +
                (one.total_bytes == kMax ? "more than 8 EiB" : fmt_bytes(one.total_bytes)) +
                " of activations (batch 1, " +
                std::to_string(opt.elem_size) + "-byte elements), over the memory budget of " +
                fmt_bytes(opt.budget) + "; use smaller scales" +
                (one.total_bytes == kMax
                     ? std::string()
                     : ", or raise the budget to at least " + std::to_string(one.total_bytes) +
                           " bytes with Engine(..., memory_budget=BYTES) or VGGFAST_MEMORY_BUDGET"));
        }
        // Largest batch that fits: the arena grows with n, so bisect on it.
        int64_t cap = opt.max_batch > 0 ? std::min(count, opt.max_batch) : count;
        int64_t nmax = 1;
        if (fits(arena(cap, h, w))) {
            nmax = cap;
        } else {
            int64_t lo = 1, hi = cap;  // fits(lo), !fits(hi)
            while (hi - lo > 1) {
                int64_t mid = lo + (hi - lo) / 2;
                (fits(arena(mid, h, w)) ? lo : hi) = mid;
            }
            nmax = lo;
        }
        // Near-equal batches (at most two distinct sizes, so at most two arenas per bucket);
        // re-checked against the budget rather than trusting monotonicity.
        int64_t k = (count + nmax - 1) / nmax;
        for (;; ++k) {
            int64_t big = (count + k - 1) / k;
            if (fits(arena(big, h, w)) && fits(arena(count / k, h, w))) break;
        }
        int64_t pos = 0;
        for (int64_t j = 0; j < k; ++j) {
            int64_t size = count / k + (j < count % k ? 1 : 0);
            Batch batch;
            batch.height = h;
            batch.width = w;
            batch.views.assign(vs.begin() + pos, vs.begin() + pos + size);
            pos += size;
            batch.arena = size;  // the batch size, until arenas are numbered below
            plan.batches.push_back(std::move(batch));
        }
    }

    // Largest work first so the device starts on the long batches; ties by size, then request
    // order, so a plan is a pure function of its key.
    std::stable_sort(plan.batches.begin(), plan.batches.end(), [&](const Batch& x, const Batch& y) {
        double fx = arena(x.arena, x.height, x.width).flops;
        double fy = arena(y.arena, y.height, y.width).flops;
        if (fx != fy) return fx > fy;
        if (x.height != y.height) return x.height > y.height;
        if (x.width != y.width) return x.width > y.width;
        return x.views[0] < y.views[0];
    });

    std::map<std::tuple<int64_t, int64_t, int64_t>, int64_t> arena_index;
    for (size_t bi = 0; bi < plan.batches.size(); ++bi) {
        Batch& batch = plan.batches[bi];
        auto key = std::make_tuple(batch.arena, batch.height, batch.width);
        auto [it, fresh] = arena_index.emplace(key, int64_t(plan.arenas.size()));
        if (fresh) {
            // Each batch shape is numbered once, so its memo entry can be moved out.
            plan.arenas.push_back(std::move(memo.at(key)));
            plan.peak_bytes = std::max(plan.peak_bytes, plan.arenas.back().total_bytes);
            plan.naive_bytes = std::max(plan.naive_bytes, plan.arenas.back().naive_bytes);
        }
        batch.arena = it->second;
        for (size_t s = 0; s < batch.views.size(); ++s) {
            View& v = plan.views[size_t(batch.views[s])];
            v.batch = int64_t(bi);
            v.slot = int64_t(s);
        }
    }
    return plan;
}

}  // namespace vggfast
