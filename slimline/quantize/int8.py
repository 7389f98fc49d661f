"""int8 linear layers through torch.ao (fbgemm/x86 kernels): quantize, save as safetensors, rebuild on load.

torch.ao's quantized modules hold packed weights that safetensors cannot store, and pickling them
is refused. So an int8 artifact stores plain tensors: every full-precision tensor in the parent's
dtype, and per quantized linear layer its int8 weight, weight scales and zero points, bias and,
for static quantization, the input and output scales and zero points. ``int8_recipe.json`` names
the layers and the scheme; ``load_int8_model`` rebuilds exactly the same modules from these
numbers, so nothing is re-derived on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import (
    DeQuantStub,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QuantStub,
)
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

log = logging.getLogger(__name__)

RECIPE = "int8_recipe.json"
WEIGHTS = "model.safetensors"
Mode = Literal["dynamic", "static"]
OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver, "histogram": HistogramObserver}


class StaticInt8Linear(torch.nn.Module):
    """A linear layer between a quantize and a dequantize step: int8 in, int8 GEMM, float out."""

    def __init__(self, linear: torch.nn.Module) -> None:
        """Wrap ``linear`` (float before conversion, ``nnq.Linear`` after)."""
        super().__init__()
        self.quant = QuantStub()
        self.linear = linear
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize the input with its calibrated scale, multiply in int8, return floats."""
        return self.dequant(self.linear(self.quant(x)))


class PerTokenInt8Linear(torch.nn.Module):
    """int8 weights (symmetric, per output channel or per tensor) times int8 activations quantized per token.

    Each token (row) of the input gets its own asymmetric 8-bit range at run time, so an outlier
    token, such as the first token's massive activations in real checkpoints, no longer crushes the
    resolution of every other token as one range per tensor does. The product runs in int8 with
    int32 accumulation (``torch._int_mm``); the offset is put back through the weights' row sums,
    then both scales are applied in float. ``export/int8_graph.py`` writes the same arithmetic
    into ONNX graphs.
    """

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """qweight: [out, in] int8; weight_scale: [out] (or [1]) float32; bias: [out] or None."""
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.float())
        # sum over inputs of each output channel's int8 weights: removes the activation zero point
        self.register_buffer("weight_sums", self.qweight.sum(dim=1, dtype=torch.int32).float(), persistent=False)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, granularity: str, bits: int = 8) -> PerTokenInt8Linear:
        """Quantize a float linear's weight on the symmetric int``bits`` grid held in int8."""
        W = linear.weight.detach().float()  # [out, in]
        top = 2 ** (bits - 1) - 1
        amax = W.abs().amax(dim=1) if granularity == "per_channel" else W.abs().amax().reshape(1)
        scale = amax.clamp(min=1e-12) / top
        qweight = torch.round(W / scale.reshape(-1, 1)).clamp(-top - 1, top).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize each token to 8 bits with its own range, multiply in int8, rescale to float."""
        rows = x.reshape(-1, self.in_features).float()  # [M, in]
        low, high = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        scale = ((high - low) / 255).clamp(min=1e-12)  # [M, 1]
        offset = torch.round(low / scale) + 128  # x ~ scale * (q + offset)
        q = torch.clamp(torch.round(rows / scale) - offset, -128, 127).to(torch.int8)
        accumulated = torch._int_mm(q, self.qweight.t()).float()  # [M, out]
        out = (accumulated + offset * self.weight_sums) * scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        """Shape, for print(model)."""
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=per_token"


def quantize_per_token_layers(model: torch.nn.Module, names: list[str], granularity: str, bits: int = 8) -> None:
    """Replace each named linear layer by ``PerTokenInt8Linear``."""
    for name in names:
        model.set_submodule(name, PerTokenInt8Linear.from_float(model.get_submodule(name), granularity, bits))


def quantizable_linears(model: torch.nn.Module, include_lm_head: bool) -> list[str]:
    """Names of the decoder's linear layers, and the LM head when asked."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    if include_lm_head and isinstance(model.get_submodule("lm_head"), torch.nn.Linear):
        names.append("lm_head")
    return names


