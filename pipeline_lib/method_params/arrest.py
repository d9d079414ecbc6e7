"""ARREST's params (pipeline_lib/methods/arrest.py, whose docstring explains each choice)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import StrictModel
from . import register_params

DistanceName = Literal["cosine", "angle", "l2"]   # RGKD's Dist (pipeline_lib/methods/losses.py: distance)


@register_params("arrest")
class ArrestParams(StrictModel):
    rgkd: bool = True                        # RGKD term on (full, AFT+RGKD) or off (AFT, AFT+NR)
    # RGKD weight lambda. The paper's value was not available; 20 was the best of {2, 5, 10, 20, 50, 100}
    # on the default profile (Fashion-MNIST, small CNN, eps 0.1, 3 epochs): clean and PGD-20 both rise
    # from 2 to 20 and plateau after. The paper profiles use it too (see methods/arrest.py's docstring).
    lam: float = Field(default=20.0, ge=0)
    distance: DistanceName = "cosine"        # Dist of RGKD: cosine (1 - cos) | angle (radians) | l2
    layer: str | None = None                 # None: penultimate h = forward_features; else a module name
    noisy_replay: bool = True                # NR on (full, AFT+NR) or off (AFT, AFT+RGKD)
    phi_deg: float = Field(default=37.5, gt=0, le=180)  # NR threshold on the drift angle, degrees
    noise_eps: float | None = Field(default=None, gt=0, le=1)  # NR noise half-width; None: the attack eps
