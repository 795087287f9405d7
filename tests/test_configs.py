"""The accelerate configs in configs/ load as accelerate itself loads them (`accelerate launch --config_file`): known
keys only, and every DeepSpeed/FSDP option is one `accelerate launch` takes. Parsing only: none of them is run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def launch_args(path: Path):
    """The arguments `accelerate launch --config_file path train_depth.py` ends up with (nothing is started)."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "train_depth.py"])
    _validate_launch_command(args)  # fills the flags from the file, as accelerate launch does
    return parser, args


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "deepspeed_zero2.yaml", "fsdp_flux.yaml"])
def test_accelerate_accepts_the_config(name):
    path = CONFIGS / name
    raw = yaml.safe_load(path.read_text())
    text = path.read_text()  # the house style: comments on top saying how to use it
    assert text.startswith("# accelerate ") and f"accelerate launch --config_file configs/{name}" in text
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig) and config == ClusterConfig.from_yaml_file(str(path))
    assert config.mixed_precision == "bf16" and config.num_machines == 1 and config.num_processes == 8
    parser, args = launch_args(path)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    options = {action.dest for action in parser._actions}
    for section in ("deepspeed_config", "fsdp_config"):  # accelerate copies these keys onto launch flags
        unknown = set(raw.get(section) or {}) - options
        assert not unknown, f"{name}: {section} keys accelerate launch does not know: {sorted(unknown)}"


def test_multi_gpu_is_plain_ddp():
    config = load_config_from_file(str(CONFIGS / "multi_gpu.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.deepspeed_config == {} and config.fsdp_config == {}
    _, args = launch_args(CONFIGS / "multi_gpu.yaml")
    assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp


def test_deepspeed_zero2_options():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.deepspeed_config == {"zero_stage": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                                       "offload_optimizer_device": "none", "offload_param_device": "none",
                                       "zero3_init_flag": False}
    _, args = launch_args(CONFIGS / "deepspeed_zero2.yaml")
    assert args.use_deepspeed and args.zero_stage == 2 and args.gradient_clipping == 1.0
    assert args.gradient_accumulation_steps == 1 and args.offload_optimizer_device == "none"
    assert "tests/test_deepspeed.py" in (CONFIGS / "deepspeed_zero2.yaml").read_text()  # says where it is tested
