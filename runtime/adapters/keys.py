"""Resolving LoRA entries to the target model's weight names, with shape checks.

The target table is the caller's own `{weight name: shape}` (an eager model's state dict, an artifact's
`.safetensors` headers) and `component_prefixes` says where each component's weights live in it, e.g.
`{"unet": "unet.", "text_encoder": "text_encoder."}` for an artifact whose UNet weights are
`unet.down_blocks.0...`. Inside a component, names are diffusers' (UNet) and transformers' (CLIP text
encoders; a `text_model.` level is optional: `encoder.layers.0...` and `text_model.encoder.layers.0...`
both resolve). kohya keys (`lora_unet_down_blocks_0_attentions_0_proj_in`) are matched against the names
with every `.` turned into `_`; kohya's SDXL files name the UNet's blocks as SGM does (`input_blocks_4_1`,
`middle_block_1`, `output_blocks_2_2`), which are mapped to diffusers' blocks first.

Nothing resolves partially: any entry without a target (another family, a typo, a component the model
lacks) or with the wrong shape makes `resolve` raise, listing the first such keys.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from runtime.adapters.delta import fits, natural_shape
from runtime.adapters.files import AdapterError
from runtime.adapters.lora import Lora, LoraEntry

__all__ = ["DEFAULT_PREFIXES", "Resolved", "resolve"]

# The canonical naming: "<component>:<name inside the component>", e.g. "unet:conv_in.weight".
DEFAULT_PREFIXES = {"unet": "unet:", "text_encoder": "text_encoder:", "text_encoder_2": "text_encoder_2:"}
_SHOW = 8


@dataclass(frozen=True)
class Resolved:
    """Each entry of `lora` with its target weight name (the caller's naming) and shape."""

    lora: Lora
    targets: tuple[tuple[LoraEntry, str, tuple[int, ...]], ...]

    def only(self, components: Collection[str]) -> Resolved:
        """The entries of these components alone (A1111's separate text-encoder / UNet multipliers)."""
        return Resolved(self.lora, tuple(t for t in self.targets if t[0].component in components))

    def report(self) -> dict[str, int]:
        """How many adapted weights per component."""
        out: dict[str, int] = {}
        for e, _, _ in self.targets:
            comp = e.component or "?"
            out[comp] = out.get(comp, 0) + 1
        return out

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.lora.kinds().items()))
        parts = ", ".join(f"{n} in {c}" for c, n in sorted(self.report().items()))
        return f"{self.lora.name}: {len(self.targets)} weights ({kinds}): {parts}"


def _index(names: list[str], prefix: str, text: bool) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """(dotted module -> weight name, flat module -> weight name, ambiguous flat names) of one component."""
    dotted: dict[str, str] = {}
    flat: dict[str, str] = {}
    ambiguous: set[str] = set()
    for name in names:
        inner = name[len(prefix):]
        if not inner.endswith(".weight"):
            continue
        module = inner[: -len(".weight")]
        for v in [_strip_text_model(module)] if text else [module]:
            dotted.setdefault(v, name)
            f = v.replace(".", "_")
            if f in flat and flat[f] != name:
                ambiguous.add(f)
            flat.setdefault(f, name)
    return dotted, flat, ambiguous


def _strip_text_model(module: str) -> str:
    for lead in ("text_model.", "text_model_"):
        if module.startswith(lead):
            return module[len(lead):]
    return module


