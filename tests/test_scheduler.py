"""The C++ planner (vggfast._scheduler through vggfast.scheduler): property tests with seeded
random requests. The oracles are torch itself (shapes of real and meta forwards), preprocess.py's
rescale, the rules of the paper's multi-crop grid, and brute-force checks of every arena (lifetimes
recomputed from the op list, pairwise byte overlap, budget, lower bound). One test runs plans end
to end through a byte arena with torch ops and compares every view with `dense_forward` alone."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from vggfast import preprocess as pp
from vggfast import scheduler as S
from vggfast.configs import CONFIGS, make_spec
from vggfast.errors import ArgumentError, MemoryBudgetError, VGGFastError
from vggfast.nn import dense_forward, lrn

HUGE = 1 << 60


@pytest.fixture(autouse=True)
def one_thread():
    """The nets here are tiny: intra-op threads only add sync cost (tens of ms per conv on a busy
    two-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_params(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {}
    for l in spec.layers:
        fan_in = l.cin * l.k * l.k
        p[f"{l.name}.weight"] = torch.randn(l.cout, l.cin, l.k, l.k, generator=g) * (2 / fan_in) ** 0.5
        p[f"{l.name}.bias"] = torch.randn(l.cout, generator=g) * 0.1
    return p


def tap_of_conv(spec, layer):
    """The dense_forward tap holding a layer's conv(+ReLU) output, and its pool tap."""
    if layer.kind == "fc":
        return (f"relu{layer.block}" if layer.relu else layer.name), None
    i = [l for l in spec.layers if l.block == layer.block].index(layer) + 1
    return f"relu{layer.block}_{i}", (f"pool{layer.block}" if layer.pool else None)


def single_view_bytes(spec, h, w, **opts):
    """Arena bytes of one h x w view (the scale min(h, w) keeps the size as it is)."""
    plan = S.make_plan(spec, [(h, w)], scales=(min(h, w),), flip=False, memory_budget=HUGE, **opts)
    (arena,) = plan.arenas
    return arena.total_bytes


# -- rescale and views -----------------------------------------------------------------------------

def test_rescaled_size_is_the_preprocessing_rule():
    rng = random.Random(1)
    for _ in range(3000):
        h, w, q = rng.randint(1, 5000), rng.randint(1, 5000), rng.randint(1, 2000)
        want = (q, (q * w) // h) if h <= w else ((q * h) // w, q)
        assert S.rescaled_size(h, w, q) == want == pp.rescaled_size(h, w, q)
    for h, w in [(480, 640), (640, 480), (300, 300), (256, 1000)]:  # short side already Q: as is
        assert S.rescaled_size(h, w, min(h, w)) == (h, w)


def test_rescaled_size_matches_resize_short_output():
    rng = random.Random(2)
    for _ in range(25):
        h, w, q = rng.randint(8, 90), rng.randint(8, 90), rng.randint(8, 120)
        x = torch.rand(3, h, w)
        assert tuple(pp.resize_short(x, q).shape[-2:]) == S.rescaled_size(h, w, q)


def test_dense_views_follow_request_order_and_rescale():
    spec = make_spec("D")
    rng = random.Random(3)
    for _ in range(20):
        sizes = [(rng.randint(50, 3000), rng.randint(50, 3000)) for _ in range(rng.randint(1, 8))]
        scales = rng.sample([224, 256, 288, 384, 480, 512], rng.randint(1, 3))
        flip = rng.random() < 0.5
        plan = S.make_plan(spec, sizes, scales, flip=flip, memory_budget=HUGE)
        want = [(i, q, f) for i in range(len(sizes)) for q in scales
                for f in ((False, True) if flip else (False,))]
        assert [(v.image, v.scale, v.flip) for v in plan.views] == want
        for v in plan.views:
            hw = pp.rescaled_size(*sizes[v.image], v.scale)
            assert (v.height, v.width) == (v.rescaled_h, v.rescaled_w) == hw
            assert v.crop is None and v.kind == "dense"
            assert v.index == plan.views.index(v)
        for i in range(len(sizes)):
            assert [plan.views[j].image for j in plan.image_views(i)] == [i] * len(scales) * (1 + flip)


def test_multicrop_grid():
    spec = make_spec("D")
    rng = random.Random(4)
    for _ in range(20):
        sizes = [(rng.randint(100, 1500), rng.randint(100, 1500)) for _ in range(rng.randint(1, 4))]
        scales = sorted(rng.sample([224, 256, 320, 384, 512], rng.randint(1, 3)))
        n = rng.randint(1, 6)
        crop = rng.choice([None, 224, min(scales)])
        c = crop or spec.image_size
        flip = rng.random() < 0.5
        method = rng.choice(["multicrop", "dense+multicrop"])
        plan = S.make_plan(spec, sizes, scales, flip, method, crop=crop, grid=n,
                           memory_budget=HUGE)
        for i, (h, w) in enumerate(sizes):
            for q in scales:
                rh, rw = pp.rescaled_size(h, w, q)
                views = [v for v in plan.views if v.image == i and v.scale == q]
                crops = [v for v in views if v.crop is not None]
                assert len(views) - len(crops) == (1 + flip) * (method == "dense+multicrop")
                assert len(crops) == n * n * (1 + flip)
                if n == 1:
                    xs, ys = [(rw - c) // 2], [(rh - c) // 2]
                else:
                    xs = [k * (rw - c) // (n - 1) for k in range(n)]
                    ys = [k * (rh - c) // (n - 1) for k in range(n)]
                want = [(x, y, x + c, y + c, f) for y in ys for x in xs
                        for f in ((False, True) if flip else (False,))]
                assert [(*v.crop, v.flip) for v in crops] == want
                for v in crops:
                    assert (v.height, v.width) == (c, c) and (v.rescaled_h, v.rescaled_w) == (rh, rw)
                    x0, y0, x1, y1 = v.crop
                    assert 0 <= x0 < x1 <= rw and 0 <= y0 < y1 <= rh
                if n > 1:
                    assert (xs[0], xs[-1], ys[0], ys[-1]) == (0, rw - c, 0, rh - c)
                assert tuple(S.crop_origins(rw, c, n)) == tuple(xs)


# -- shape inference against torch ------------------------------------------------------------------

def check_shapes_against_torch(spec, sizes, fuse_pool):
    params = random_params(spec)
    names = spec.tap_names()
    plan = S.make_plan(spec, sizes, scales=(spec.image_size,), flip=False, memory_budget=HUGE,
                       fuse_pool=fuse_pool, elem_size=4)
    for h, w in sizes:
        # the rescale with q = the native size, then the real forward of that input
        hh, ww = pp.rescaled_size(h, w, spec.image_size)
        out = dense_forward(params, spec, torch.randn(1, 3, hh, ww), taps=names)
        shape = S.infer_shapes(spec, hh, ww)
        for l, ls in zip(spec.layers, shape.layers):
            conv_tap, pool_tap = tap_of_conv(spec, l)
            assert ls.name == l.name and ls.channels == l.cout
            assert tuple(out[conv_tap].shape) == (1, l.cout, ls.conv_h, ls.conv_w), (hh, ww, l.name)
            if pool_tap:
                assert tuple(out[pool_tap].shape) == (1, l.cout, ls.out_h, ls.out_w)
            else:
                assert (ls.out_h, ls.out_w) == (ls.conv_h, ls.conv_w)
            if l.lrn:
                assert tuple(out[f"norm{l.block}"].shape) == tuple(out[conv_tap].shape)
        assert tuple(out["fc8"].shape[-2:]) == (shape.out_h, shape.out_w) == spec.output_size(hh, ww)
        # every arena tensor of the batch holding this view has the torch output's shape
        (view,) = [v for v in plan.views if (v.height, v.width) == (hh, ww)][:1]
        assert plan.view_layers(view.index) == shape.layers
        arena = plan.arenas[plan.batches[view.batch].arena]
        n = arena.n
        for t in arena.tensors:
            if t.name == "input":
                ref = (3, hh, ww)
            else:
                lname, _, stage = t.name.partition("/")
                l = spec.layer(lname)
                conv_tap, pool_tap = tap_of_conv(spec, l)
                ref = out[{"": conv_tap, "pool": pool_tap, "lrn": f"norm{l.block}"}[stage]].shape[1:]
            assert (t.n, t.c, t.h, t.w) == (n, *ref), t.name


@pytest.mark.parametrize("config", ["D", "A-LRN", "C"])
def test_shapes_equal_torch_forward_native_32(config):
    """Width-reduced nets at image_size 32 (fc6 is 1x1): random sizes 32..200."""
    spec = make_spec(config, 10, width=1 / 32, image_size=32)
    rng = random.Random(5)
    sizes = [(rng.randint(32, 200), rng.randint(32, 200)) for _ in range(8)]
    check_shapes_against_torch(spec, sizes, fuse_pool=config != "C")


def test_shapes_equal_torch_forward_224_to_1000():
    """The paper's geometry (image_size 224, fc6 7x7) at width 1/32: random sizes 224..1000."""
    spec = make_spec("D", 10, width=1 / 32, image_size=224)
    rng = random.Random(6)
    sizes = [(rng.randint(224, 1000), rng.randint(224, 1000)) for _ in range(10)]
    sizes += [(224, 224), (225, 301), (255, 1000)]
    check_shapes_against_torch(spec, sizes, fuse_pool=True)


@pytest.mark.parametrize("config", CONFIGS)
def test_shapes_equal_meta_forward_full_width(config):
    """Full-width channel counts: F.conv2d / F.max_pool2d shape math on meta tensors."""
    spec = make_spec(config)
    rng = random.Random(7)
    for _ in range(30):
        h, w = rng.randint(224, 1000), rng.randint(224, 1000)
        shape = S.infer_shapes(spec, h, w)
        x = torch.empty(2, 3, h, w, device="meta")
        for l, ls in zip(spec.layers, shape.layers):
            x = F.conv2d(x, torch.empty(l.cout, l.cin, l.k, l.k, device="meta"), padding=l.pad)
            assert tuple(x.shape) == (2, ls.channels, ls.conv_h, ls.conv_w)
            if l.pool:
                x = F.max_pool2d(x, 2, 2)
            assert tuple(x.shape) == (2, ls.channels, ls.out_h, ls.out_w)
        assert (shape.out_h, shape.out_w) == spec.output_size(h, w)


# -- arenas, batches, budget -----------------------------------------------------------------------

def recomputed_lifetimes(plan, arena):
    """(first, last) of every tensor from the op list alone (not the planner's own numbers)."""
    first = {0: 0}
    last = {0: 0}
    for step, op in enumerate(plan.ops, start=1):
        assert op.input in first, "an op reads a tensor nobody wrote"
        last[op.input] = max(last[op.input], step)
        first[op.output] = last[op.output] = step
    end = len(plan.ops) + 1
    last[plan.ops[-1].output] = end
    return first, last, end


def check_plan(plan, spec, budget, align, elem, max_batch, keep):
    # ops: a chain over the layers, pools fused or not, LRN before pool
    assert [op.output for op in plan.ops] == list(range(1, len(plan.ops) + 1))
    assert sorted({op.layer for op in plan.ops}) == list(range(len(spec.layers)))
    # views: each in exactly one batch slot, batches of one size, balanced within a size
    seen = set()
    per_size: dict = {}
    for b in plan.batches:
        assert b.size >= 1 and (max_batch == 0 or b.size <= max_batch)
        assert plan.arenas[b.arena].n == b.size
        assert (plan.arenas[b.arena].height, plan.arenas[b.arena].width) == (b.height, b.width)
        for slot, vi in enumerate(b.views):
            v = plan.views[vi]
            assert (v.batch, v.slot) == (b.index, slot) and (v.height, v.width) == (b.height, b.width)
            assert vi not in seen
            seen.add(vi)
        per_size.setdefault((b.height, b.width), []).append(b.size)
    assert seen == set(range(len(plan.views)))
    for sizes in per_size.values():
        assert max(sizes) - min(sizes) <= 1
    flops = [plan.arenas[b.arena].flops for b in plan.batches]
    assert flops == sorted(flops, reverse=True)  # largest first

    peak = 0
    for arena in plan.arenas:
        first, last, end = recomputed_lifetimes(plan, arena)
        ts = arena.tensors
        assert len(ts) == len(plan.ops) + 1
        for name in keep:
            last[[t.name for t in ts].index(name)] = end
        for i, t in enumerate(ts):
            assert (t.first, t.last) == (first[i], last[i]), t.name
            raw = t.n * t.c * t.h * t.w * elem
            assert t.bytes % align == 0 and raw <= t.bytes < raw + align
            assert t.offset % align == 0 and 0 <= t.offset and t.offset + t.bytes <= arena.total_bytes
        # no two tensors live at the same step share a byte
        for a, b in itertools.combinations(range(len(ts)), 2):
            if first[a] <= last[b] and first[b] <= last[a]:
                ta, tb = ts[a], ts[b]
                assert ta.offset + ta.bytes <= tb.offset or tb.offset + tb.bytes <= ta.offset, \
                    (arena.n, arena.height, arena.width, ta, tb)
        lower = max(sum(t.bytes for i, t in enumerate(ts) if first[i] <= s <= last[i])
                    for s in range(end + 1))
        assert arena.lower_bound_bytes == lower <= arena.total_bytes
        if not keep:  # a plain chain: ping-pong from both ends always reaches the bound
            assert arena.total_bytes == lower
        assert arena.total_bytes <= arena.naive_bytes == sum(t.bytes for t in ts)
        assert arena.total_bytes <= budget
        peak = max(peak, arena.total_bytes)
    assert plan.peak_bytes == peak <= budget
    assert plan.peak_bytes <= plan.naive_bytes == max(a.naive_bytes for a in plan.arenas)


def random_request(rng, spec):
    native = spec.image_size
    method = rng.choice(S.METHODS)
    scales = sorted({native + rng.randint(0, 3 * native) for _ in range(rng.randint(1, 3))})
    n_img = rng.randint(1, 6)
    sizes = []
    for _ in range(n_img):
        if rng.random() < 0.3 and sizes:
            sizes.append(rng.choice(sizes))  # repeated sizes share buckets
        else:
            sizes.append((rng.randint(8, 6 * native), rng.randint(8, 6 * native)))
    grid = rng.randint(1, 4)
    return dict(sizes=sizes, scales=scales, flip=rng.random() < 0.6, method=method, grid=grid)


def test_random_plans_arena_budget_and_batches():
    rng = random.Random(8)
    checked = errors = 0
    for trial in range(300):
        config = rng.choice(CONFIGS)
        spec = make_spec(config, 10, width=rng.choice([1 / 32, 1 / 8, 1 / 2, 1.0]),
                         image_size=rng.choice([32, 64, 224]))
        req = random_request(rng, spec)
        elem = rng.choice([1, 2, 4])
        align = rng.choice([1, 2, 64, 256, 512])
        fuse = rng.random() < 0.5
        max_batch = rng.choice([0, 0, 1, 3, 7])
        probe = S.make_plan(spec, **req, memory_budget=HUGE, elem_size=elem, align=align,
                            fuse_pool=fuse)
        names = [t.name for t in probe.arenas[0].tensors]
        keep = rng.sample(names, rng.randint(0, 2)) if rng.random() < 0.3 else []
        # budgets from "nothing fits" up to "everything in one batch"
        budget = max(1, int(probe.peak_bytes * rng.choice([0.05, 0.2, 0.5, 0.8, 1.0, 2.0])))
        kw = dict(memory_budget=budget, elem_size=elem, align=align, fuse_pool=fuse,
                  max_batch=max_batch, keep=keep)
        try:
            plan = S.make_plan(spec, **req, **kw)
        except MemoryBudgetError as e:
            # refused only when some single view really needs more than the budget, or the
            # rescaled image (float32) that crops are cut from does
            need = max(single_view_bytes(spec, v.height, v.width, elem_size=elem, align=align,
                                         fuse_pool=fuse, keep=keep) for v in probe.views)
            rescaled = max(3 * v.rescaled_h * v.rescaled_w * 4 for v in probe.views if v.crop)\
                if req["method"] != "dense" else 0
            assert max(need, rescaled) > budget, (need, rescaled, budget)
            assert (rescaled if "rescaled to" in str(e) else need) > budget, str(e)
            assert "\n" not in str(e) and "memory_budget" in str(e)
            errors += 1
            continue
        check_plan(plan, spec, budget, align, elem, max_batch, keep)
        # the split is minimal: one batch fewer for a size would need a batch over the budget
        counts = {}
        for b in plan.batches:
            counts.setdefault((b.height, b.width), []).append(b.size)
        for (h, w), sizes in counts.items():
            k, total = len(sizes), sum(sizes)
            if k > 1 and (max_batch == 0 or math.ceil(total / (k - 1)) <= max_batch):
                m = math.ceil(total / (k - 1))
                big = S.make_plan(spec, [(h, w)] * m, scales=(min(h, w),), flip=False,
                                  memory_budget=HUGE, elem_size=elem, align=align, fuse_pool=fuse,
                                  keep=keep)
                assert big.peak_bytes > budget
        checked += 1
    assert checked > 120 and errors > 10  # both outcomes exercised


def test_random_layer_chains_layouts_valid_and_optimal():
    """Arbitrary chains straight through the extension (channel counts VGG never has, so the
    layouts other than greedy-by-size get their turn): never an overlap of live tensors, and the
    lower bound reached whenever nothing is kept."""
    from vggfast import _scheduler as C
    rng = random.Random(9)
    strategies = set()
    for _ in range(1500):
        layers, cin, pools = [], rng.randint(1, 8), 0
        for i in range(rng.randint(1, 10)):
            cout, k = rng.choice([1, 2, 3, 5, 8, 16, 64, 200]), rng.choice([1, 3])
            pool = pools < 5 and rng.random() < 0.4  # 64 -> 2 after five pools
            pools += pool
            layers.append(C.LayerDesc(f"l{i}", "conv", cin, cout, k, k // 2, True,
                                      rng.random() < 0.1, pool))
            cin = cout
        o = C.Options()
        o.native_size, o.elem_size, o.align = 1, rng.choice([1, 2]), rng.choice([1, 64])
        o.fuse_pool = rng.random() < 0.5
        names = [t.name for t in C.layout_arena(layers, 1, 64, 64, o).tensors]
        if rng.random() < 0.3:
            o.keep = rng.sample(names, 1)
        a = C.layout_arena(layers, rng.randint(1, 3), 64, rng.randint(64, 90), o)
        strategies.add(a.strategy)
        ts = a.tensors
        for x, y in itertools.combinations(ts, 2):
            if x.first <= y.last and y.first <= x.last:
                assert x.offset + x.bytes <= y.offset or y.offset + y.bytes <= x.offset
        assert max(t.offset + t.bytes for t in ts) == a.total_bytes >= a.lower_bound_bytes
        if not o.keep:
            assert a.total_bytes == a.lower_bound_bytes
    assert {"greedy-size", "ping-pong"} <= strategies


def test_budget_splits_bucket_evenly():
    spec = make_spec("D", 10, width=1 / 8, image_size=32)
    one = single_view_bytes(spec, 48, 64)
    three = S.make_plan(spec, [(48, 64)] * 3, scales=(48,), flip=False,
                        memory_budget=HUGE).peak_bytes
    plan = S.make_plan(spec, [(48, 64)] * 8, scales=(48,), flip=False, memory_budget=three)
    assert [b.size for b in plan.batches] == [3, 3, 2]
    assert plan.peak_bytes == three and one < three
    assert len(plan.arenas) == 2  # batch shapes (3, 48, 64) and (2, 48, 64)


def test_plan_peak_well_below_naive_for_vgg16():
    spec = make_spec("D")
    plan = S.make_plan(spec, [(480, 640), (640, 480), (500, 500)], memory_budget=HUGE)
    for a in plan.arenas:
        # the chain needs at most the two largest neighbours; naive keeps all 17 tensors
        assert a.total_bytes == a.lower_bound_bytes
        assert a.total_bytes < 0.5 * a.naive_bytes


# -- plans run end to end through the arena -------------------------------------------------------

def run_plan(plan, spec, params, inputs):
    """A reference executor: every tensor is a channels_last view into one byte buffer, each output
    is filled with NaN before its op runs (an output overlapping a live tensor poisons it)."""
    buf = torch.empty(plan.peak_bytes + 4, dtype=torch.uint8)
    buf.view(torch.float32).fill_(float("nan"))
    scores = {}
    for batch in plan.batches:
        arena = plan.arenas[batch.arena]

        def tensor(i):
            t = arena.tensors[i]
            flat = buf[t.offset:t.offset + t.bytes].view(torch.float32)[:t.numel]
            return flat.view(t.n, t.h, t.w, t.c).permute(0, 3, 1, 2)

        x = tensor(0)
        x.fill_(float("nan"))
        for slot, vi in enumerate(batch.views):
            x[slot].copy_(inputs[vi])
        for op in plan.ops:
            l = spec.layers[op.layer]
            src, dst = tensor(op.input), tensor(op.output)
            dst.fill_(float("nan"))
            if op.kind in ("conv", "fc"):
                y = F.conv2d(src, params[f"{l.name}.weight"], params[f"{l.name}.bias"], padding=l.pad)
                y = F.relu(y) if op.relu else y
                y = F.max_pool2d(y, 2, 2) if op.pool else y
            elif op.kind == "lrn":
                y = lrn(src)
            else:
                assert op.kind == "pool"
                y = F.max_pool2d(src, 2, 2)
            dst.copy_(y)
        out = tensor(plan.ops[-1].output)
        for slot, vi in enumerate(batch.views):
            scores[vi] = out[slot].clone()
    return scores


def view_input(img, v):
    x = pp.resize_short(img, v.scale)
    assert tuple(x.shape[-2:]) == (v.rescaled_h, v.rescaled_w)
    if v.crop is not None:
        x0, y0, x1, y1 = v.crop
        x = x[:, y0:y1, x0:x1]
    return x.flip(-1) if v.flip else x


@pytest.mark.parametrize("config,fuse", [("D", True), ("A-LRN", True), ("C", False)])
def test_plan_runs_through_arena_like_single_views(config, fuse):
    torch.manual_seed(0)
    spec = make_spec(config, 10, width=1 / 32, image_size=32)
    params = random_params(spec, seed=1)
    sizes = [(40, 52), (52, 40), (45, 45), (33, 90), (40, 52)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    alone = {}  # each distinct view through dense_forward by itself
    for method in S.METHODS:
        kw = dict(scales=(32, 48), method=method, grid=3, elem_size=4, fuse_pool=fuse)
        probe = S.make_plan(spec, sizes, memory_budget=HUGE, **kw)
        need = max(single_view_bytes(spec, v.height, v.width, elem_size=4, fuse_pool=fuse)
                   for v in probe.views)
        plan = S.make_plan(spec, sizes, memory_budget=max(probe.peak_bytes // 4, need),
                           max_batch=16, **kw)
        assert len(plan.batches) > len(probe.batches)  # the budget forced splits
        inputs = [view_input(images[v.image], v) for v in plan.views]
        got = run_plan(plan, spec, params, inputs)
        for v in plan.views:
            key = (v.image, v.scale, v.flip, v.crop)
            if key not in alone:
                alone[key] = dense_forward(params, spec, inputs[v.index][None])["fc8"][0]
            want = alone[key]
            assert got[v.index].shape == want.shape == (10, *spec.output_size(v.height, v.width))
            torch.testing.assert_close(got[v.index], want, rtol=1e-4, atol=1e-5)


def test_the_checks_catch_a_broken_layout():
    """Guard against checks that cannot fail: overlap two live tensors and both the layout check
    and the arena run must notice."""
    spec = make_spec("D", 10, width=1 / 32, image_size=32)
    plan = S.make_plan(spec, [(40, 52)], scales=(32,), flip=False, elem_size=4, memory_budget=HUGE)
    arena = plan.arenas[0]
    ts = list(arena.tensors)
    ts[2] = ts[2]._replace(offset=ts[1].offset)  # conv1_2's output on top of its input
    arena.__dict__["tensors"] = tuple(ts)
    with pytest.raises(AssertionError):
        check_plan(plan, spec, HUGE, 256, 4, 0, [])
    params = random_params(spec)
    x = view_input(torch.rand(3, 40, 52), plan.views[0])
    got = run_plan(plan, spec, params, [x])[0]
    assert torch.isnan(got).all()


# -- kernel table, key, cache, summary -------------------------------------------------------------

def test_kernel_table_most_specific_key_wins():
    spec = make_spec("C")
    table = {"conv3x3": 1, "conv3x3+pool": 2, "conv1x1": 3, "fc7x7": 4, "fc": 5,
             "conv3x3:64->64+pool": 9}
    plan = S.make_plan(spec, [(224, 224)], scales=(224,), flip=False, kernel_table=table)
    got = {op.name: (op.config, op.config_key) for op in plan.ops}
    assert got["conv1_1"] == (1, "conv3x3")
    assert got["conv1_2"] == (9, "conv3x3:64->64+pool")
    assert got["conv2_2"] == (2, "conv3x3+pool")
    assert got["conv3_3"] == (3, "conv1x1")  # 1x1 with a fused pool: no "+pool" key given
    assert got["fc6"] == (4, "fc7x7") and got["fc7"] == (5, "fc") and got["fc8"] == (5, "fc")
    plain = S.make_plan(spec, [(224, 224)], scales=(224,), flip=False)
    assert {op.config for op in plain.ops} == {-1}
    alrn = S.make_plan(make_spec("A-LRN"), [(224, 224)], scales=(224,), flip=False,
                       kernel_table={"lrn": 7, "pool": 8})
    kinds = [(op.name, op.kind, op.config) for op in alrn.ops[:3]]
    assert kinds == [("conv1_1", "conv", -1), ("conv1_1", "lrn", 7), ("conv1_1", "pool", 8)]


def test_ops_fuse_pool_only_without_lrn():
    for config in CONFIGS:
        spec = make_spec(config)
        n_lrn = sum(l.lrn for l in spec.layers)
        n_pool = sum(l.pool for l in spec.layers)
        fused = S.make_plan(spec, [(224, 224)], scales=(224,), flip=False).ops
        unfused = S.make_plan(spec, [(224, 224)], scales=(224,), flip=False, fuse_pool=False).ops
        assert len(fused) == len(spec.layers) + 2 * n_lrn  # an LRN layer's pool stays separate
        assert len(unfused) == len(spec.layers) + n_lrn + n_pool
        assert not any(op.pool for op in unfused)


def test_plan_key_and_cache():
    spec = make_spec("D")
    sch = S.Scheduler(spec, memory_budget=2 << 30)
    sizes = [(480, 640), (300, 1200)]
    p1 = sch.plan(sizes)
    assert sch.plan([list(s) for s in sizes]) is p1  # same structure -> cached plan
    assert sch.key(sizes) == p1.key and len(p1.key) == 16
    fresh = S.make_plan(spec, sizes, memory_budget=2 << 30)
    assert fresh is not p1 and fresh.key == p1.key
    assert fresh.views == p1.views and [b.views for b in fresh.batches] == [b.views for b in p1.batches]
    assert [a.tensors for a in fresh.arenas] == [a.tensors for a in p1.arenas]
    variants = [sch.key(sizes, flip=False), sch.key(sizes[::-1]), sch.key(sizes, (384, 256, 512)),
                sch.key(sizes, method="dense+multicrop"), sch.key([(480, 641), (300, 1200)]),
                S.Scheduler(spec, memory_budget=1 << 30).key(sizes),
                S.Scheduler(spec, memory_budget=2 << 30, elem_size=4).key(sizes),
                S.Scheduler(make_spec("E"), memory_budget=2 << 30).key(sizes)]
    assert len({p1.key, *variants}) == len(variants) + 1
    small = S.Scheduler(spec, cache_size=2)
    a = small.plan([(300, 300)])
    small.plan([(301, 300)])
    small.plan([(302, 300)])
    assert small.plan([(300, 300)]) is not a  # evicted (LRU of 2)


def test_summary_names_views_batches_memory():
    plan = S.make_plan(make_spec("D"), [(480, 640), (640, 480), (333, 500)], method="dense+multicrop",
                       memory_budget=3 << 30)
    text = plan.summary()
    assert plan.key in text and f"{len(plan.views)} views" in text
    assert f"{len(plan.batches)} batches" in text and "peak activation memory" in text
    assert len(text.splitlines()) <= 4 + 12 + 1 and str(plan) == text


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(scales=(200,)), ArgumentError, "native size 224"),
    (dict(scales=()), ArgumentError, "no scales"),
    (dict(scales=("big",)), ArgumentError, "integer"),
    (dict(method="tencrop"), ArgumentError, "unknown method"),
    (dict(method="multicrop", crop=160), ArgumentError, "crop >= 224"),
    (dict(method="multicrop", scales=(256,), crop=300), ArgumentError, "scales >= 300"),
    (dict(method="multicrop", grid=0), ArgumentError, "grid"),
    (dict(sizes=[]), ArgumentError, "no images"),
    (dict(sizes=[(0, 10)]), ArgumentError, "image 0 (0x10, HxW) is out of range"),
    (dict(sizes=[(10,)]), ArgumentError, "(height, width)"),
    (dict(keep=["conv9_9"]), ArgumentError, "cannot keep"),
    (dict(max_batch=-1), ArgumentError, "max_batch"),
    (dict(elem_size=0), ArgumentError, "element size"),
    (dict(align=3), ArgumentError, "power of two"),
    (dict(memory_budget=0), ArgumentError, "memory budget"),
    (dict(memory_budget=float("inf")), ArgumentError, "memory_budget"),
    (dict(sizes=[(10 ** 30, 5)]), ArgumentError, "out of range"),
    (dict(scales=(4096,), memory_budget=1 << 30), MemoryBudgetError, "memory_budget"),
    (dict(sizes=[(10, 100000)], scales=(224,), memory_budget=4 << 30), MemoryBudgetError,
     "image 0 (10x100000, HxW)"),
    (dict(scales=(1 << 40,)), ArgumentError, "out of range"),
    (dict(scales=(1 << 30,), memory_budget=(1 << 63) - 1), MemoryBudgetError, "more than 8 EiB"),
])
def test_errors_are_vggfast_errors(kwargs, exc, words):
    args = dict(sizes=[(480, 640)], scales=(256,), memory_budget=HUGE)
    args.update(kwargs)
    spec = make_spec("D")
    with pytest.raises(exc) as info:
        S.make_plan(spec, **args)
    assert isinstance(info.value, VGGFastError)
    msg = str(info.value)
    assert words in msg and "\n" not in msg


def test_shape_errors_give_the_input_size_as_hxw():
    """Every message that gives an image's size gives it H x W and says so, as the budget's do."""
    spec = make_spec("D")
    with pytest.raises(ArgumentError, match=r"^a 40x1 \(HxW\) input is too small for "):
        S.infer_shapes(spec, 40, 1)
    with pytest.raises(ArgumentError, match=r"^input size 0x40 \(HxW\) is out of range"):
        S.infer_shapes(spec, 0, 40)


def test_budget_error_names_the_limit_and_is_exact():
    spec = make_spec("D")
    need = single_view_bytes(spec, 512, 682)
    S.make_plan(spec, [(480, 640)], scales=(512,), flip=False, memory_budget=need)  # fits exactly
    with pytest.raises(MemoryBudgetError, match=f"at least {need} bytes"):
        S.make_plan(spec, [(480, 640)], scales=(512,), flip=False, memory_budget=need - 1)


def test_multicrop_refuses_a_rescaled_image_over_the_budget():
    # The crops are small, but the executor cuts them from the whole rescaled image (float32):
    # a huge Q used to pass every arena check and then allocate tens of GB on the host.
    spec = make_spec("D")
    sizes, q = [(100, 100), (480, 640)], 3000
    need = 3 * 3000 * 4000 * 4                       # image 1 rescaled to 3000x4000, float32
    crop_arena = single_view_bytes(spec, 224, 224)
    assert crop_arena < need
    plan = S.make_plan(spec, sizes, scales=(q,), method="multicrop", memory_budget=need)
    assert {(v.rescaled_h, v.rescaled_w) for v in plan.views} == {(3000, 3000), (3000, 4000)}
    for method in ("multicrop", "dense+multicrop"):
        with pytest.raises(MemoryBudgetError) as info:
            S.make_plan(spec, sizes, scales=(256, q), method=method, memory_budget=need - 1)
        msg = str(info.value)
        assert info.value.image == 1 and msg.startswith("image 1 (480x640, HxW) at scale 3000 is "
                                                        "rescaled to 3000x4000 to cut its crops: ")
        assert f"at least {need} bytes" in msg and "\n" not in msg
    with pytest.raises(MemoryBudgetError, match="more than 8 EiB"):   # saturated, not wrapped
        S.make_plan(spec, [(1, (1 << 31) - 1)], scales=(1 << 30,), method="multicrop",
                    memory_budget=(1 << 63) - 1)


def test_helpers_are_exact_at_int64_scale_or_refuse():
    # i * (size - crop) overflowed int64 for a rescaled panorama's side: negative crop origins.
    for size, crop, n in [(1 << 62, 224, 5), (1 << 62, 1, 64), ((1 << 63) - 1, 224, 63)]:
        assert S.crop_origins(size, crop, n) == tuple(i * (size - crop) // (n - 1)
                                                      for i in range(n))
    bad = [lambda: S.crop_origins(10 ** 12, 1, 10 ** 12),   # was std::bad_alloc (MemoryError)
           lambda: S.crop_origins(500, 224, 65),
           lambda: S.rescaled_size(1, (1 << 63) - 1, (1 << 63) - 1),  # was a saturated size
           lambda: S.infer_shapes(make_spec("D"), (1 << 63) - 1, 5),  # h + 2 * pad overflowed
           lambda: S.infer_shapes(make_spec("D"), -(1 << 63), 5),
           lambda: S.infer_shapes(make_spec("D"), 0, 5)]
    for f in bad:
        with pytest.raises(ArgumentError) as info:
            f()
        assert "\n" not in str(info.value)


def test_a_budget_past_int64_means_no_limit():
    spec = make_spec("D")
    for budget in (1e30, 1 << 64, 1 << 63):
        plan = S.make_plan(spec, [(480, 640)], scales=(256,), memory_budget=budget)
        assert plan.budget_bytes == (1 << 63) - 1 and len(plan.batches) == 1
    with pytest.raises(ArgumentError, match="memory_budget"):
        S.make_plan(spec, [(480, 640)], scales=(256,), memory_budget=float("inf"))


def test_requests_of_the_wrong_kind_are_argument_errors():
    spec = make_spec("D")
    for kwargs in (dict(sizes=None), dict(sizes=5), dict(sizes="480x640"),
                   dict(kernel_table=[("conv", 1)])):
        args = dict(sizes=[(480, 640)], scales=(256,))
        args.update(kwargs)
        with pytest.raises(ArgumentError):   # was a TypeError from deep inside
            S.make_plan(spec, **args)
    # one tap name is that name, not its letters ("cannot keep 'f'")
    plan = S.make_plan(spec, [(480, 640)], scales=(256,), keep="fc7")
    assert plan.arenas[0].tensor("fc7").last == len(plan.ops) + 1


def test_summary_of_a_small_net_shows_bytes():
    spec = make_spec("D", 10, width=1 / 16, image_size=32)
    plan = S.make_plan(spec, [(36, 45)], scales=(36,), flip=False, memory_budget=60000)
    (arena,) = plan.arenas
    text = plan.summary()
    assert f"peak activation memory {arena.total_bytes} bytes" in text
    assert "budget 60000 bytes" in text and "0.0 MiB" not in text


def test_cache_is_keyed_by_the_request_not_by_its_hash(monkeypatch):
    # Plan.key is a 64-bit FNV-1a hash; two requests whose hashes collide must not share a plan.
    spec = make_spec("D")
    sch = S.Scheduler(spec, memory_budget=2 << 30)
    monkeypatch.setattr(S._C, "plan_key", lambda *args: "0" * 16)   # every request collides
    a = sch.plan([(480, 640)], scales=(256,))
    b = sch.plan([(640, 480)], scales=(256,))
    c = sch.plan([(480, 640)], scales=(256,), flip=False)
    assert len({a.views[0][7:9], b.views[0][7:9]}) == 2 and len(c.views) == 1
    assert sch.plan([[480, 640]], scales=256) is a          # the same request is still a hit


@pytest.mark.parametrize("field,value", [("k", 1 << 62), ("pad", 1 << 62), ("cout", 1 << 62),
                                         ("k", 1 << 32)])
def test_layer_sizes_past_int32_are_refused_not_wrapped(field, value):
    # h + 2 * pad and k * k overflowed int64: shapes "too small" by -9e18, flops of 0
    desc = dict(name="c", kind="conv", cin=3, cout=8, k=3, pad=1, relu=True, lrn=False, pool=False)
    desc[field] = value
    layers = [S._C.LayerDesc(**desc)]
    spec = make_spec("D")
    req = S._request([(300, 300)], (256,), False, "dense", None, 5)
    opt = S._options(spec, 2, HUGE, None, 0, True, 256, ())
    for call in (lambda: S._call(S._C.make_plan, layers, req, opt),
                 lambda: S._call(S._C.infer_shapes, layers, 300, 300)):
        with pytest.raises(ArgumentError, match="channels and kernel size must be 1.."):
            call()


@pytest.mark.parametrize("value", ["no", "false", "", 2, -1, 1.0, None],
                         ids=["no", "false", "empty", "2", "-1", "1.0", "None"])
def test_flip_and_fuse_pool_take_only_bools(value):
    """bool(flip) read "no", "false" and 2 as True: a request for no flips silently planned (and
    ran) the flipped views too, and fuse_pool="no" modelled a fused pool the backend lacks."""
    spec = make_spec("D")
    sch = S.Scheduler(spec, memory_budget=HUGE)
    for call in (lambda: sch.plan([(480, 640)], scales=(256,), flip=value),
                 lambda: sch.key([(480, 640)], scales=(256,), flip=value)):
        with pytest.raises(ArgumentError, match=r"^flip must be True or False, not ") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ArgumentError, match=r"^fuse_pool must be True or False, not "):
        S.Scheduler(spec, fuse_pool=value)


def test_flip_takes_numpy_bools():
    import numpy as np
    spec = make_spec("D")
    for value, views in ((np.False_, 1), (np.True_, 2), (False, 1), (True, 2)):
        plan = S.make_plan(spec, [(480, 640)], scales=(256,), flip=value, memory_budget=HUGE,
                           fuse_pool=np.bool_(True))
        assert plan.flip is bool(value) and len(plan.views) == views


def test_an_empty_plan_is_checked_as_a_plan_of_images():
    spec = make_spec("D")
    sch = S.Scheduler(spec, memory_budget=2 << 30)
    plan = sch.empty_plan(scales=(256, 384), method="multicrop", flip=False)
    assert (plan.num_images, plan.views, plan.shapes, plan.batches, plan.peak_bytes) == \
        (0, (), (), (), 0)
    assert plan.key == sch.key([], scales=(256, 384), method="multicrop", flip=False)
    assert plan.ops == sch.plan([(480, 640)], scales=(256,)).ops
    for kwargs, words in ((dict(scales=(200,)), "native size 224"), (dict(scales=()), "no scales"),
                          (dict(method="multicrop", crop=300), "scales >= 300"),
                          (dict(keep=["conv9_9"]), "cannot keep"), (dict(flip="no"), "flip"),
                          (dict(method="tencrop"), "unknown method")):
        with pytest.raises(ArgumentError, match=words):
            sch.empty_plan(**{"scales": (256,), **kwargs})
    # a scale no image could be planned at within the budget is still a request of nothing
    assert sch.empty_plan(scales=(4096,)).peak_bytes == 0
    with pytest.raises(ArgumentError, match="no images"):
        sch.plan([], scales=(256,))     # plan itself still refuses: an empty plan is asked for
