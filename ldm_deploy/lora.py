"""LoRA files as users have them -> per-parameter weight deltas (numpy + safetensors only, torch-free).

Two layouts are read, for linear layers and 1x1 / 3x3 convolutions (LoCon):

- kohya / A1111: `lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, and `lora_te_...` for the text encoder (SD 1.x / 2.x module names, which are diffusers').
  SDXL (kohya's sd-scripts): `lora_te1_...` for text_encoder, `lora_te2_...` for text_encoder_2, and
  U-Net modules under either diffusers' names or the original (SGM) block names sd-scripts uses for SDXL
  (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1_...`, `output_blocks_2_0_in_layers_2`),
  mapped from the model's own block layout (`_sgm_names`).
- diffusers / peft: `unet.<module path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`
  (`text_encoder_2.<path>...` for SDXL),
  peft's own `base_model.model.<path>...` and prefix-less keys (resolved against the model), with or
  without a `base_layer` segment; alpha from a `<path>.alpha` key, from the file's
  `lora_adapter_metadata` (diffusers' `save_lora_weights`) or from an `adapter_config.json` beside it
  (peft's `save_pretrained`), else alpha = rank (diffusers' default).

A module's delta is `(alpha / r) * up @ down` (`alpha / sqrt(r)` with rsLoRA), r = down's rows; for a
convolution down is [r, in, kh, kw] and up [out, r, 1, 1], and the product is reshaped to the kernel.
`W' = W + sum_i scale_i * delta_i` is what `fuse_lora(lora_scale=...)` computes. Parameter names are
ours, which are diffusers' (U-Net) and transformers' (CLIPTextModel[WithProjection]). Only `.safetensors` files are
read: no pickle, ever.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ldm_deploy.errors import LdmError, UsageError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# threads of the run-time merge (`merge`). Each task's `up @ down` is itself multi-threaded by numpy's BLAS, so the
# pool only pays off with cores to spare: on 2 cores (AMD EPYC) 2 workers took 1.9 s against 2.0 s for one on
# SD 1.5's U-Net LoRA shapes (1.0 vs 1.6 s with the BLAS held to one thread). A quarter of the cores, at most 4.
MERGE_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",   # te1/te2: SDXL's
                "lora_te2_": "text_encoder_2"}
METADATA_KEY = "lora_adapter_metadata"       # diffusers' save_lora_weights(..., *_lora_adapter_metadata=)
SHOW = 4                                     # how many offending keys an error names

_KOHYA = re.compile(r"^(lora_[a-z0-9]+?_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_OLD_DIFFUSERS = re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_ALPHA = re.compile(r"^(.+)\.alpha$")
_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
             ("base_model.model.", None))


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:SCALE]`."""
    path: Path
    scale: float = 1.0

    def __post_init__(self):
        from ldm_deploy.limits import MAX_LORA_SCALE

        # every way in (--lora, Python tuples, runtime switches): a NaN / inf / huge scale makes inf weights
        s = self.scale
        if (isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not math.isfinite(s)
                or abs(s) > MAX_LORA_SCALE):
            raise UsageError(f"LoRA {self.path}: scale {s!r} must be a finite number in "
                             f"[-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]", hint="usual scales are 0..1.5")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        path, scale = str(text), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UsageError(f"--lora {text!r}: the scale after ':' must be a number",
                                 hint="write FILE or FILE:SCALE, e.g. style.safetensors:0.8") from None
        if not math.isfinite(scale):
            raise UsageError(f"--lora {text!r}: the scale must be finite")
        return cls(Path(path), scale)


@dataclass
class LoraModule:
    """One adapted layer: our parameter name (`....to_q.weight`), its low-rank factors and alpha."""
    component: str
    param: str
    down: np.ndarray            # [r, in] or [r, in, kh, kw]
    up: np.ndarray              # [out, r] or [out, r, 1, 1]
    alpha: float | None         # None: alpha = r
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: tuple) -> np.ndarray:
        """float32 delta of the target weight's `shape` (scale 1)."""
        r = self.rank
        alpha = float(r if self.alpha is None else self.alpha)
        factor = alpha / (math.sqrt(r) if self.rslora else r)
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)          # (out, r)
        down = self.down.astype(np.float32).reshape(r, -1)                      # (r, in*kh*kw)
        if up.shape[1] != r:
            raise LdmError(f"LoRA for {self.component} {self.param}: up {self.up.shape} does not match down "
                           f"{self.down.shape} (rank {r})", hint="the file is not a LoRA this loader reads")
        d = (up @ down) * np.float32(factor)
        if d.size != math.prod(shape):
            raise LdmError(f"LoRA for {self.component} {self.param}: delta {d.shape} does not fit the weight "
                           f"{tuple(shape)}", hint="the LoRA was trained for another model architecture")
        return d.reshape(shape)


