"""Versions vggfast meets on users' machines: an old triton (torch 2.4-2.9 bring 3.0-3.5), and
triton 3.6's interpreter under numpy >= 2.4."""
import sys

import pytest
import torch

import vggfast
from conftest import small_model
from vggfast import engine as E
from vggfast import triton_backend as TB
from vggfast.errors import VGGFastError

triton = pytest.importorskip("triton", reason="triton is not installed")


def _ops():
    return pytest.importorskip("vggfast.ops", reason="the kernels do not import here",
                               exc_type=ImportError)


@pytest.fixture
def old_triton(monkeypatch):
    """triton 3.2 as far as vggfast.ops can tell, with the imported ops module set aside (and
    put back afterwards) so that importing it runs its version check again."""
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.delitem(sys.modules, "vggfast.ops", raising=False)
    monkeypatch.delattr(vggfast, "ops", raising=False)


def test_versions_parse():
    _triton_version = _ops()._triton_version
    assert _triton_version("3.6.0") == (3, 6)
    assert _triton_version("3.10.1+git1234abcd") == (3, 10)
    assert _triton_version("3.7.0rc2") == (3, 7)
    assert _triton_version("3.5.1") < (3, 6) <= _triton_version("3.6.0")


def test_an_old_triton_is_one_clear_error_for_backend_triton(old_triton):
    """The kernels' import failed deep in triton.autotune (a TypeError traceback) on triton 3.2."""
    assert "triton >= 3.6, this is triton 3.2.0" in TB.unavailable()
    with pytest.raises(VGGFastError, match=r"unavailable here \(.*3\.2\.0\); install triton "
                                           r">= 3\.6 or use backend='torch'"):
        vggfast.Engine(small_model().state_dict(), backend="triton")


def test_auto_runs_on_cudnn_with_a_warning_when_the_kernels_cannot(old_triton):
    E._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"Triton kernels are unavailable .*3\.2\.0.*torch"):
        assert E._choose_backend("auto", torch.device("cuda", 0)) == "torch"
    assert E._choose_backend("auto", torch.device("cpu")) == "torch"
    assert E._choose_backend("triton", torch.device("cuda", 0)) == "triton"


def test_auto_is_triton_on_cuda_where_the_kernels_import():
    _ops()
    assert E._choose_backend("auto", torch.device("cuda", 0)) == "triton"


def test_run_time_loop_bounds_work_under_the_interpreter():
    """Triton 3.6's interpreter turned a scalar into a Python int with int(1-element array),
    which numpy 2.4 refuses: every kernel with run-time loop bounds failed. vggfast.ops patches
    the interpreter; this kernel's loop bounds are run-time values, as the conv kernel's are."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("an interpreter check (TRITON_INTERPRET=1 on a CPU machine)")
    import triton.language as tl
    _ops()                                # applies the patch

    @triton.jit
    def sum_range(out_ptr, lo, hi):
        acc = 0
        for i in range(lo, hi):
            acc += i
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    sum_range[(1,)](out, 3, 10)
    assert out.item() == sum(range(3, 10))
