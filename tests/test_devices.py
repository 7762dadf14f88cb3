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
                                                                 monkeypatch, capsys, joins):
    """A bad --device is refused by every rank before init_process_group (a rank that joined
    waited there for the refused ones); "cpu:0" is the CPU, so gloo, not nccl, even with CUDA."""
    torchrun_env(monkeypatch, 1)
    argv = ["extract", str(tmp_path), "--weights", weights_file, "--out", str(tmp_path / "f.npy")]
    _one_line_exit_2(argv + ["--device", "cpu:1"], capsys, "device 'cpu:1' does not exist")
    assert joins == []
    fake_gpus(monkeypatch, 1)
    with pytest.raises(joins.Joined):
        main(argv + ["--device", "cpu:0"])
    assert joins == ["gloo"]


# -- torchrun: each rank its own GPU -------------------------------------------------------------

def torchrun_env(monkeypatch, rank, world=2, local_world=None):
    for k, v in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world,
                     LOCAL_WORLD_SIZE=world if local_world is None else local_world,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port()).items():
        monkeypatch.setenv(k, str(v))


def test_under_torchrun_a_command_line_gpu_index_is_refused_by_every_rank(monkeypatch):
    """One argv for every rank: `--device cuda:1` put both ranks of the node on GPU 1."""
    from vggfast.devices import rank_device
    fake_gpus(monkeypatch, 2)
    for rank in (0, 1):
        torchrun_env(monkeypatch, rank)
        for d in ("cuda:1", "cuda:0", torch.device("cuda", rank), rank):
            with pytest.raises(ArgumentError, match=r"^--device .* under torchrun puts all 2 "
                                                    r"ranks of this machine on one GPU; pass "
                                                    r"--device cuda \(each rank takes "
                                                    r"cuda:LOCAL_RANK\)"):
                rank_device(d, same_on_every_rank=True)
        for d in ("cuda", None, torch.device("cuda")):
            assert rank_device(d, same_on_every_rank=True) == torch.device("cuda", rank)
        assert rank_device("cpu", same_on_every_rank=True) == torch.device("cpu")


def test_a_library_caller_names_each_rank_its_own_gpu(monkeypatch):
    """fit(device=f"cuda:{local_rank}") is torch's own idiom: that index is this rank's GPU."""
    from vggfast.devices import rank_device
    fake_gpus(monkeypatch, 2)
    torchrun_env(monkeypatch, 1)
    assert rank_device("cuda:1", same_on_every_rank=False) == torch.device("cuda", 1)
    with pytest.raises(ArgumentError, match=r"^device 'cuda:0' is not this rank's GPU: 2 ranks "
                                            r"share this machine and LOCAL_RANK is 1; pass "
                                            r"'cuda' .* or 'cuda:1'$"):
        rank_device("cuda:0", same_on_every_rank=False)


def test_one_rank_per_machine_or_no_torchrun_keeps_any_gpu(monkeypatch):
    from vggfast.devices import rank_device
    fake_gpus(monkeypatch, 2)
    for same in (True, False):
        assert rank_device("cuda:1", same_on_every_rank=same) == torch.device("cuda", 1)
    torchrun_env(monkeypatch, 0, world=2, local_world=1)   # two machines, one rank each
    for same in (True, False):
        assert rank_device("cuda:1", same_on_every_rank=same) == torch.device("cuda", 1)


class _Calls(list):
    Joined: type


@pytest.fixture
def joins(monkeypatch):
    """init_process_group and set_device recorded, and the run stopped at the join."""
    import torch.distributed as dist
    calls = _Calls()

    class Joined(Exception):
        pass

    def join(backend, *a, **k):
        calls.append(backend)
        raise Joined

    monkeypatch.setattr(dist, "init_process_group", join)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(f"set {d}"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # train sets it on "CUDA"
    calls.Joined = Joined
    return calls


def test_extract_and_train_under_torchrun_refuse_a_gpu_index_before_joining(
        weights_file, tmp_path, monkeypatch, capsys, joins):
    fake_gpus(monkeypatch, 2)
    (tmp_path / "data" / "a").mkdir(parents=True)
    extract = ["extract", str(tmp_path), "--weights", weights_file, "--out",
               str(tmp_path / "f.npy")]
    train = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    for rank in (0, 1):
        torchrun_env(monkeypatch, rank)
        for argv in (extract, train):
            _one_line_exit_2(argv + ["--device", "cuda:1"], capsys,
                             "--device cuda:1 under torchrun puts all 2 ranks of this machine "
                             "on one GPU")
    assert joins == []
    with pytest.raises(joins.Joined):     # rank 1 of "--device cuda": its own GPU, nccl
        main(extract + ["--device", "cuda"])
    assert joins == ["set cuda:1", "nccl"]


def test_fit_under_torchrun_takes_cuda_local_rank_and_refuses_another_index(
        tmp_path, monkeypatch, joins):
    from vggfast.train import TrainOptions, fit
    fake_gpus(monkeypatch, 2)
    torchrun_env(monkeypatch, 1)
    (tmp_path / "data" / "a").mkdir(parents=True)
    opts = dict(data=str(tmp_path / "data"), out=str(tmp_path / "run"), quiet=True, workers=0)
    with pytest.raises(ArgumentError, match=r"^device 'cuda:0' is not this rank's GPU"):
        fit(TrainOptions(**opts, device="cuda:0"))
    assert joins == []
    with pytest.raises(joins.Joined):
        fit(TrainOptions(**opts, device="cuda:1"))
    assert joins == ["set cuda:1", "nccl"]
