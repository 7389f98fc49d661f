"""int8 MatMuls with per-token activation ranges, written into an ONNX graph.

ONNX Runtime's own dynamic quantization (``DynamicQuantizeLinear``) gives the whole activation
tensor one range. Real checkpoints have outlier tokens (the first token's massive activations),
and one range per tensor then leaves every other token a handful of levels: SmolLM2-135M lost
all accuracy that way. Here each MatMul whose weight is a constant becomes

    u = clip(round(x / s) - r, 0, 255)      per token: s = (max - min) / 255, r = round(min / s)
    y = s * w_scale * (MatMulInteger(u, Wq) + r * sum_k Wq[k, :])

with int8 weights per output channel (symmetric; 7-bit where the CPU lacks VNNI, so that
uint8 x int8 pairs summed in 16 bits cannot saturate). Activations are uint8 because ONNX Runtime's
optimised integer kernels are uint8 x int8 (its int8 x int8 path measured 3x slower). MatMuls that
read the same input share one quantization of it. The arithmetic is the torch path's
(``quantize/int8.py``, whose int8 values are these minus 128), so both give the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedInput:
    """Names of one activation's per-token quantization: uint8 values, scale and offset."""

    values: str
    scale: str
    offset: str


def quantize_weight(W: np.ndarray, per_channel: bool, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights of an ONNX MatMul weight W [in, out]: values and scales per output column."""
    top = 2 ** (bits - 1) - 1
    amax = np.abs(W).max(axis=0) if per_channel else np.full(W.shape[1], np.abs(W).max())
    scale = np.maximum(amax, 1e-12).astype(np.float32) / top
    values = np.clip(np.round(W / scale), -top - 1, top).astype(np.int8)
    return values, scale


def constant_weights(graph) -> dict[str, np.ndarray]:
    """2-D float initializers of the graph, by name."""
    from onnx import TensorProto, numpy_helper

    return {
        init.name: numpy_helper.to_array(init)
        for init in graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2
    }


def quantize_graph_per_token(model, per_channel: bool, weight_bits: int, skip: tuple[str, ...] = ()) -> list[str]:
    """Rewrite every MatMul with a constant 2-D weight into the per-token int8 form; return their names."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = constant_weights(graph)
    shared = {"one_over_255": np.array(1 / 255, np.float32)}
    shared |= {"uint8_min": np.array(0, np.float32), "uint8_max": np.array(255, np.float32)}
    shared |= {"tiny": np.array(1e-12, np.float32), "last_axis": np.array([-1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(value, f"q8/{name}") for name, value in shared.items())
    quantized_inputs: dict[str, QuantizedInput] = {}
    new_nodes, rewritten, used_weights = [], [], set()
    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight_name not in weights or any(part in node.name for part in skip):
            new_nodes.append(node)
            continue
        source = node.input[0]
        if source not in quantized_inputs:
            quantized_inputs[source] = QuantizedInput(*(f"q8/{source}/{n}" for n in ("values", "scale", "offset")))
            new_nodes += activation_nodes(source, quantized_inputs[source])
        values, scale = quantize_weight(weights[weight_name], per_channel, weight_bits)
        prefix = f"q8/{weight_name}"
        graph.initializer.extend(
            [
                numpy_helper.from_array(values, f"{prefix}/values"),
                numpy_helper.from_array(scale, f"{prefix}/scale"),
                numpy_helper.from_array(values.sum(axis=0, dtype=np.int64).astype(np.float32), f"{prefix}/sums"),
            ]
        )
        new_nodes += matmul_nodes(node, quantized_inputs[source], prefix, helper)
        used_weights.add(weight_name)
        rewritten.append(node.name or node.output[0])
    drop_unused_initializers(graph, used_weights, new_nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    log.info("%d MatMuls rewritten to int8 with per-token activations", len(rewritten))
    return rewritten


def activation_nodes(source: str, q: QuantizedInput) -> list:
    """Per-token range of ``source`` [..., in] and its int8 values."""
    from onnx import TensorProto, helper

    n = f"q8/{source}"
    make = helper.make_node
    return [
        make("ReduceMin", [source, "q8/last_axis"], [f"{n}/min"], keepdims=1),
        make("ReduceMax", [source, "q8/last_axis"], [f"{n}/max"], keepdims=1),
        make("Sub", [f"{n}/max", f"{n}/min"], [f"{n}/range"]),
        make("Mul", [f"{n}/range", "q8/one_over_255"], [f"{n}/scale_raw"]),
        make("Max", [f"{n}/scale_raw", "q8/tiny"], [q.scale]),  # a constant row: any scale, not zero
        make("Div", [f"{n}/min", q.scale], [f"{n}/min_steps"]),
        make("Round", [f"{n}/min_steps"], [q.offset]),
        make("Div", [source, q.scale], [f"{n}/steps"]),
        make("Round", [f"{n}/steps"], [f"{n}/rounded"]),
        make("Sub", [f"{n}/rounded", q.offset], [f"{n}/shifted"]),
        make("Clip", [f"{n}/shifted", "q8/uint8_min", "q8/uint8_max"], [f"{n}/clipped"]),
        make("Cast", [f"{n}/clipped"], [q.values], to=TensorProto.UINT8),
    ]


def matmul_nodes(node, q: QuantizedInput, prefix: str, helper) -> list:
    """The int8 product of one MatMul, rescaled to float into the MatMul's output name."""
    from onnx import TensorProto

    make, out = helper.make_node, node.output[0]
    return [
        make("MatMulInteger", [q.values, f"{prefix}/values"], [f"{out}/q8_int32"]),
        make("Cast", [f"{out}/q8_int32"], [f"{out}/q8_float"], to=TensorProto.FLOAT),
        make("Mul", [q.offset, f"{prefix}/sums"], [f"{out}/q8_offset_term"]),
        make("Add", [f"{out}/q8_float", f"{out}/q8_offset_term"], [f"{out}/q8_corrected"]),
        make("Mul", [f"{out}/q8_corrected", q.scale], [f"{out}/q8_token_scaled"]),
        make("Mul", [f"{out}/q8_token_scaled", f"{prefix}/scale"], [out]),
    ]


def drop_unused_initializers(graph, candidates: set[str], nodes: list) -> None:
    """Remove the float weights that no node reads any more (the int8 copies replace them)."""
    read = {name for node in nodes for name in node.input}
    keep = [init for init in graph.initializer if init.name not in candidates or init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