@dataclass
class LoraFile:
    path: Path
    sha256: str
    layout: str                                      # "kohya" | "peft"
    modules: list[LoraModule] = field(default_factory=list)

    def components(self) -> set[str]:
        return {m.component for m in self.modules}

    def deltas(self, component: str, shapes: Mapping[str, tuple], scale: float = 1.0) -> dict[str, np.ndarray]:
        """param -> float32 `scale * delta` for the modules of `component`."""
        out: dict[str, np.ndarray] = {}
        for m in self.modules:
            if m.component == component:
                d = m.delta(tuple(shapes[m.param])) * np.float32(scale)
                out[m.param] = out[m.param] + d if m.param in out else d
        return out

    def record(self, scale: float) -> dict:
        """The manifest / metadata entry: file name, sha256, layout, scale, what it touches."""
        return {"file": self.path.name, "sha256": self.sha256, "layout": self.layout, "scale": float(scale),
                "components": sorted(self.components()), "modules": len(self.modules)}


def load_lora(path, targets: Mapping[str, Mapping[str, tuple]]) -> LoraFile:
    """Read the LoRA file `path` against `targets` (component -> {parameter name: shape}).

    Every tensor of the file must belong to a layer of `targets`; otherwise one LdmError names a few of
    the keys and their count."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: LoRA files are read from .safetensors only (no pickle)",
                         hint="convert it with safetensors, e.g. save_file(torch.load(f, weights_only=True), ...)")
    if not path.is_file():
        raise UsageError(f"LoRA file {path} does not exist")
    tensors, metadata = _read(path)
    if not tensors:
        raise LdmError(f"{path} holds no tensors", hint="this is not a LoRA file")
    from ldm_deploy.fileio import sha256_file

    kohya = any(k.startswith("lora_") for k in tensors)
    parse = _parse_kohya if kohya else _parse_peft
    groups, unknown = parse(tensors, targets)
    if unknown:
        raise LdmError(f"{path}: {len(unknown)} of {len(tensors)} keys are not LoRA weights of this model's "
                       f"U-Net / text encoder(s) (e.g. {', '.join(sorted(unknown)[:SHOW])})",
                       hint="ldm-deploy reads kohya (lora_unet_*/lora_te_*, SDXL's lora_te1_*/lora_te2_*) and "
                            "diffusers/peft (lora_A/lora_B) LoRA/LoCon files for SD 1.x/2.x and SDXL models; "
                            "LoHa/LoKr/DoRA are not supported, and a LoRA for another model family matches no layer")
    alphas = _config_alphas(path, metadata)
    modules = []
    incomplete = []
    for (component, module), parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            incomplete.append(f"{component}:{module}")
            continue
        alpha = parts.get("alpha")
        if alpha is None:
            alpha = _pattern_alpha(alphas.get(component), module)
        rslora = bool((alphas.get(component) or {}).get("use_rslora", False))
        modules.append(LoraModule(component, module + ".weight", parts["down"], parts["up"],
                                  None if alpha is None else float(np.asarray(alpha, np.float64).reshape(-1)[0]),
                                  rslora))
    if incomplete:
        raise LdmError(f"{path}: {len(incomplete)} LoRA modules lack their down/A or up/B half "
                       f"(e.g. {', '.join(incomplete[:SHOW])})", hint="the file is truncated or not a LoRA")
    for m in modules:   # shapes are checked now, not at the first switch
        m.delta(tuple(targets[m.component][m.param]))
    return LoraFile(path, sha256_file(path), "kohya" if kohya else "peft", modules)


def merge(base: Mapping[str, np.ndarray], loras: Sequence[tuple["LoraFile", float]], component: str,
          shapes: Mapping[str, tuple], *, workers: int | None = None) -> dict[str, np.ndarray]:
    """`base[name] + sum over the LoRAs of scale * delta[name]`, in float32 then cast to the base dtype, for
    every weight of `component` a LoRA touches: the merged weights, for the run-time switch
    (runtime/lora_switch.py) and the training evaluation.

    Each LoRA's scaled deltas are summed in module order, the LoRAs in order, and the base (upcast to float32)
    added last, so the result depends only on the base and the LoRAs: recomputed from the base every time,
    A, then B, then none gives the base bit for bit (no drift from adding and subtracting). One weight at a
    time: no LoRA's full set of float32 deltas is held at once (SD 1.5: ~1 GB per file), and the weights are
    spread over a thread pool (numpy's matmul and ufuncs release the GIL). Weights outside `base` are left out;
    weights no LoRA touches are the base arrays themselves."""
    by_param: dict[str, list[list[tuple[LoraModule, float]]]] = {}
    for k, (lora, scale) in enumerate(loras):
        for m in lora.modules:
            if m.component == component and m.param in base:
                per_lora = by_param.setdefault(m.param, [[] for _ in loras])
                per_lora[k].append((m, scale))

    def one(name: str) -> np.ndarray:
        total = None
        for modules in by_param[name]:
            part = None
            for m, scale in modules:
                d = m.delta(tuple(shapes[name]))
                d *= np.float32(scale)
                part = d if part is None else np.add(part, d, out=part)
            if part is not None:
                total = part if total is None else np.add(total, part, out=total)
        w = base[name]
        np.add(total, w, out=total)      # float32 + the base upcast to float32
        return total.astype(w.dtype, copy=False)

    out = dict(base)
    names = list(by_param)
    workers = min(len(names), workers or MERGE_WORKERS)
    if workers <= 1:
        out.update((n, one(n)) for n in names)
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-merge") as pool:
        out.update(zip(names, pool.map(one, names)))
    return out


# --- parsing ----------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise LdmError(f"safetensors is not installed: {e}", hint="pip install safetensors") from None
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise LdmError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0][:200]}") from None
    return tensors, metadata


def _module_table(targets: Mapping[str, Mapping[str, tuple]]) -> dict[str, dict[str, str]]:
    """component -> {module path as files name it: our module path} for every weight in targets.

    transformers 5's CLIPTextModel names its parameters `encoder.layers...`; LoRA files (and transformers 4)
    say `text_model.encoder.layers...`: both are accepted. U-Net modules also answer to their original
    (SGM) names, which kohya's SDXL files use."""
    table = {}
    for c, names in targets.items():
        mods = {p[: -len(".weight")]: p[: -len(".weight")] for p in names if p.endswith(".weight")}
        if c in TEXT_ENCODERS:
            mods.update({f"text_model.{m}": m for m in list(mods) if not m.startswith("text_model.")})
        if c == "unet":
            mods.update({sgm: m for m, sgm in _sgm_names(list(mods)).items() if sgm not in mods})
        table[c] = mods
    return table


_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _sgm_names(modules: list[str]) -> dict[str, str]:
    """diffusers U-Net module path -> its name in the original (SGM / LDM) U-Net, from the block layout.

    input_blocks: conv_in, then per down level L resnets (+ their attentions at index 1) and a downsampler
    (`.0.op`); middle_block: resnet, attention, resnet; output_blocks: per up level L+1 resnets (+ attentions)
    with the upsampler after them (`.1.conv`, or `.2.conv` where the level has attentions). L (layers per
    block) is read from the down_blocks.0 resnets; modules that fit none of these keep their own names."""
    resnets0 = [int(m.group(1)) for p in modules if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))]
    if not resnets0:
        return {}
    per = max(resnets0) + 1                                        # layers_per_block
    up_attn = {int(m.group(1)) for p in modules if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))}
    out = {}
    for p in modules:
        sgm = None
        if p in _TOP_SGM:
            sgm = _TOP_SGM[p]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", p):
            b, j, rest = int(m.group(2)), int(m.group(4)), m.group(5)
            index = 1 + b * (per + 1) + j if m.group(1) == "down" else b * (per + 1) + j
            sgm = f"{'input' if m.group(1) == 'down' else 'output'}_blocks.{index}.{0 if m.group(3) == 'resnets' else 1}"
            sgm += "." + (_resnet_sgm(rest) if m.group(3) == "resnets" else rest)
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", p):
            sgm = f"input_blocks.{1 + int(m.group(1)) * (per + 1) + per}.0.op"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", p):
            b = int(m.group(1))
            sgm = f"output_blocks.{b * (per + 1) + per}.{2 if b in up_attn else 1}.conv"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", p):
            kind, j, rest = m.groups()
            index = 1 if kind == "attentions" else 2 * int(j)
            sgm = f"middle_block.{index}." + (_resnet_sgm(rest) if kind == "resnets" else rest)
        if sgm is not None:
            out[p] = sgm
    return out


