"""How torch uses the CPU (dreambooth.cpu): threads beside busy processes, the convolution
backend for tiny inputs, and what a training run records of them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

import dreambooth.cpu as cpu
from conftest import tiny_config
from dreambooth.train.checkpointing import list_checkpoints, read_checkpoint
from dreambooth.train.run import THREADS_KEY, train

BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def test_threads_beside_other_load():
    assert cpu.threads_beside(None, 2) == 2  # unknown: torch's default
    assert cpu.threads_beside(0.0, 2) == 2
    assert cpu.threads_beside(0.2, 2) == 2  # background noise is not a busy core
    assert cpu.threads_beside(0.5, 2) == 1  # half a core taken already costs a spinning thread
    assert cpu.threads_beside(1.0, 2) == 1
    assert cpu.threads_beside(7.5, 2) == 1  # never none
    assert cpu.threads_beside(1.0, 16) == 15


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")
@pytest.mark.parametrize("niceness, busy", [(0, True), (19, False)])
def test_load_meter_counts_busy_processes_but_not_niced_ones(niceness, busy):
    meter = cpu.LoadMeter()
    child = subprocess.Popen(["nice", "-n", str(niceness), sys.executable, "-c",
                              BUSY_LOOP.format(seconds=0.8)])
    child.wait()
    others = meter.other_cores()
    assert others is not None
    if busy or not cpu._nice_yields():  # under autogroups a niced process competes
        assert others >= 0.5, f"a busy child measured as {others:.2f} cores"
    else:
        assert others < 0.5, f"a niced child measured as {others:.2f} cores"


def test_load_meter_does_not_count_this_process():
    # Against what the others used just before, so that a busy machine does not fail it: this
    # process's own core must not show (it would add about 1).
    before = cpu.LoadMeter()
    time.sleep(0.5)
    others_before = before.other_cores()
    meter = cpu.LoadMeter()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # this process keeps one core busy
        pass
    assert meter.other_cores() < others_before + 0.5


def test_adaptive_threads_restore_the_count_and_respect_the_user(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu.LoadMeter, "other_cores", lambda self, restart=True: 5.0)
    with cpu.adaptive_threads() as threads:
        if threads.enabled:
            threads.before_batch()
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    with cpu.adaptive_threads() as threads:
        threads.before_batch()
        assert not threads.enabled and torch.get_num_threads() == before


def test_native_convolution_only_for_tiny_fp32_cpu_batches():
    assert cpu.use_native_conv(2 * 16 * 16, "cpu", torch.float32)
    assert not cpu.use_native_conv(8 * 16 * 16, "cpu", torch.float32)
    assert not cpu.use_native_conv(2 * 16 * 16, "cpu", torch.bfloat16)
    assert not cpu.use_native_conv(2 * 16 * 16, "cuda", torch.float32)
    was = torch.backends.mkldnn.enabled
    with cpu.conv_backend_for(512, "cpu", torch.float32):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == was


def test_native_and_onednn_convolutions_agree():
    """The backend choice changes speed, not results (beyond float rounding)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    grads = []
    for enabled in (True, False):
        with torch.backends.mkldnn.flags(enabled=enabled):
            conv.zero_grad()
            x.grad = None
            out = conv(x)
            out.square().mean().backward()
        grads.append((out.detach(), x.grad.clone(), conv.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class RecordThreads(L.Callback):
    def __init__(self):
        self.seen: set[int] = set()
        self.mkldnn_in_step: set[bool] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.add(torch.get_num_threads())

    def on_before_backward(self, trainer, pl_module, loss):
        self.mkldnn_in_step.add(torch.backends.mkldnn.enabled)


def test_training_beside_a_busy_machine_uses_fewer_threads_then_restores(
        tmp_path, tiny_model, instance_dir, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr(cpu.LoadMeter, "other_cores", lambda self, restart=True: 1.0)
    before = torch.get_num_threads()
    recorder = RecordThreads()
    train(tiny_config(tiny_model, instance_dir, tmp_path / "out", max_train_steps=2,
                      num_threads=None), callbacks=[recorder])
    assert recorder.seen == {1}
    assert recorder.mkldnn_in_step == {False}  # 2 x 8 x 8 latents: ATen's native convolution
    assert torch.get_num_threads() == before and torch.backends.mkldnn.enabled


def test_resumed_run_keeps_the_thread_count_of_its_checkpoint(tmp_path, tiny_model,
                                                              instance_dir):
    output = tmp_path / "out"
    common = dict(max_train_steps=4, checkpointing_steps=2)

    class StopAfter(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    with pytest.raises(SystemExit):
        train(tiny_config(tiny_model, instance_dir, output, num_threads=1, **common),
              callbacks=[StopAfter()])
    _, checkpoint = list_checkpoints(output / "checkpoints")[-1]
    assert read_checkpoint(checkpoint)[THREADS_KEY] == 1
    recorder = RecordThreads()
    train(tiny_config(tiny_model, instance_dir, output, resume_from_checkpoint="latest",
                      num_threads=None, **common), callbacks=[recorder])
    assert recorder.seen == {1}


def test_choosing_the_backend_prints_nothing():
    """torch.backends.mkldnn.flags() also sets oneDNN's TF32 flag, which warns once per process;
    the backend switch must not (users saw the warning in every run's output)."""
    code = ("import torch, dreambooth.cpu as cpu\n"
            "with cpu.conv_backend_for(64, 'cpu', torch.float32):\n"
            "    torch.nn.functional.conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3))\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "TF32" not in done.stderr, done.stderr[-500:]
