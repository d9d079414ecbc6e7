"""PGD-AT has no params of its own: its attack is the training attack (`threat` and the method's `attack`)."""

from ..schema import NoParams
from . import register_params

register_params("pgd_at")(NoParams)