def _resnet_sgm(rest: str) -> str:
    return _RESNET_SGM.get(rest, rest)


def _parse_kohya(tensors, targets):
    table = {c: {k.replace(".", "_"): v for k, v in mods.items()} for c, mods in _module_table(targets).items()}
    groups: dict = {}
    unknown = []
    for key, value in tensors.items():
        match = _KOHYA.match(key)
        component = KOHYA_PREFIX.get(match.group(1)) if match else None
        module = table.get(component, {}).get(match.group(2)) if component else None
        if module is None:
            unknown.append(key)
            continue
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match.group(3)]
        groups.setdefault((component, module), {})[part] = value
    return groups, unknown


def _parse_peft(tensors, targets):
    table = _module_table(targets)
    groups: dict = {}
    unknown = []
    for key, value in tensors.items():
        for pattern, parts in ((_PEFT, {"lora_A": "down", "lora_B": "up"}), (_OLD_DIFFUSERS, None),
                               (_ALPHA, None)):
            match = pattern.match(key)
            if match:
                break
        if not match:
            unknown.append(key)
            continue
        if pattern is _ALPHA:
            part = "alpha"
        elif pattern is _PEFT:
            part = parts[match.group(2)]
        else:
            part = match.group(2)
        resolved = _resolve(match.group(1), table)
        if resolved is None:
            unknown.append(key)
            continue
        groups.setdefault(resolved, {})[part] = value
    return groups, unknown


