"""Real-size SDXL base single file (slow): a random fp16 file in the SGM layout (~7 GB written), one UNet
call, one text encoding (both encoders) and one VAE decode of our models against diffusers'
``from_single_file``. Run with ``-m slow``.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest
import torch
from ldm_writer import sgm_state_dict, write_safetensors_streaming
from sdxl_reference import diffusers, reference_pipeline, transformers, write_config_folder
from torch import Tensor

from sdexport.loading import load_checkpoint, load_strict, published_configs
from sdexport.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdexport.models.text_encoder import TextEncoder, TextEncoderWithProjection
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE


def _random_param(key: str, t: Tensor) -> Tensor:
    """Deterministic per key, scaled like a default init so activations stay finite through 70 layers."""
    gen = torch.Generator().manual_seed(sum(key.encode()) * 7919 % (2**31) + len(key))
    if t.dtype == torch.int64:  # encoder 1's position_ids
        return torch.arange(t.shape[-1])[None]
    if t.ndim == 0:
        return torch.tensor(4.6052)
    if t.ndim == 1:
        base = 1.0 if ("norm" in key or "ln_" in key) and key.endswith("weight") else 0.0
        return (base + 0.02 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    # OpenCLIP's text_projection is stored (width, projection): its fan-in is dim 0
    fan_in = t.shape[0] if key.endswith("text_projection") else t[0].numel()
    return (torch.randn(t.shape, generator=gen) / fan_in**0.5).to(t.dtype)


class _MemoryPeaks:
    """Peak resident memory per phase, sampled from /proc/self/status: all of it (VmRSS, file-backed
    pages of memory-mapped safetensors included) and the anonymous part (RssAnon)."""

    def __init__(self) -> None:
        self.peaks: dict[str, tuple[float, float]] = {}
        self._max = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _now() -> tuple[float, float]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "RssAnon"))  # type: ignore[return-value]

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = self._now()
            self._max = (max(self._max[0], now[0]), max(self._max[1], now[1]))

    def mark(self, phase: str) -> None:
        now = self._now()
        self.peaks[phase] = (max(self._max[0], now[0]), max(self._max[1], now[1]))
        self._max = now

    def report(self) -> str:
        self._stop.set()
        return ", ".join(f"{k} {rss:.1f} ({anon:.1f} anon)" for k, (rss, anon) in self.peaks.items())


@pytest.mark.slow
def test_real_size_sdxl_base_matches_from_single_file(tmp_path: Path) -> None:
    """A real-size SDXL base single file (random fp16, SGM layout): our loader + models against diffusers'
    from_single_file, module by module in fp32 (one UNet call at 32x32 latents, both encoders, a decode)."""
    started = time.perf_counter()
    mem = _MemoryPeaks()
    published = published_configs("sdxl_base")
    with torch.device("meta"):
        meta = {
            "unet": diffusers.UNet2DConditionModel(**published["unet"]).half().state_dict(),
            "vae": diffusers.AutoencoderKL(**published["vae"]).half().state_dict(),
            "text_encoder": transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**published["text_encoder"])).half().state_dict(),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**published["text_encoder_2"])).half().state_dict(),
        }
    layout = sgm_state_dict(meta["unet"], meta["vae"], meta["text_encoder"], meta["text_encoder_2"])
    layout["conditioner.embedders.1.model.logit_scale"] = torch.empty((), dtype=torch.float16, device="meta")
    path = write_safetensors_streaming(tmp_path / "sdxl_base.safetensors", layout, _random_param)
    del meta, layout
    size_gb = path.stat().st_size / 2**30
    # the published configs (both encoders with the legacy token ids: pooled at the ids' argmax)
    folder = write_config_folder(tmp_path / "config", published, refiner=False)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (1, 77), generator=gen)
    ids[0, 0], ids[0, 20] = 49406, 49407  # BOS ... EOS; the pooled token is the argmax
    ids[0, 21:] = 0
    x = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 77, 2048, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    latents = torch.randn(1, 4, 16, 16, generator=gen)

    # Ours: load in fp16, then one module at a time in fp32.
    mem.mark("writing")
    ckpt = load_checkpoint(path, dtype=torch.float16, family="sdxl")
    mem.mark("load")
    assert ckpt.text_config_2 is not None and ckpt.text_encoder_2 is not None
    ours: dict[str, Tensor] = {}
    with torch.no_grad():
        with torch.device("meta"):  # load_strict assigns the loaded tensors
            enc1 = TextEncoder(TextEncoderConfig.from_transformers(ckpt.text_config, clip_skip=2, final_norm=False))
        load_strict(enc1, ckpt.text_encoder, "text_encoder")
        ckpt.text_encoder.clear()
        ours["context_1"] = enc1.float()(ids)
        del enc1
        with torch.device("meta"):
            enc2 = TextEncoderWithProjection(
                TextEncoderConfig.from_transformers(ckpt.text_config_2, clip_skip=2, final_norm=False))
        load_strict(enc2, ckpt.text_encoder_2, "text_encoder_2")
        ckpt.text_encoder_2.clear()
        ours["context_2"], ours["text_embeds"] = enc2.float()(ids)
        del enc2
        with torch.device("meta"):
            vae = VAE(VAEConfig.from_diffusers(ckpt.vae_config))
        load_strict(vae, ckpt.vae, "vae")
        ckpt.vae.clear()
        ours["decode"] = vae.float().decode(latents)
        del vae
        mem.mark("ours: text, vae")
        with torch.device("meta"):
            unet = UNet(UNetConfig.from_diffusers(ckpt.unet_config))
        load_strict(unet, ckpt.unet, "unet")
        ckpt.unet.clear()
        ours["unet"] = unet.float()(x, torch.tensor(500), context, text_embeds=pooled, time_ids=time_ids)
        del unet, ckpt
    gc.collect()
    mem.mark("ours: unet")
    ours_done = time.perf_counter()

    # The reference: diffusers' from_single_file (fp16), each module upcast in turn. The UNet comes from its
    # own from_single_file call (the same converter), so the whole pipeline never sits in memory at once.
    pipe = reference_pipeline(path, folder, refiner=False, dtype=torch.float16, unet=None)
    mem.mark("reference: from_single_file (no unet)")
    ref: dict[str, Tensor] = {}
    with torch.no_grad():
        hidden = pipe.text_encoder.float()(ids, output_hidden_states=True).hidden_states
        ref["context_1"] = hidden[-2]
        pipe.text_encoder = None
        out = pipe.text_encoder_2.float()(ids, output_hidden_states=True)
        ref["context_2"], ref["text_embeds"] = out.hidden_states[-2], out.text_embeds
        pipe.text_encoder_2 = None
        ref["decode"] = pipe.vae.float().decode(latents).sample
    del pipe
    gc.collect()
    mem.mark("reference: text, vae")
    unet_ref = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(folder), subfolder="unet", local_files_only=True, torch_dtype=torch.float16)
    mem.mark("reference: unet from_single_file")
    with torch.no_grad():
        ref["unet"] = unet_ref.float()(x, torch.tensor([500]), context,
                                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    del unet_ref
    gc.collect()
    mem.mark("reference: unet")

    for name, want in ref.items():
        got = ours[name]
        assert torch.isfinite(want).all(), name
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= 1e-3 * max(scale, 1.0), f"{name}: max abs err {err} (scale {scale})"
    print(f"\nSDXL base single file: {size_gb:.2f} GiB; ours {ours_done - started:.0f} s (incl. writing), "
          f"total {time.perf_counter() - started:.0f} s; peak RSS (GiB) by phase: {mem.report()}")
