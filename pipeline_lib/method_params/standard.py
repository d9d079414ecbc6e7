"""Standard (clean) training has no params of its own."""

from ..schema import NoParams
from . import register_params

register_params("standard")(NoParams)
