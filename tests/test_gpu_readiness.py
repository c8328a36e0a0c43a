"""What of the GPU paths a CPU can check: a clear refusal without a GPU, one GPU per pipeline chunk (a fake device
list), and bf16 autocast in every mode, the pipeline's chunk processes included (they run without Lightning)."""

import pytest
import torch

from locallearn.errors import ConfigError
from locallearn.pipeline import limits
from locallearn.pipeline.worker import autocast
from locallearn.runner import build, train
from tests.test_pipeline import assert_same_state, checkpoint

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@NO_GPU
@pytest.mark.parametrize("overrides", [["trainer=gpu", "trainer.accelerator=gpu"],
                                       ["trainer.accelerator=gpu", "mode=pipeline", "chunks=2"]])
def test_asking_for_a_gpu_without_one_is_one_sentence(make_cfg, overrides):
    with pytest.raises(ConfigError) as e:
        build(make_cfg(*overrides))
    assert "trainer.accelerator=gpu asks for a GPU, but this torch" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs (what the pipeline sees of them)."""
    def visible(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


def test_each_pipeline_chunk_gets_its_own_gpu(gpus):
    gpus(4)
    assert limits.worker_devices(2, "gpu") == ["cuda:0", "cuda:1"]
    assert limits.worker_devices(4, "auto") == [f"cuda:{k}" for k in range(4)]
    assert limits.worker_devices(4, "cpu") == ["cpu"] * 4  # trainer=cpu keeps every chunk on the CPU
    gpus(1)
    with pytest.raises(ConfigError, match=r"chunks=2 chunks on its own GPU but 1 is visible; use chunks<=1"):
        limits.worker_devices(2, "gpu")
    gpus(0)
    assert limits.worker_devices(2, "auto") == ["cpu", "cpu"]


def test_nccl_needs_gpus(make_cfg):
    with pytest.raises(ConfigError, match="pipeline.backend=nccl moves tensors between GPUs"):
        build(make_cfg("mode=pipeline", "chunks=2", "pipeline.backend=nccl", "trainer.accelerator=cpu"))


def test_worker_autocast_is_lightnings_bf16_mixed():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("bf16-mixed", torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16
    with autocast("32-true", torch.device("cpu")):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # mixed: the weights (and Adam's state) stay float32


def test_bf16_mixed_runs_the_same_updates_in_every_mode(make_cfg):
    """trainer.precision=bf16-mixed (what trainer=gpu sets) on the CPU: matmuls in bf16 in the chunk processes of a
    pipeline as in Lightning's process, so the pipeline still makes sequential's updates exactly; joint agrees to
    bf16 rounding (its one backward adds the chunks' gradients in another order)."""
    bf16 = ["chunks=2", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"]
    seq, pipe, joint, fp32 = (make_cfg(*bf16, "mode=sequential"), make_cfg(*bf16, "mode=pipeline"),
                              make_cfg(*bf16, "mode=joint"), make_cfg("chunks=2", "mode=sequential"))
    seq_summary, pipe_summary, joint_summary, fp32_summary = train(seq), train(pipe), train(joint), train(fp32)
    assert pipe_summary["val_loss"] == pytest.approx(seq_summary["val_loss"], abs=1e-6)
    assert_same_state(checkpoint(seq), checkpoint(pipe))
    assert joint_summary["val_loss"] == pytest.approx(seq_summary["val_loss"], abs=2e-2)
    # and bf16 really ran: float32 training gives other losses
    assert fp32_summary["val_loss"] != pytest.approx(seq_summary["val_loss"], abs=1e-4)
