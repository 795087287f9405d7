"""The LR schedule is counted in optimizer updates under every distributed type.

accelerate wraps the scheduler a run prepares in `AcceleratedScheduler`, which steps it once per process and update
(DDP, FSDP, and DeepSpeed too: accelerate hands a client scheduler to DeepSpeed's engine only when it is one of
DeepSpeed's own classes, and diffusers' schedules are torch LambdaLRs). `make_lr_scheduler` stretches the schedule by
the same count, so that after k updates the LR is the 1-process schedule's after k updates. The oracle here is
accelerate's own `AcceleratedScheduler` stepping the built scheduler, compared with the closed form of the schedule.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from d3.training_setup import make_lr_scheduler, scheduler_steps_per_update

LR, WARMUP, TOTAL = 1e-3, 3, 10


def plain_linear(update: int) -> float:
    """diffusers' "linear" schedule in closed form: the LR after `update` updates of a 1-process run."""
    return LR * (update / WARMUP if update < WARMUP else max(0.0, (TOTAL - update) / (TOTAL - WARMUP)))


# (distributed type, what accelerate's state reports as num_processes): 8 GPUs under each type, and DeepSpeed on
# 2 CPU processes, where accelerate reports 1 per rank while DeepSpeed's group has 2 (measured with
# `accelerate launch --config_file configs/deepspeed_zero2.yaml --num_processes 2` on this machine).
CASES = [(DistributedType.NO, 1), (DistributedType.MULTI_CPU, 2), (DistributedType.MULTI_GPU, 8),
         (DistributedType.FSDP, 8), (DistributedType.DEEPSPEED, 8), (DistributedType.DEEPSPEED, 1)]


@pytest.mark.quick
@pytest.mark.parametrize("distributed_type, num_processes", CASES, ids=lambda v: str(v).split(".")[-1])
def test_lr_after_each_update_is_the_one_process_schedule(distributed_type, num_processes, monkeypatch):
    import accelerate.scheduler
    from accelerate.scheduler import AcceleratedScheduler

    accelerator = SimpleNamespace(distributed_type=distributed_type, num_processes=num_processes,
                                  split_batches=False, step_scheduler_with_optimizer=True)
    args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=WARMUP, max_train_steps=TOTAL)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    scheduler = make_lr_scheduler(optimizer, args, accelerator)
    # accelerate's wrapper, reading num_processes from its (here: faked) process-wide state, as in a prepared run
    monkeypatch.setattr(accelerate.scheduler, "AcceleratorState", lambda: SimpleNamespace(num_processes=num_processes))
    wrapped = AcceleratedScheduler(scheduler, [SimpleNamespace(step_was_skipped=False)])
    wrapped.gradient_state = SimpleNamespace(sync_gradients=True, adjust_scheduler=False)
    seen = []
    for _ in range(TOTAL):
        optimizer.step()  # no gradient: nothing moves; the scheduler follows an optimizer step, as in training
        wrapped.step()
        seen.append(wrapped.get_last_lr()[0])
    assert seen == pytest.approx([plain_linear(k) for k in range(1, TOTAL + 1)], rel=1e-12, abs=1e-15)


@pytest.mark.quick
def test_split_batches_step_once_per_update():
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=8, split_batches=True,
                                  step_scheduler_with_optimizer=True)
    assert scheduler_steps_per_update(accelerator) == 1


@pytest.mark.quick
def test_deepspeed_engine_never_steps_the_schedule_d3_builds():
    """The premise of the DeepSpeed rows above: accelerate passes a scheduler to `deepspeed.initialize` (whose engine
    would step it once per update) only when its class is one of DeepSpeed's; otherwise it wraps it in
    AcceleratedScheduler (accelerate's `_prepare_deepspeed`, read in 1.0, 1.5, 1.10, 1.13, 1.15 and main)."""
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    args = SimpleNamespace(lr_scheduler="constant_with_warmup", lr_warmup_steps=2, max_train_steps=4)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1, split_batches=False,
                                  step_scheduler_with_optimizer=True)
    scheduler = make_lr_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), args, accelerator)
    assert type(scheduler).__name__ not in lr_schedules.VALID_LR_SCHEDULES
