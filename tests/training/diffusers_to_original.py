"""The key map of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`, for tests.

That script is not in the diffusers wheel, so its naming rules are written out here (independently
of our own inverse map in training/convert_original.py) to make the checkpoints users make with it:

- U-Net: a FIXED SD layout, not derived from the config: 4 levels x 2 resnets, attention on down
  levels 0-2 and up levels 1-3. Down resnet (i, j) -> input_blocks.{3i+j+1}.0, its attention ->
  .1; downsampler i -> input_blocks.{3(i+1)}.0.op; up resnet (i, j) -> output_blocks.{3i+j}.0, its
  attention -> .1; upsampler i -> output_blocks.{3i+2}.{1 if i == 0 else 2}; mid -> middle_block.{0,1,2};
  inside resnets norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut -> in_layers.0/in_layers.2/
  emb_layers.1/out_layers.0/out_layers.3/skip_connection; time_embedding.linear_{1,2} ->
  time_embed.{0,2}; conv_in -> input_blocks.0.0; conv_norm_out/conv_out -> out.0/out.2.
- VAE: 4 levels; encoder resnet (i, j) -> encoder.down.{i}.block.{j}; decoder up_blocks.{i} ->
  up.{3-i} (reversed); mid resnets k -> mid.block_{k+1}; mid attention -> mid.attn_1 with
  group_norm/to_q/to_k/to_v/to_out.0 -> norm/q/k/v/proj_out, and the four Linear weights reshaped to
  1x1 convs [C, C, 1, 1] (biases stay [C]); conv_shortcut -> nin_shortcut; conv_norm_out -> norm_out.
- Text encoder: SD 1.x keys are written unchanged under `cond_stage_model.transformer.`. SD 2.x
  (the script's "v2.0" branch) writes OpenCLIP names under `cond_stage_model.model.`: layers ->
  transformer.resblocks, layer_norm{1,2} -> ln_{1,2}, fc1/fc2 -> c_fc/c_proj, self_attn -> attn,
  q/k/v projections concatenated into attn.in_proj_{weight,bias}, final_layer_norm -> ln_final,
  token/position embeddings -> token_embedding.weight / positional_embedding. It writes only the
  layers the diffusers model has: no unused last block, no text_projection.

The script chooses the v2.0 branch when `text_model.encoder.layers.22.layer_norm2.bias` exists (only
the full-size 23-layer OpenCLIP-H tower); `v20` selects the branch here so tiny models can take it.
The script reads text-encoder keys with `text_model.` (hub folders; transformers < 5.6 writes them).
"""
from __future__ import annotations

import re

import torch

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _unet_prefixes() -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) of the script's fixed 4x2 SD layout."""
    out = []
    for i in range(4):
        for j in range(2):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    out.append(("mid_block.attentions.0.", "middle_block.1."))
    out += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return out


def unet_to_original(sd: dict) -> dict:
    prefixes = _unet_prefixes()
    out = {}
    for key, value in sd.items():
        new = key
        for dif, orig in _UNET_TOP.items():
            if new.startswith(dif):
                new = orig + new[len(dif):]
        if "resnets" in key:
            for dif, orig in _UNET_RESNET:
                new = new.replace(dif, orig)
        for dif, orig in prefixes:
            new = new.replace(dif, orig)
        out[new] = value
    return out


def _vae_prefixes() -> list[tuple[str, str]]:
    out = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(4):
        out += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        if i < 3:
            out.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            out.append((f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample."))
        out += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
    out += [(f"mid_block.resnets.{k}.", f"mid.block_{k + 1}.") for k in range(2)]
    return out


_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_to_original(sd: dict) -> dict:
    prefixes = _vae_prefixes()
    out = {}
    for key, value in sd.items():
        new = key
        for dif, orig in prefixes:
            new = new.replace(dif, orig)
        if "mid.attn_1." in new:
            for dif, orig in _VAE_ATTN.items():
                new = new.replace("mid.attn_1." + dif, "mid.attn_1." + orig)
            if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


_OPENCLIP = [("text_model.encoder.layers.", "resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
             ("transformer.text_model.final_layer_norm.", "ln_final."),
             ("transformer.text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("transformer.text_model.embeddings.position_embedding.weight", "positional_embedding")]
_OPENCLIP_RE = re.compile("|".join(re.escape(d) for d, _ in _OPENCLIP))
_OPENCLIP_MAP = dict(_OPENCLIP)


def text_to_openclip(sd: dict) -> dict:
    """The v2.0 branch, on `transformer.` + text_model.* keys."""
    out, qkv = {}, {}
    for key, value in sd.items():
        if m := re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv.setdefault((m[1] + ".self_attn", m[3]), [None] * 3)["qkv".index(m[2])] = value
            continue
        out[_OPENCLIP_RE.sub(lambda x: _OPENCLIP_MAP[x.group(0)], key)] = value
    for (pre, kind), parts in qkv.items():
        assert all(p is not None for p in parts), f"{pre}: q, k or v missing"
        out[_OPENCLIP_RE.sub(lambda x: _OPENCLIP_MAP[x.group(0)], pre) + f".in_proj_{kind}"] = torch.cat(parts)
    return out


def to_original(unet: dict, vae: dict, text: dict, *, v20: bool) -> dict:
    """The script's whole checkpoint from the three diffusers state dicts (text keys with `text_model.`)."""
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_original(unet).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_original(vae).items()})
    if v20:
        sd.update({"cond_stage_model.model." + k: v
                   for k, v in text_to_openclip({"transformer." + k: v for k, v in text.items()}).items()})
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    return sd
