"""Freed CPU memory kept in the process during training (lmpipe.training.host_memory)."""

from __future__ import annotations

import logging
import os
import resource

import numpy as np
import pytest
import torch

from lmpipe.data.batches import window_batches
from lmpipe.runs.config import HardwareConfig, TrainConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training import host_memory
from lmpipe.training import loop as train_module

CAUSAL_LM = CausalLM()

# Above glibc's largest adaptive mmap threshold (32 MiB): without retention every
# allocation of this size is a fresh mapping whose pages fault on first touch.
BIG = 64 * 2**20


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def faults_of_allocations(times: int) -> int:
    """Page faults of allocating, touching and freeing a BIG tensor `times` times."""
    before = page_faults()
    for _ in range(times):
        tensor = torch.empty(BIG // 4)
        tensor.fill_(1.0)
        del tensor
    return page_faults() - before


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc's mallopt")
def test_retention_makes_repeated_allocations_fault_free_and_gives_memory_back() -> None:
    plain = faults_of_allocations(4)
    with host_memory.retained_host_memory() as active:
        assert active
        # The heap grows for the first few: each aligned request is a little larger than
        # the chunk freed before it, until freed neighbours coalesce (a few BIGs at most).
        faults_of_allocations(10)
        retained = faults_of_allocations(4)
        resident_inside = resident_bytes()  # the freed BIG tensor is still held
    resident_after = resident_bytes()
    assert plain > 0
    assert retained * 20 < plain, (retained, plain)
    assert resident_inside - resident_after > BIG // 2  # handed back on exit
    # Outside the block, big allocations are mappings again.
    assert faults_of_allocations(2) > retained


def test_without_glibc_training_goes_on_without_retention(monkeypatch, caplog) -> None:
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    with (
        caplog.at_level(logging.INFO, "lmpipe.training.host_memory"),
        host_memory.retained_host_memory() as active,
    ):
        assert not active
    assert "not retained" in caplog.text
    with host_memory.retained_host_memory(enabled=False) as active:
        assert not active


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_training_runs_inside_retention_unless_turned_off(
    monkeypatch, tiny_model, retain: bool
) -> None:
    states: list[bool] = []
    real = host_memory.retained_host_memory

    def recording(enabled: bool = True):
        states.append(enabled)
        return real(enabled)

    monkeypatch.setattr(train_module, "retained_host_memory", recording)
    tokens = np.arange(2000, dtype=np.uint16) % 50
    cfg = TrainConfig(steps=2, batch_size=2)
    hardware = HardwareConfig(retain_host_memory=retain)
    result = train_module.train(
        tiny_model, window_batches(tokens, 16, 2, 0), cfg, hardware, torch.device("cpu"),
        MetricLogger(None), objective=CAUSAL_LM
    )  # fmt: skip
    assert result.steps == 2
    assert states == [retain]
