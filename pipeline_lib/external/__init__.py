"""Published models the pipeline did not train: import them as project checkpoints.

Modules: `config` (the `external:` params section), `layouts` (key-mapping adapters for
the state_dict layouts of the official repos and RobustBench), `scripted` (TorchScript
networks embedded in a checkpoint), `importer` (checks, conversion, provenance).
The `import@<name>` DVC stage runs `arpipe import-model <name>`.

Nothing is imported here: loading a checkpoint pulls in `scripted` alone, so the training and
evaluation stages depend on that module, not on the importer (tests/test_code_deps.py).
"""
