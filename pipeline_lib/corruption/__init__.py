"""Corruption robustness: CIFAR-10-C / CIFAR-100-C and the same corruptions generated for any dataset.

Modules (import them directly; this package root stays light because
`pipeline_lib.config` imports it for the params section):

* `config`     - the `corruption` params section and the canonical corruption names
* `ops`        - the 19 corruptions of Hendrycks & Dietterich, batched, one module per family
* `generate`   - seeded, chunk-independent generation of a corrupted test set
* `store`      - the CIFAR-C on-disk layout (`<name>.npy`, `labels.npy`), read and written
* `cifar_c`    - the released Zenodo archives: download, md5 check, extraction
* `build_set`  - the `corrupt` stage's work
* `accuracy_grid` - accuracy per corruption x severity and its summary
* `mce`        - mCE: corruption error relative to the run's standard model (the aggregator calls it)
* `heatmap`, `samples` - PNG plots
* `job`        - the `corruption@<model>` stage's work
"""

from .config import ALL, EXTRA, SEVERITIES, STANDARD, CorruptionParams

__all__ = ["ALL", "EXTRA", "SEVERITIES", "STANDARD", "CorruptionParams"]
