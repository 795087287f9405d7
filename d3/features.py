"""Alignment hooks: capture named internal representations of a stock diffusers model during its forward pass.

Forward hooks keep the model untouched (no hand-copied UNet), so the student, the frozen teacher and any
diffusers UNet configuration share one code path. Layers are named by their module path
(e.g. ``up_blocks.1.attentions.0``), which is unambiguous for every `block_out_channels`.

Layer sets for a UNet2DConditionModel:
- ``up`` (default, the official D³ choice): the mid block, then for every up block but the last the outputs of its
  layers except the last one, plus its upsampler's output (which replaces the last layer); for the last up block
  only its first layer. On SD 2.1 these are the 11 keys ``mid, us1 … us10`` (docs/protocols.md, "Training recipe").
- ``down``: every down-block layer output and every downsampler output.
- ``all``: ``down`` + the mid block + every up-block layer and upsampler.
A comma-separated list of module paths is accepted as well.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .flags import LAYER_SETS  # noqa: F401


def _block_layers(block: nn.Module) -> list[str]:
    """The per-layer output modules of a UNet block: the attention after each resnet where there is one."""
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions) == len(block.resnets):
        return [f"attentions.{j}" for j in range(len(attentions))]
    return [f"resnets.{j}" for j in range(len(block.resnets))]


def unet_layer_set(unet: nn.Module, name: str = "up") -> list[str]:
    """Module paths of a named layer set of a diffusers UNet2DConditionModel, in forward order."""
    down, up, up_full = [], ["mid_block"], ["mid_block"]
    for i, block in enumerate(unet.down_blocks):
        down += [f"down_blocks.{i}.{layer}" for layer in _block_layers(block)]
        if getattr(block, "downsamplers", None) is not None:
            down.append(f"down_blocks.{i}.downsamplers.0")
    last = len(unet.up_blocks) - 1
    for i, block in enumerate(unet.up_blocks):
        layers = [f"up_blocks.{i}.{layer}" for layer in _block_layers(block)]
        upsampler = getattr(block, "upsamplers", None) is not None
        up_full += layers + ([f"up_blocks.{i}.upsamplers.0"] if upsampler else [])
        if i == last:
            up.append(layers[0])
        elif upsampler:
            up += layers[:-1] + [f"up_blocks.{i}.upsamplers.0"]
        else:
            up += layers
    sets = {"up": up, "down": down, "all": down + up_full}
    if name in sets:
        return sets[name]
    return module_paths(unet, name, LAYER_SETS, example="mid_block,up_blocks.1.attentions.0")


def module_paths(model: nn.Module, spec: str, sets: Iterable[str], example: str = "") -> list[str]:
    """`spec` read as comma-separated module paths of `model`; an unknown one is an error naming the named sets."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown or not names:
        raise ValueError(f"unknown layer set or module path(s) {unknown or spec!r}; expected one of {tuple(sets)} "
                         "or comma-separated module paths of the model" + (f" (e.g. {example!r})" if example else ""))
    return names


def official_key_names(layers: list[str]) -> list[str]:
    """The official code's names for the `up` set (mid, us1, us2, ...), for logs that match the paper's code."""
    return ["mid" if n == "mid_block" else f"us{i}" for i, n in enumerate(layers)]


class FeatureCapture:
    """Registers forward hooks on the named modules and keeps their latest outputs.

    Use `pop()` after a forward pass: it returns {name: tensor (N, C, H, W)} and clears the store, so features
    of one pass never leak into the next.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]):
        self.layers = list(layers)
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise ValueError(f"model has no module(s) {missing}")
        self._store: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name: str):
        def hook(module, args, output):
            self._store[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.layers if n not in self._store]
        if missing:
            raise RuntimeError(f"no features captured for {missing}: was the model run since the last pop()?")
        store, self._store = self._store, {}
        return {n: store[n] for n in self.layers}

    def clear(self) -> None:
        """Drop what the last forward pass captured (a pass whose features nobody pops, e.g. a validation's)."""
        self._store = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._store = {}


@torch.no_grad()
def feature_shapes(model: nn.Module, layers: list[str], *inputs, **kwargs) -> dict[str, tuple[int, ...]]:
    """Run the model once (meta tensors work) and report each captured feature's shape."""
    capture = FeatureCapture(model, layers)
    try:
        model(*inputs, **kwargs)
        return {n: tuple(t.shape) for n, t in capture.pop().items()}
    finally:
        capture.remove()


def unet_layer_channels(unet: nn.Module, layers: list[str], sample_size: int = 8) -> dict[str, int]:
    """Channel count of each hooked layer of a diffusers UNet2DConditionModel, from one forward pass of a weightless
    copy on the meta device: no compute, no memory, the real model untouched."""
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile wrapper: its module's class builds the clone
    config = unet.config
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    meta = torch.device("meta")
    size = max(sample_size, 2 ** (len(config.block_out_channels) - 1))
    sample = torch.empty(1, config.in_channels, size, size, device=meta)
    cond = torch.empty(1, 4, cross, device=meta)
    with torch.device(meta):
        clone = type(unet).from_config(config)
    shapes = feature_shapes(clone, layers, sample, torch.tensor([1.0], device=meta), encoder_hidden_states=cond)
    return {name: shape[1] for name, shape in shapes.items()}
