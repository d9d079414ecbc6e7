"""arpipe library: data, models, attacks, training objectives, evaluation and aggregation.

The `stages/` package is a thin Typer layer over this library; everything that
computes lives here so it can be imported, tested and reused outside DVC.
"""

__version__ = "0.1.0"