def weight_observer(granularity: str, symmetric: bool, bits: int = 8) -> Any:
    """Observer of int8 weights: one scale per output channel or per tensor, with or without zero points.

    ``bits=4`` keeps the weights on the int4 grid (-8..7) inside int8 storage and kernels.
    """
    limits = {"quant_min": -(2 ** (bits - 1)), "quant_max": 2 ** (bits - 1) - 1}
    if granularity == "per_channel":
        scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=scheme, ch_axis=0, **limits)
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    return MinMaxObserver.with_args(dtype=torch.qint8, qscheme=scheme, **limits)


def dynamic_qconfig(granularity: str, symmetric: bool, bits: int = 8) -> QConfig:
    """Weights quantized ahead; activations quantized per tensor at run time from their own range."""
    activation = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    return QConfig(activation=activation, weight=weight_observer(granularity, symmetric, bits))


def static_qconfig(
    granularity: str, symmetric: bool, observer: str, activation_symmetric: bool, bits: int = 8
) -> QConfig:
    """Weights and activation ranges both fixed ahead, activations from calibration through ``observer``."""
    scheme = torch.per_tensor_symmetric if activation_symmetric else torch.per_tensor_affine
    # reduce_range: 7-bit activations keep x86 kernels without VNNI from overflowing their 16-bit accumulators.
    activation = OBSERVERS[observer].with_args(dtype=torch.quint8, qscheme=scheme, reduce_range=True)
    return QConfig(activation=activation, weight=weight_observer(granularity, symmetric, bits))


def quantize_dynamic_layers(model: torch.nn.Module, names: list[str], qconfig: QConfig) -> None:
    """Replace each named linear layer by torch.ao's dynamically quantized int8 linear."""
    for name in names:
        linear = model.get_submodule(name)
        linear.qconfig = qconfig
        model.set_submodule(name, nnqd.Linear.from_float(linear))


def prepare_static_layers(model: torch.nn.Module, names: list[str], qconfig: QConfig) -> None:
    """Wrap each named linear with quantize/dequantize stubs and attach observers for calibration."""
    for name in names:
        wrapped = StaticInt8Linear(model.get_submodule(name))
        wrapped.qconfig = qconfig
        model.set_submodule(name, wrapped)
    torch.ao.quantization.prepare(model, inplace=True)


@torch.inference_mode()
def calibrate(model: torch.nn.Module, windows: torch.Tensor, advance: Any = lambda n: None) -> None:
    """Run calibration windows [N, T] through the model so the observers see real activations."""
    for window in windows:
        model(input_ids=window[None], use_cache=False)
        advance(1)


def convert_static_layers(model: torch.nn.Module) -> None:
    """Turn observed wrappers into int8 modules with their calibrated scales."""
    torch.ao.quantization.convert(model, inplace=True)


