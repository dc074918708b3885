"""Reference models and random weights that work, shared by the parity tests and the benchmark scripts (which
compare recon's backends with these references on the same random weights; no pretrained file can be had here).

- RoMa v2: `official_romav2()` is romav2's `RoMaV2` built by its own constructor with two patches, as no download
  is possible: `torch.hub.load` returns Meta's `dinov3_vitl16` architecture (`MetaDINOv3`, assembled from Meta's
  own layers as vendored in `romav2.vit`, with the token handling of facebookresearch/dinov3
  `DinoVisionTransformer.get_intermediate_layers` at commit adc2544, the one romav2 pins; or Meta's real code from
  a checkout named by RECON_DINOV3_REPO), and the checkpoint download returns nothing (weights are loaded
  afterwards). `random_romav2_checkpoint` gives random weights in romav2.0.1.pt's layout.
- LoFTR: `informative_loftr_state` (module docstring of tests/test_zoo_loftr.py: plain random LoFTR weights give
  0-3 matches on any pair).
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from unittest import mock

import torch
from torch import nn

from feature_backends.roma import random_state_dict


class MetaDINOv3(nn.Module):
    """facebookresearch/dinov3 `dinov3_vitl16` (hub configuration at adc2544) from Meta's layers in romav2.vit."""

    def __init__(self, depth: int = 24, dim: int = 1024, heads: int = 16, storage: int = 4):
        from romav2.vit.block import SelfAttentionBlock
        from romav2.vit.ffn_layers import Mlp
        from romav2.vit.patch_embed import PatchEmbed
        from romav2.vit.rope import RopePositionEmbedding

        super().__init__()
        self.n_storage_tokens = storage
        self.patch_embed = PatchEmbed(img_size=224, patch_size=16, in_chans=3, embed_dim=dim, flatten_embedding=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, storage, dim))
        self.rope_embed = RopePositionEmbedding(dim, num_heads=heads, base=100.0, normalize_coords="separate",
                                                rescale_coords=2, dtype=torch.float32)
        norm = partial(nn.LayerNorm, eps=1e-5)  # "layernormbf16"
        self.blocks = nn.ModuleList(SelfAttentionBlock(
            dim=dim, num_heads=heads, ffn_ratio=4, qkv_bias=True, proj_bias=True, ffn_bias=True, norm_layer=norm,
            act_layer=nn.GELU, ffn_layer=Mlp, init_values=1e-5, mask_k_bias=True) for _ in range(depth))
        self.norm = norm(dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def get_intermediate_layers(self, x: torch.Tensor, *, n) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        batch, height, width, _ = x.shape
        cls = self.cls_token + 0 * self.mask_token
        x = torch.cat([cls.expand(batch, -1, -1), self.storage_tokens.expand(batch, -1, -1), x.flatten(1, 2)], 1)
        outputs = []
        for index, block in enumerate(self.blocks):  # every block runs, as in Meta's code
            x = block(x, self.rope_embed(H=height, W=width))
            if index in n:
                outputs.append(x)
        return tuple(self.norm(out)[:, self.n_storage_tokens + 1:] for out in outputs)


def hub_dinov3() -> nn.Module:
    """What romav2's `torch.hub.load("facebookresearch/dinov3:…", "dinov3_vitl16", pretrained=False)` returns."""
    repo = os.environ.get("RECON_DINOV3_REPO")
    if repo:
        return torch.hub.load(repo, "dinov3_vitl16", source="local", pretrained=False, weights=None)
    return MetaDINOv3()


@contextlib.contextmanager
def no_random_init():
    """Skip random initialisation while building (every weight is loaded afterwards): seconds per model."""
    with contextlib.ExitStack() as stack:
        for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "zeros_", "ones_", "constant_"):
            stack.enter_context(mock.patch(f"torch.nn.init.{name}", lambda tensor, *a, **k: tensor))
        yield


def official_romav2():
    """romav2's RoMaV2 built by its own constructor (hub code and download patched out), weights not loaded."""
    from romav2 import RoMaV2
    from romav2.features import Descriptor
    from romav2.matcher import Matcher

    # float32 everywhere a configuration allows it, as recon on CPU (the DPT head and refiners keep romav2's
    # hard-coded bfloat16 autocast on both sides).
    cfg = RoMaV2.Cfg(descriptor=Descriptor.Cfg(enable_amp=False), matcher=Matcher.Cfg(enable_amp=False))
    with no_random_init():
        dinov3 = hub_dinov3()
    with no_random_init(), mock.patch("torch.hub.load", return_value=dinov3) as hub_load, \
            mock.patch("torch.hub.load_state_dict_from_url", return_value={}), \
            mock.patch.object(RoMaV2, "load_state_dict"):
        model = RoMaV2(cfg)
    assert hub_load.call_args.kwargs["model"] == "dinov3_vitl16" and hub_load.call_args.kwargs["pretrained"] is False
    return model


def random_romav2_checkpoint(model: nn.Module, seed: int = 5) -> dict[str, torch.Tensor]:
    """Random weights in romav2.0.1.pt's layout, with the values DINOv3 and the matcher fix (masked key bias,
    RoPE periods, temperature and scale)."""
    checkpoint = random_state_dict(model, seed=seed)
    dim = 1024
    for key in checkpoint:
        if key.endswith("attn.qkv.bias_mask"):  # Meta's init: q and v biases on, key bias masked
            checkpoint[key] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        elif key.endswith("rope_embed.periods") or key in ("matcher.temp", "matcher.scale"):
            checkpoint[key] = model.state_dict()[key].clone()
    return checkpoint


def informative_loftr_state(network, image: torch.Tensor, seed: int = 0, gain: float = 10.0, damp: float = 0.1):
    """Random weights in `network`'s layout that match (module docstring); `image` calibrates the projection."""
    state = random_state_dict(network, seed=seed)
    network.load_state_dict(state)
    network.eval()
    inputs = {}
    convs = {"backbone.layer3_outconv.weight": network.backbone.layer3_outconv,
             "backbone.layer1_outconv2.3.weight": network.backbone.layer1_outconv2[3]}
    hooks = [conv.register_forward_hook(lambda m, i, o, key=key: inputs.__setitem__(key, i[0]))
             for key, conv in convs.items()]
    with torch.no_grad():
        network.backbone(image)
    for hook in hooks:
        hook.remove()
    for key, features in inputs.items():
        common = torch.nn.functional.normalize(features.mean(dim=(0, 2, 3)), dim=0)
        weight = state[key]
        along = torch.einsum("oikl,i->okl", weight, common)[:, None] * common[None, :, None, None]
        state[key] = (weight - along) * gain
    for key in state:
        if ".norm2." in key:  # each layer adds norm2(...): scaling it damps the message
            state[key] = state[key] * damp
    return state