def _resolve(name: str, table: Mapping[str, Mapping[str, str]]) -> tuple[str, str] | None:
    """(component, module path) for a peft/diffusers module name, or None."""
    name = name.replace(".base_layer", "")
    component = None
    for prefix, comp in _PREFIXES:
        if name.startswith(prefix):
            name, component = name[len(prefix):], comp
            break
    candidates = [component] if component else [c for c in COMPONENTS if name in table.get(c, {})]
    hits = [c for c in candidates if name in table.get(c, {})]
    return (hits[0], table[hits[0]][name]) if len(hits) == 1 else None


def _config_alphas(path: Path, metadata: dict) -> dict[str, dict]:
    """component -> peft LoraConfig fields (lora_alpha, r, alpha_pattern, use_rslora) where the file says."""
    out: dict[str, dict] = {}
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise LdmError(f"{path}: its {METADATA_KEY} metadata is not JSON") from None
        for component in COMPONENTS:      # diffusers packs "<component>.<field>"
            fields = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
            if fields:
                out[component] = fields
    config = path.with_name("adapter_config.json")
    if not out and config.is_file():      # peft's save_pretrained folder: one config for the wrapped model
        try:
            fields = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LdmError(f"{config} is not JSON") from None
        out = {c: fields for c in COMPONENTS}
    return out


def _pattern_alpha(config: dict | None, module: str) -> float | None:
    """peft's alpha for `module`: the longest matching alpha_pattern key, else lora_alpha; None without a config."""
    if not config:
        return None
    pattern = config.get("alpha_pattern") or {}
    hits = [k for k in pattern if re.fullmatch(rf"(.*\.)?{k}", module)]
    if hits:
        return float(pattern[max(hits, key=len)])
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def torch_targets(modules: Mapping[str, object]) -> dict[str, dict[str, tuple]]:
    """component -> {parameter name: shape} of the Linear / Conv2d weights of torch modules (export side)."""
    out = {}
    for component, module in modules.items():
        if module is None:
            continue
        out[component] = {name: tuple(p.shape) for name, p in module.named_parameters()
                          if name.endswith(".weight") and p.ndim in (2, 4)}
    return out
