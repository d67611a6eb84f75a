"""A real-size SD 1.5 ControlNet single file (random weights, zero convolutions randomised, lllyasviel's
control_model.* layout written by tests/controlnet_reference.py) loads with the published SD 1.5 config
inferred from its tensors and matches diffusers' ControlNetModel.from_single_file on one call at 64 px."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from controlnet_reference import controlnet_ldm_state_dict, randomise_zero_convs
from safetensors.torch import save_file

from sdexport import ControlNet

# lllyasviel/control_v11p_sd15_canny's config.json
SD15_CONTROLNET = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None, "conditioning_embedding_out_channels":
    [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}


@pytest.mark.slow
def test_real_size_sd15_single_file_matches_from_single_file(tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = randomise_zero_convs(ControlNetModel(**{k: v for k, v in SD15_CONTROLNET.items() if k[0] != "_"}))
    path = tmp_path / "control_v11p_sd15_test.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet_ldm_state_dict(model.state_dict()).items()}, str(path))
    del model
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(SD15_CONTROLNET))
    ref = ControlNetModel.from_single_file(str(path), config=str(config_dir), local_files_only=True).eval()
    ours = ControlNet.from_pretrained(path)
    assert ours.info.family == "sd1" and len(ours.info.residuals) == 13
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = ref(x, torch.tensor(500.0), ctx, image, return_dict=False)
        got = ours.residuals(x, torch.tensor(500.0), ctx, torch.ones(1, 77), image)
    for a, b in zip([*down, mid], got, strict=True):
        scale = a.abs().max().item()
        assert scale > 0 and (a - b).abs().max().item() <= 1e-3 * max(1.0, scale)
    print(f"real-size SD 1.5 ControlNet single file: {time.perf_counter() - t0:.1f}s")
