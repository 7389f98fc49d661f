"""A stage kind for tests whose backend package is not installed anywhere."""

from slimline.stage import StageParams, StageSpec, same_shape

SPEC = StageSpec(
    kind="test.missing-backend", requires=("slimline_no_such_backend",), extra="gpu", device="cuda", data=()
)
check_shape = same_shape


class Params(StageParams):
    """No params."""


def run(params, inputs, ctx):
    raise AssertionError("preflight should have refused or skipped this stage")
