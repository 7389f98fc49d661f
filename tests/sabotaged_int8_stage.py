"""A stage kind for tests: quantize.ptq with a sabotaged weight scale, the kind of bug the output check exists for."""

from dataclasses import replace

from safetensors.torch import load_file, save_file

from slimline.quantize import ptq

SPEC = replace(ptq.SPEC, kind="test.sabotaged-int8")
Params = ptq.Params
check_shape = ptq.check_shape


def run(params, inputs, ctx):
    """Quantize for real, then scale every stored weight scale of the MLP layers by 40 (a wrong scale)."""
    output = ptq.run(params, inputs, ctx)
    weights = ctx.work_dir / "model.safetensors"
    tensors = load_file(weights)
    for name in [n for n in tensors if n.endswith("mlp.down_proj.weight_scale")]:
        tensors[name] = tensors[name] * 40
    save_file(tensors, weights, metadata={"format": "pt"})
    return output
