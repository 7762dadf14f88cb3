"""devices.check_device: a device that does not exist here is a one-line ArgumentError naming what
does, at every entry point (Engine, FeatureExtractor, --device of classify / train / extract).
CUDA is faked where a case needs it, so every case runs on a CPU-only machine."""
import re
import socket

import pytest
import torch

import vggfast
from conftest import small_model
from vggfast.cli import main
from vggfast.devices import check_device
from vggfast.errors import ArgumentError


def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def refused(device, match, **kw):
    with pytest.raises(ArgumentError, match=match) as exc:
        check_device(device, **kw)
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("device", ["cpu:1", "cpu:7", torch.device("cpu", 1)])
def test_a_cpu_other_than_0_is_refused(monkeypatch, device):
    fake_gpus(monkeypatch, 0)
    msg = refused(device, r"does not exist: the CPU is 'cpu'")
    assert msg.endswith("this machine has cpu and no CUDA device"), msg


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)])
def test_the_cpu_is_cpu(monkeypatch, device):
    fake_gpus(monkeypatch, 0)
    assert check_device(device) == torch.device("cpu")  # index-free, as CPU tensors report it


@pytest.mark.parametrize("device", ["cuda:2", "cuda:9", torch.device("cuda", 2), 2])
def test_a_gpu_past_the_last_is_refused(monkeypatch, device):
    fake_gpus(monkeypatch, 2)
    msg = refused(device, r"does not exist; this machine has cpu, cuda:0, cuda:1$")
    assert msg.startswith(f"device {device!r}"), msg
    assert check_device("cuda:1") == check_device(1) == torch.device("cuda", 1)


def test_a_bare_cuda_is_this_process_gpu_and_must_exist(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert check_device("cuda", cuda_index=1) == torch.device("cuda", 1)
    assert check_device(None, cuda_index=1) == torch.device("cuda", 1)
    refused("cuda", r"^device cuda:3 \(LOCAL_RANK 3\) does not exist; this machine has cpu, "
                    r"cuda:0, cuda:1$", cuda_index=3)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), 0])
def test_cuda_without_cuda_is_refused(monkeypatch, device):
    fake_gpus(monkeypatch, 0)
    refused(device, r"requested but CUDA is not available; this machine has cpu and no CUDA "
                    r"device$")


@pytest.mark.parametrize("device", ["gpu", "tpu", "CPU", "cuda:x", "cuda:", "cuda:-1", "",
                                    " cpu", "cpu:0:1", "cuda:01"])
def test_malformed_and_unknown_names_are_refused(monkeypatch, device):
    fake_gpus(monkeypatch, 1)
    refused(device, rf"^unknown device {re.escape(repr(device))}; use 'cpu', 'cuda' or 'cuda:N' "
                    r"\(this machine has cpu, cuda:0\)$")


def test_mps_without_metal_and_other_device_types_are_refused(monkeypatch):
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for d in ("mps", torch.device("mps")):
        refused(d, r"^device .*mps.* does not exist here \(no Metal/MPS\); this machine has cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    refused("mps", r"is not one vggfast runs on \(cpu or cuda\)")  # there, but no backend for it
    for d in ("meta", "xpu", torch.device("meta")):
        refused(d, r"is not one vggfast runs on \(cpu or cuda\); this machine has cpu")


@pytest.mark.parametrize("device", [True, 1.5, object(), ["cpu"]])
def test_other_kinds_of_value_are_refused(device):
    refused(device, r"^device must be a name such as 'cpu' or 'cuda:0' or a torch.device, not ")


# -- every entry point uses it -------------------------------------------------------------------

def test_engine_and_feature_extractor_refuse_cpu_1(monkeypatch):
    sd = small_model().state_dict()
    fake_gpus(monkeypatch, 0)
    for make in (lambda d: vggfast.Engine(sd, device=d),
                 lambda d: vggfast.FeatureExtractor(sd, layers=["relu2_2"], device=d)):
        with pytest.raises(ArgumentError, match="^device 'cpu:1' does not exist"):
            make("cpu:1")
        with pytest.raises(ArgumentError, match=r"^device device\(type='cuda', index=0\) "
                                                "requested but CUDA is not available"):
            make(torch.device("cuda", 0))
    assert vggfast.Engine(sd, device="cpu:0").device == torch.device("cpu")


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(small_model().state_dict(), path)
    return str(path)


def _one_line_exit_2(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vggfast: error: {match}"), err


def test_cli_device_flags_refuse_cpu_1(weights_file, tmp_path, samples, capsys):
    _one_line_exit_2(["classify", str(samples["cat"]), "--weights", weights_file,
                      "--device", "cpu:1"], capsys, "device 'cpu:1' does not exist")
    (tmp_path / "data" / "a").mkdir(parents=True)
    _one_line_exit_2(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                      "--device", "mps:0"], capsys, "device 'mps:0'")
    _one_line_exit_2(["extract", str(tmp_path), "--weights", weights_file, "--out",
                      str(tmp_path / "f.npy"), "--device", "cuda:x"], capsys,
                     "unknown device 'cuda:x'")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_extract_under_torchrun_checks_the_device_before_joining(weights_file, tmp_path,
                                                                 monkeypatch, capsys):
    """A bad --device is refused by every rank before init_process_group (a rank that joined
    waited there for the refused ones); "cpu:0" is the CPU, so gloo, not nccl, even with CUDA."""
    import torch.distributed as dist
    joined = []

    class Joined(Exception):
        pass

    def join(backend, *a, **k):
        joined.append(backend)
        raise Joined

    monkeypatch.setattr(dist, "init_process_group", join)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    argv = ["extract", str(tmp_path), "--weights", weights_file, "--out", str(tmp_path / "f.npy")]
    _one_line_exit_2(argv + ["--device", "cpu:1"], capsys, "device 'cpu:1' does not exist")
    assert joined == []
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.append(f"set {d}"))
    with pytest.raises(Joined):
        main(argv + ["--device", "cpu:0"])
    assert joined == ["gloo"]
