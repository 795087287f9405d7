"""One FSDP training step of a tiny Flux D³ model on CPU processes over gloo (tests/test_distributed.py launches it
with torchrun, 2 processes).

accelerate's FSDP plugin needs CUDA, so the model is wrapped here in raw `FullyShardedDataParallel` with the settings
of configs/fsdp_flux.yaml (FSDP1, FULL_SHARD, use_orig_params, one unit per Flux block). Everything else is the
project's own: the Accelerator (`make_accelerator`, a gloo group under --ddp_timeout), the model (`build_model`), the
data (`build_training_data`), one micro-batch (`run_micro_batch`: forward, agreement, backward), the logging
(`step_logs`) and the export (`export_predictor` from the full state dict gathered to rank 0, as accelerate's
`get_state_dict` gathers it under FSDP).

    torchrun --nproc_per_node 2 tests/fsdp_step_driver.py OUT -- <train_depth.py flags>

Each process writes OUT/rank<r>.json; rank 0 also writes OUT/init.safetensors and OUT/full_state.safetensors (the
gathered state before and after the step) and the inference folder OUT/export.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from diffusers.models.transformers.transformer_flux import (FluxSingleTransformerBlock,  # noqa: E402
                                                            FluxTransformerBlock)
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.fsdp import (FullStateDictConfig, FullyShardedDataParallel, ShardingStrategy,  # noqa: E402
                                    StateDictType)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy  # noqa: E402

import train_depth  # noqa: E402
from d3.objective import Objective  # noqa: E402
from d3.training import build_parser, run_micro_batch, step_logs  # noqa: E402
from d3.training_checkpoints import export_predictor  # noqa: E402
from d3.training_data import build_training_data, make_loader, step_generator  # noqa: E402
from d3.training_setup import build_model, make_accelerator, make_optimizer  # noqa: E402


def gather_full_state(fsdp) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (empty elsewhere): a collective. (accelerate also offloads to the CPU;
    with the parameters already there, FSDP1's offload crashed the process: SIGSEGV.)"""
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, config):
        return {k: v.detach().clone().contiguous() for k, v in fsdp.state_dict().items()}


def main() -> None:
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    recipe = train_depth.RECIPE
    args = build_parser(recipe).parse_args(argv)
    accelerator = make_accelerator(args, out)
    rank = accelerator.process_index
    set_seed(args.seed)  # as train() does before building the model
    model, experts, vae, prompt_embeds = build_model(args, accelerator.device, torch.float32)
    sources, probs, dataset, sampler = build_training_data(args, recipe, accelerator.num_processes, rank)
    loader = make_loader(dataset, sampler, args.dataloader_num_workers)

    fsdp = FullyShardedDataParallel(
        model, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True, device_id=torch.device("cpu"),
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                           transformer_layer_cls={FluxTransformerBlock, FluxSingleTransformerBlock}))
    optimizer = make_optimizer([p for p in fsdp.parameters() if p.requires_grad], args, accelerator.device)
    objective = Objective(recipe.task_loss, {t: getattr(args, f"lambda_{t}") for t in recipe.loss_weights},
                          args.lambda_task, args.lambda_align)
    init = gather_full_state(fsdp)

    sampler.set_epoch(0)
    grad_numel = []  # per micro-batch: gradient elements this process holds after its backward
    for micro_step, item in enumerate(loader, start=1):
        with accelerator.accumulate(fsdp):  # what train() runs: no_sync between updates unless sync_each_batch
            out_step, decision = run_micro_batch(accelerator, fsdp, model, (experts, vae, prompt_embeds), objective,
                                                 item["batch"], len(item["bad"]), args, recipe,
                                                 step_generator(args.seed, micro_step))
            grad_numel.append(sum(p.grad.numel() for p in fsdp.parameters() if p.grad is not None))
            if accelerator.sync_gradients:
                fsdp.clip_grad_norm_(args.max_grad_norm)  # what accelerator.clip_grad_norm_ calls under FSDP
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            break
    logs = step_logs(accelerator, out_step, item["batch"] is not None, decision.with_data, args.learning_rate,
                     {"bad_samples": decision.bad}, {})
    local_timestep = model.student_timestep  # outside forward: this process's view of its shard
    full_state = gather_full_state(fsdp)

    if rank == 0:
        save_file(init, str(out / "init.safetensors"))
        save_file(full_state, str(out / "full_state.safetensors"))
        export_predictor(out / "export", model, vae, prompt_embeds, args, recipe, full_state)
    group = dist.distributed_c10d._get_default_group()
    timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "logs": logs, "local_timestep_numel": local_timestep.numel(), "finite": decision.finite,
        "grad_numel": grad_numel,
        "sync_each_batch": accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False),
        "with_data": decision.with_data, "process_group_timeout": timeout}))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
