"""A stage kind for tests whose backend package is not installed anywhere."""

from slimline.stage import StageParams, same_shape

KIND = "test.missing-backend"
REQUIRES = ("slimline_no_such_backend",)
EXTRA = "gpu"
DEVICE = "cuda"
DATA = ()
check_shape = same_shape


class Params(StageParams):
    """No params."""


def run(params, inputs, ctx):
    raise AssertionError("preflight should have refused or skipped this stage")
