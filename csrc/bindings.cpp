// pybind11 bindings of the planner -> vggfast._scheduler. No logic here: structs and functions
// from plan.hpp, and the error types (vggfast/scheduler.py maps them onto vggfast.errors).
// The `*_rows` properties hand whole tables over as lists of tuples: a plan holds thousands of
// records, and one attribute access per field from Python would cost more than planning.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "plan.hpp"

namespace py = pybind11;
using namespace vggfast;

PYBIND11_MODULE(_scheduler, m) {
    m.doc() = "vggfast's C++ planner: views, shapes, batches and activation arenas for a request";

    // The Python exceptions carry args (message, image, reason): image -1 when the error is not
    // about one image of the request (see PlanError). The types live as long as the module.
    static PyObject* plan_error = nullptr;
    static PyObject* argument_error = nullptr;
    static PyObject* budget_error = nullptr;
    plan_error = py::exception<PlanError>(m, "PlanError").release().ptr();
    argument_error = py::exception<ArgumentError>(m, "PlanArgumentError", plan_error).release().ptr();
    budget_error = py::exception<BudgetError>(m, "PlanBudgetError", plan_error).release().ptr();
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const PlanError& e) {
            PyObject* type = dynamic_cast<const BudgetError*>(&e)     ? budget_error
                             : dynamic_cast<const ArgumentError*>(&e) ? argument_error
                                                                      : plan_error;
            py::tuple args = py::make_tuple(e.what(), e.image(), e.reason());
            PyErr_SetObject(type, args.ptr());
        }
    });

    py::class_<LayerDesc>(m, "LayerDesc")
        .def(py::init<>())
        .def(py::init([](std::string name, std::string kind, int64_t cin, int64_t cout, int64_t k,
                         int64_t pad, bool relu, bool lrn, bool pool) {
                 return LayerDesc{std::move(name), std::move(kind), cin, cout, k, pad,
                                  relu, lrn, pool};
             }),
             py::arg("name"), py::arg("kind"), py::arg("cin"), py::arg("cout"), py::arg("k"),
             py::arg("pad"), py::arg("relu"), py::arg("lrn"), py::arg("pool"))
        .def_readwrite("name", &LayerDesc::name)
        .def_readwrite("kind", &LayerDesc::kind)
        .def_readwrite("cin", &LayerDesc::cin)
        .def_readwrite("cout", &LayerDesc::cout)
        .def_readwrite("k", &LayerDesc::k)
        .def_readwrite("pad", &LayerDesc::pad)
        .def_readwrite("relu", &LayerDesc::relu)
        .def_readwrite("lrn", &LayerDesc::lrn)
        .def_readwrite("pool", &LayerDesc::pool);

    py::class_<Request>(m, "Request")
        .def(py::init<>())
        .def_readwrite("images", &Request::images)
        .def_readwrite("scales", &Request::scales)
        .def_readwrite("flip", &Request::flip)
        .def_readwrite("method", &Request::method)
        .def_readwrite("crop", &Request::crop)
        .def_readwrite("grid", &Request::grid);

    py::class_<Options>(m, "Options")
        .def(py::init<>())
        .def_readwrite("native_size", &Options::native_size)
        .def_readwrite("elem_size", &Options::elem_size)
        .def_readwrite("budget", &Options::budget)
        .def_readwrite("align", &Options::align)
        .def_readwrite("max_batch", &Options::max_batch)
        .def_readwrite("fuse_pool", &Options::fuse_pool)
        .def_readwrite("keep", &Options::keep)
        .def_readwrite("kernel_table", &Options::kernel_table);

    py::class_<View>(m, "View")
        .def_readonly("image", &View::image)
        .def_readonly("scale", &View::scale)
        .def_readonly("flip", &View::flip)
        .def_readonly("cropped", &View::cropped)
        .def_readonly("x0", &View::x0)
        .def_readonly("y0", &View::y0)
        .def_readonly("x1", &View::x1)
        .def_readonly("y1", &View::y1)
        .def_readonly("rescaled_h", &View::rescaled_h)
        .def_readonly("rescaled_w", &View::rescaled_w)
        .def_readonly("height", &View::height)
        .def_readonly("width", &View::width)
        .def_readonly("shape", &View::shape)
        .def_readonly("batch", &View::batch)
        .def_readonly("slot", &View::slot);

    py::class_<LayerShape>(m, "LayerShape")
        .def_readonly("name", &LayerShape::name)
        .def_readonly("channels", &LayerShape::channels)
        .def_readonly("conv_h", &LayerShape::conv_h)
        .def_readonly("conv_w", &LayerShape::conv_w)
        .def_readonly("out_h", &LayerShape::out_h)
        .def_readonly("out_w", &LayerShape::out_w);

    py::class_<ShapeInfo>(m, "ShapeInfo")
        .def_readonly("height", &ShapeInfo::height)
        .def_readonly("width", &ShapeInfo::width)
        .def_readonly("layers", &ShapeInfo::layers)
        .def_property_readonly("layer_rows", [](const ShapeInfo& s) {
            std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t>> r;
            r.reserve(s.layers.size());
            for (const LayerShape& l : s.layers)
                r.emplace_back(l.name, l.channels, l.conv_h, l.conv_w, l.out_h, l.out_w);
            return r;
        })
        .def_readonly("out_h", &ShapeInfo::out_h)
        .def_readonly("out_w", &ShapeInfo::out_w);

    py::class_<Tensor>(m, "Tensor")
        .def_readonly("name", &Tensor::name)
        .def_readonly("n", &Tensor::n)
        .def_readonly("c", &Tensor::c)
        .def_readonly("h", &Tensor::h)
        .def_readonly("w", &Tensor::w)
        .def_readonly("bytes", &Tensor::bytes)
        .def_readonly("offset", &Tensor::offset)
        .def_readonly("first", &Tensor::first)
        .def_readonly("last", &Tensor::last);

    py::class_<Op>(m, "Op")
        .def_readonly("kind", &Op::kind)
        .def_readonly("layer", &Op::layer)
        .def_readonly("input", &Op::input)
        .def_readonly("output", &Op::output)
        .def_readonly("relu", &Op::relu)
        .def_readonly("pool", &Op::pool)
        .def_readonly("config", &Op::config)
        .def_readonly("config_key", &Op::config_key);

    py::class_<Arena>(m, "Arena")
        .def_readonly("n", &Arena::n)
        .def_readonly("height", &Arena::height)
        .def_readonly("width", &Arena::width)
        .def_readonly("tensors", &Arena::tensors)
        .def_property_readonly("tensor_rows", [](const Arena& a) {
            std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t>> r;
            r.reserve(a.tensors.size());
            for (const Tensor& t : a.tensors)
                r.emplace_back(t.name, t.n, t.c, t.h, t.w, t.bytes, t.offset, t.first, t.last);
            return r;
        })
        .def_readonly("total_bytes", &Arena::total_bytes)
        .def_readonly("lower_bound_bytes", &Arena::lower_bound_bytes)
        .def_readonly("naive_bytes", &Arena::naive_bytes)
        .def_readonly("strategy", &Arena::strategy)
        .def_readonly("flops", &Arena::flops);

    py::class_<Batch>(m, "Batch")
        .def_readonly("height", &Batch::height)
        .def_readonly("width", &Batch::width)
        .def_readonly("views", &Batch::views)
        .def_readonly("arena", &Batch::arena);

    py::class_<Plan>(m, "Plan")
        .def_readonly("key", &Plan::key)
        .def_readonly("views", &Plan::views)
        .def_property_readonly("view_rows", [](const Plan& p) {
            // the fields of vggfast.scheduler.View, in its order
            py::list r(p.views.size());
            for (size_t i = 0; i < p.views.size(); ++i) {
                const View& v = p.views[i];
                py::object crop = v.cropped ? py::object(py::make_tuple(v.x0, v.y0, v.x1, v.y1))
                                            : py::object(py::none());
                r[i] = py::make_tuple(i, v.image, v.scale, v.flip, crop, v.rescaled_h,
                                      v.rescaled_w, v.height, v.width, v.shape, v.batch, v.slot);
            }
            return r;
        })
        .def_readonly("shapes", &Plan::shapes)
        .def_readonly("batches", &Plan::batches)
        .def_readonly("arenas", &Plan::arenas)
        .def_readonly("ops", &Plan::ops)
        .def_readonly("peak_bytes", &Plan::peak_bytes)
        .def_readonly("naive_bytes", &Plan::naive_bytes)
        .def_readonly("budget_bytes", &Plan::budget_bytes)
        .def_readonly("elem_size", &Plan::elem_size);

    m.def("rescaled_size", &rescaled_size, py::arg("h"), py::arg("w"), py::arg("q"));
    m.def("crop_origins", &crop_origins, py::arg("size"), py::arg("crop"), py::arg("n"));
    m.def("infer_shapes", &infer_shapes, py::arg("layers"), py::arg("h"), py::arg("w"));
    m.def("build_ops", &build_ops, py::arg("layers"), py::arg("options"));
    m.def("layout_arena", &layout_arena, py::arg("layers"), py::arg("n"), py::arg("h"),
          py::arg("w"), py::arg("options"));
    m.def("plan_key", &plan_key, py::arg("layers"), py::arg("request"), py::arg("options"));
    // The GIL stays held: planning takes about a millisecond, and releasing it around this call
    // crashed (segfault) under Python 3.12 with the GPU image's pybind11.
    m.def("make_plan", &make_plan, py::arg("layers"), py::arg("request"), py::arg("options"));
}
