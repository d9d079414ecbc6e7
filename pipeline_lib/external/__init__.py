"""Published models the pipeline did not train: import them as project checkpoints.

Modules: `config` (the `external:` params section), `layouts` (key-mapping adapters for
the state_dict layouts of the official repos and RobustBench), `scripted` (TorchScript
networks embedded in a checkpoint), `importer` (checks, conversion, provenance).
The `import@<name>` DVC stage runs `arpipe import-model <name>`.
"""

from .config import ExternalModel
from .importer import ImportModelError, import_model

__all__ = ["ExternalModel", "ImportModelError", "import_model"]