def _unet_layout(dotted: Mapping[str, str]) -> tuple[int, int]:
    """(layers per block, levels) of a diffusers UNet, from its weight names."""
    resnets = {int(m[1]) for k in dotted if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    levels = {int(m[1]) for k in dotted if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    return (max(resnets) + 1 if resnets else 0), (max(levels) + 1 if levels else 0)


_RESNET = (("in_layers_0", "norm1"), ("in_layers_2", "conv1"), ("emb_layers_1", "time_emb_proj"),
           ("out_layers_0", "norm2"), ("out_layers_3", "conv2"), ("skip_connection", "conv_shortcut"))
_TOP = (("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2"),
        ("input_blocks_0_0", "conv_in"), ("out_0", "conv_norm_out"), ("out_2", "conv_out"))


def _resnet(rest: str) -> str:
    for a, b in _RESNET:
        if rest == a or rest.startswith(a + "_"):
            return b + rest[len(a):]
    return rest


def sgm_to_diffusers(flat: str, layers: int) -> str | None:
    """A kohya SGM-spelled UNet module (`input_blocks_4_1_proj_in`) in diffusers' flat spelling
    (`down_blocks_1_attentions_0_proj_in`), for a UNet with `layers` resnets per down level (SGM input
    block n = 1 + level·(layers+1) + j, the last of each level the downsampler; output block n =
    level·(layers+1) + j with the upsampler after the last layer); None if it is not SGM-spelled."""
    for a, b in _TOP:
        if flat == a or flat.startswith(a + "_"):
            return b + flat[len(a):]
    if m := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", flat):
        level, j = divmod(int(m[1]) - 1, layers + 1)
        if j == layers:
            return f"down_blocks_{level}_downsamplers_0_conv" if m[3] == "op" else None
        return f"down_blocks_{level}_resnets_{j}_{_resnet(m[3])}" if m[2] == "0" else \
            f"down_blocks_{level}_attentions_{j}_{m[3]}"
    if m := re.fullmatch(r"middle_block_(\d)_(.+)", flat):
        return {"0": f"mid_block_resnets_0_{_resnet(m[2])}", "1": f"mid_block_attentions_0_{m[2]}",
                "2": f"mid_block_resnets_1_{_resnet(m[2])}"}[m[1]] if m[1] in "012" else None
    if m := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", flat):
        level, j = divmod(int(m[1]), layers + 1)
        if m[2] == "0":
            return f"up_blocks_{level}_resnets_{j}_{_resnet(m[3])}"
        if m[3] == "conv":
            return f"up_blocks_{level}_upsamplers_0_conv"
        return f"up_blocks_{level}_attentions_{j}_{m[3]}"
    return None


def resolve(lora: Lora, targets: Mapping[str, tuple[int, ...]],
            component_prefixes: Mapping[str, str] = DEFAULT_PREFIXES) -> Resolved:
    """Map every entry of `lora` to a weight of `targets` (name -> shape), checking shapes; raises
    AdapterError listing the first unmatched / misfit keys if any entry does not fit."""
    names = list(targets)
    indexes = {}
    for comp, prefix in component_prefixes.items():
        comp_names = [n for n in names if n.startswith(prefix)]
        if comp_names:
            indexes[comp] = _index(comp_names, prefix, comp != "unet")
    layers = _unet_layout(indexes["unet"][0])[0] if "unet" in indexes else 0
    found: list[tuple[LoraEntry, str, tuple[int, ...]]] = []
    missing: list[str] = []
    misfit: list[str] = []
    for e in lora.entries:
        if e.component not in indexes:
            missing.append(e.key + ("" if e.component is None else f" (the model has no {e.component})"))
            continue
        dotted, flat, ambiguous = indexes[e.component]
        target: str | None
        text = e.component != "unet"
        if e.flat:
            module = _strip_text_model(e.module) if text else e.module
            if e.component == "unet" and module not in flat and (sgm := sgm_to_diffusers(module, layers)):
                module = sgm
            if module in ambiguous:
                raise AdapterError(f"{lora.source}: {e.key} is ambiguous in this model")
            target = flat.get(module)
        else:
            target = dotted.get(_strip_text_model(e.module) if text else e.module)
        if target is None:
            missing.append(e.key)
        elif not fits(e, targets[target]):
            misfit.append(f"{e.key}: ΔW {natural_shape(e)} does not fit {target} {tuple(targets[target])}")
        else:
            found.append((e, target, tuple(targets[target])))
    if missing or misfit:
        lines = [f"{lora.source}: {len(missing) + len(misfit)} of {len(lora.entries)} LoRA modules do not "
                 "fit this model (another model family, or keys we do not read); nothing was applied."]
        if missing:
            lines.append(f"unmatched ({len(missing)}): " + ", ".join(missing[:_SHOW])
                         + (" ..." if len(missing) > _SHOW else ""))
        if misfit:
            lines.append(f"wrong shape ({len(misfit)}): " + "; ".join(misfit[:_SHOW]))
        raise AdapterError("\n".join(lines))
    targets_seen: dict[str, str] = {}
    for e, t, _ in found:
        if t in targets_seen:
            raise AdapterError(f"{lora.source}: {e.key} and {targets_seen[t]} both adapt {t}")
        targets_seen[t] = e.key
    return Resolved(lora, tuple(found))