def qtensor_fields(prefix: str, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors behind a quantized tensor: int8 values, scales, zero points."""
    if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales, zero_points = q.q_per_channel_scales(), q.q_per_channel_zero_points()
    else:
        scales, zero_points = torch.tensor([q.q_scale()]), torch.tensor([q.q_zero_point()])
    return {
        f"{prefix}.qweight": q.int_repr(),
        f"{prefix}.weight_scale": scales.double(),
        f"{prefix}.weight_zero_point": zero_points.long(),
    }


def layer_tensors(name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything needed to rebuild one quantized layer, as plain tensors."""
    if isinstance(module, PerTokenInt8Linear):
        tensors = {f"{name}.qweight": module.qweight, f"{name}.weight_scale": module.weight_scale.double()}
        return tensors | ({} if module.bias is None else {f"{name}.bias": module.bias})
    linear = module.linear if isinstance(module, StaticInt8Linear) else module
    tensors = qtensor_fields(name, linear.weight())
    if linear.bias() is not None:
        tensors[f"{name}.bias"] = linear.bias().detach().float()
    if isinstance(module, StaticInt8Linear):
        tensors[f"{name}.input_scale"] = module.quant.scale.double().reshape(1)
        tensors[f"{name}.input_zero_point"] = module.quant.zero_point.long().reshape(1)
        tensors[f"{name}.output_scale"] = torch.tensor([float(linear.scale)], dtype=torch.double)
        tensors[f"{name}.output_zero_point"] = torch.tensor([int(linear.zero_point)])
    return tensors


def full_precision_tensors(model: torch.nn.Module, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's remaining float tensors in ``dtype``; a weight tied to one already kept is stored once."""
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or any(key.startswith(n + ".") for n in names):
            continue
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().to(dtype).contiguous()
    return tensors


def save_int8_model(model: PreTrainedModel, names: list[str], folder: Path, recipe: dict[str, Any]) -> None:
    """Write config, safetensors weights (int8 layers as plain tensors) and the recipe that rebuilds them."""
    dtype = recipe["storage_dtype"]
    tensors = full_precision_tensors(model, names, getattr(torch, dtype))
    for name in names:
        tensors.update(layer_tensors(name, model.get_submodule(name)))
    model.config.save_pretrained(folder)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / RECIPE).write_text(json.dumps({**recipe, "layers": names}, indent=2) + "\n")


def qtensor_from(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Rebuild a quantized weight from its int8 values, scales and zero points."""
    values = tensors[f"{prefix}.qweight"]
    scales, zero_points = tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_zero_point"]
    if scales.numel() == 1 and values.shape[0] != 1:
        return torch._make_per_tensor_quantized_tensor(values, float(scales), int(zero_points))
    return torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)


def rebuild_layer(tensors: dict[str, torch.Tensor], name: str, mode: str, activations: str) -> torch.nn.Module:
    """The int8 module of one layer, from the tensors ``layer_tensors`` stored."""
    if mode == "dynamic" and activations == "per_token":
        return PerTokenInt8Linear(
            tensors[f"{name}.qweight"], tensors[f"{name}.weight_scale"], tensors.get(f"{name}.bias")
        )
    weight = qtensor_from(tensors, name)
    bias = tensors.get(f"{name}.bias")
    out_features, in_features = weight.shape
    if mode == "dynamic":
        layer = nnqd.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(weight, bias)
        return layer
    linear = nnq.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
    linear.set_weight_bias(weight, bias)
    linear.scale = float(tensors[f"{name}.output_scale"])
    linear.zero_point = int(tensors[f"{name}.output_zero_point"])
    wrapped = StaticInt8Linear(linear)
    in_scale, in_zero = float(tensors[f"{name}.input_scale"]), int(tensors[f"{name}.input_zero_point"])
    wrapped.quant = nnq.Quantize(in_scale, in_zero, torch.quint8)
    wrapped.dequant = nnq.DeQuantize()
    return wrapped


def load_int8_model(folder: Path) -> PreTrainedModel:
    """Rebuild an int8 artifact: float tensors into the HF model, then the recorded int8 layers."""
    recipe = json.loads((folder / RECIPE).read_text())
    names = recipe["layers"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    tensors = load_file(folder / WEIGHTS)
    floats = {k: v.float() for k, v in tensors.items() if not any(k.startswith(n + ".") for n in names)}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    model.tie_weights()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    left = [k for k in missing if not any(k.startswith(n + ".") for n in names) and k not in tied]
    if left or unexpected:
        raise ValueError(f"{folder} does not match its config: missing {left}, unexpected {unexpected}")
    # recipes written before per-token activations existed hold torch.ao's per-tensor layers
    activations = recipe.get("activations", "per_tensor")
    for name in names:
        model.set_submodule(name, rebuild_layer(tensors, name, recipe["mode"], activations))
    return model.eval()
