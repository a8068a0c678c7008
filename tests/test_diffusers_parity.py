"""Our FLUX.2 against an independent implementation: diffusers' Flux2Transformer2DModel.

The tiny random checkpoint is written in BFL key names and converted by diffusers' own
converter (convert_flux2_transformer_checkpoint_to_diffusers), so key mapping, the
fused QKV split, the final layer's (shift, scale) order and the RoPE layout are all
checked by code we did not write.
"""

import pytest
import torch

from comfy_mesh.splitter.flux2.random_weights import random_checkpoint
from comfy_mesh.splitter.flux2.stage import Flux2Stage, image_ids, text_ids
from comfy_mesh.splitter.plan import BlockRange

from conftest import TINY, TINY_GUIDED

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install '.[test]'")


def _diffusers_model(config, state):
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels,
        num_layers=config.depth_double, num_single_layers=config.depth_single,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, mlp_ratio=config.mlp_hidden / config.hidden_size,
        axes_dims_rope=config.axes_dim, rope_theta=int(config.theta), guidance_embeds=config.guidance_embed)
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in state.items()})
    model.load_state_dict(converted, strict=True)
    return model.eval()


@pytest.mark.parametrize("config", [TINY, TINY_GUIDED], ids=["klein-like", "dev-like"])
def test_matches_diffusers(config):
    state = random_checkpoint(config, seed=21)
    ours = Flux2Stage(config, BlockRange(0, config.n_blocks), first=True, last=True,
                      load_weights=lambda keys: {k: state[k].clone() for k in keys})
    theirs = _diffusers_model(config, state)

    g = torch.Generator().manual_seed(0)
    h, w, n_txt = 8, 6, 12
    img = torch.randn(1, h * w, config.in_channels, generator=g)
    txt = torch.randn(1, n_txt, config.context_dim, generator=g)
    t = torch.tensor([0.63])
    guidance = torch.tensor([4.0]) if config.guidance_embed else None
    ours_out = ours(img, txt, t, image_ids(1, h, w), text_ids(1, n_txt), guidance)
    with torch.no_grad():
        theirs_out = theirs(hidden_states=img, encoder_hidden_states=txt, timestep=t,
                            img_ids=image_ids(1, h, w), txt_ids=text_ids(1, n_txt), guidance=guidance,
                            return_dict=False)[0]
    rel = ((ours_out - theirs_out).norm() / theirs_out.norm()).item()
    print(f"relative difference to diffusers: {rel:.2e}")
    assert rel < 1e-5, f"relative difference to diffusers {rel:.2e}"
    assert theirs_out.abs().mean() > 0.1  # a real signal, not two zero outputs agreeing
