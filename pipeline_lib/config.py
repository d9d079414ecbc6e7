"""Typed, validated params: `load_params("params.yaml") -> Params`.

Every section is a strict pydantic model: unknown keys, unknown dataset names,
out-of-range values and inconsistent cross-references fail here with a message
naming the key and the bad value, before a stage loads any data. Sections mirror
params.yaml one to one so that DVC can depend on exactly the keys a stage reads.

This module imports no subsystem that pulls in torch (the sections it composes live in
torch-free `config` modules of their packages): what only a registry knows, a model
architecture and a method's objective and params, is checked by the registries themselves
(`pipeline_lib.registered.check_registered`, torch-free too), which the stages call on the loaded params.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .aggregation.config import AggregateParams
from .corruption.config import CorruptionParams
from .data.spec import SPECS, known_dataset
from .evaluation.config import EvaluateParams
from .external.config import ExternalModel, check_names
from .schema import StrictModel
from .errors import UserError


class RuntimeParams(StrictModel):
    """How to run, not what to compute: not a DVC dependency of any stage (docs/gpu.md).

    Everything here falls back cleanly on a CPU: bf16 autocast runs (slowly) on CPU,
    channels_last and the pinned loader are plain CPU code paths, and several processes
    use the gloo backend.
    """

    device: str = "auto"            # auto | cpu | cuda | cuda:N
    deterministic: bool = True      # deterministic kernels (see runtime.configure_determinism)
    num_threads: int | None = Field(default=None, ge=1)  # torch intra-op threads; None = torch default
    # CPU kernels: portable pins ATen/MKL/oneDNN to AVX2 (same bits on any x86-64), native lets
    # them pick the CPU's best; applied before torch loads (pipeline_lib.numerics, docs/reproducibility.md)
    numerics: Literal["portable", "native"] = "portable"
    progress: bool = True           # progress bars
    # -- GPU fast paths --------------------------------------------------------------------
    amp: Literal["none", "bf16"] = "none"   # bf16 autocast over the training loss, attack included (runtime.autocast)
    channels_last: bool = False             # NHWC model weights and batches (tensor-core convolutions)
    # device: the uint8 dataset lives on the training device, batches are sliced and augmented
    # there (default; fastest while it fits). pinned: it stays in host memory; worker processes
    # gather each batch, which is pinned and copied asynchronously (datasets too big for the device).
    loader: Literal["device", "pinned"] = "device"
    num_workers: int = Field(default=2, ge=0)   # loader: pinned only; 0 = gather in the main process
    # -- several processes (torch.distributed; the training stages relaunch under torchrun) --
    nproc_per_node: int = Field(default=1, ge=1)    # processes per machine: one per GPU
    nnodes: int = Field(default=1, ge=1)            # machines; each runs the same stage command
    rdzv_endpoint: str = "localhost:29400"          # host:port of the c10d rendezvous (nnodes > 1)
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = True            # BatchNorm statistics of the global batch (false: each process its shard's)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}", v):
            raise ValueError(f"rdzv_endpoint must be host:port, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_gpu_per_process(self) -> RuntimeParams:
        if self.nproc_per_node > 1 and self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} would put all {self.nproc_per_node} processes on one GPU; "
                             "use device: auto or cuda (process i takes GPU i)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class DataParams(StrictModel):
    dataset: str
    root: str = "data"
    download: bool = False
    n_train: int | None = Field(default=None, ge=1)   # seeded random subset of the train split; None = all
    subset_seed: int = 0
    n_val: int = Field(default=1000, ge=1)             # first n test images, clean accuracy each epoch
    augment: Literal["default", "none", "flip", "crop_flip"] = "default"

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return known_dataset(v)

    @model_validator(mode="after")
    def _sizes(self) -> DataParams:
        spec = SPECS[self.dataset]
        if self.n_train is not None and self.n_train > spec.train_size:
            raise ValueError(f"n_train={self.n_train} exceeds the {spec.train_size} training images of {self.dataset}")
        if self.n_val > spec.test_size:
            raise ValueError(f"n_val={self.n_val} exceeds the {spec.test_size} test images of {self.dataset}")
        return self

    @property
    def augmentation(self) -> str:
        return SPECS[self.dataset].default_augment if self.augment == "default" else self.augment


class ModelParams(StrictModel):
    arch: str   # a registered architecture: checked against the model registry (pipeline_lib.registered)


class AttackOverride(StrictModel):
    """A method's changes to the training attack built from `threat` (pipeline_lib.attacks.training)."""

    step_size: float | None = Field(default=None, gt=0, le=1)
    steps: int | None = Field(default=None, ge=1, le=1000)
    random_start: bool | None = None
    bn_mode: Literal["eval", "train"] | None = None


class OptimParams(StrictModel):
    """SGD with a step schedule (milestones in epochs) or cosine annealing."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=list)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    # lr of the first epoch only, the schedule from the second on (AR-AT's official CustomLR: 0.02)
    first_epoch_lr: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _milestones(self) -> OptimParams:
        ms = self.milestones
        if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
            raise ValueError(f"milestones must be strictly increasing, got {ms}")
        if ms and (ms[0] < 1 or ms[-1] >= self.epochs):
            raise ValueError(f"milestones {ms} must lie in [1, epochs={self.epochs})")
        return self


class OptimOverride(StrictModel):
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float | None = Field(default=None, ge=0)
    nesterov: bool | None = None
    schedule: Literal["multistep", "cosine", "constant"] | None = None
    milestones: list[int] | None = None
    lr_gamma: float | None = Field(default=None, gt=0, le=1)
    first_epoch_lr: float | None = Field(default=None, gt=0)


class ThreatParams(StrictModel):
    """The L-inf threat model shared by training attacks and evaluation."""

    eps: float = Field(gt=0, le=1)
    train_step_size: float = Field(gt=0, le=1)
    train_steps: int = Field(ge=1, le=1000)


class PretrainParams(StrictModel):
    optim: OptimParams


class MethodSpec(StrictModel):
    """One finetune instance. `objective` defaults to the instance's key, so
    `arrest_phi30: {objective: arrest, params: {phi_deg: 30}}` adds a sweep point."""

    objective: str | None = None
    init: Literal["pretrained", "scratch"] = "pretrained"
    optim: OptimOverride = OptimOverride()
    attack: AttackOverride = AttackOverride()
    params: dict[str, Any] = Field(default_factory=dict)   # validated by the objective's registry entry

    def objective_of(self, name: str) -> str:
        """The registered objective of instance `name`."""
        return self.objective or name

    def merged_optim(self, defaults: OptimParams) -> OptimParams:
        """finetune.optim with this instance's optim overrides, key by key."""
        return OptimParams.model_validate({**defaults.model_dump(), **self.optim.model_dump(exclude_none=True)})


class FinetuneParams(StrictModel):
    methods: list[str] = Field(min_length=1)
    optim: OptimParams          # defaults each method's `optim` overrides key by key


class MlflowParams(StrictModel):
    experiment: str = "arpipe"


class Params(StrictModel):
    seed: int = 0
    # Extra training seeds: each replicates pretraining, every finetune, evaluation and corruption
    # (dvc.yaml's *_rep stages, outputs under seed<k>/); the aggregate adds mean ± std over all seeds.
    replicates: list[int] = Field(default_factory=list)
    runtime: RuntimeParams = RuntimeParams()
    data: DataParams
    model: ModelParams
    threat: ThreatParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    method: dict[str, MethodSpec]
    evaluate: EvaluateParams
    external: dict[str, ExternalModel] = Field(default_factory=dict)   # published models to import (import@<name>)
    corruption: CorruptionParams    # corruption robustness (corrupt / corruption stages)
    aggregate: AggregateParams = AggregateParams()   # aggregation and regression gate
    mlflow: MlflowParams = MlflowParams()

    @model_validator(mode="after")
    def _cross_refs(self) -> Params:
        for name in self.finetune.methods:
            if name not in self.method:
                raise ValueError(f"finetune.methods lists {name!r} but method.{name} is not defined; "
                                 f"defined: {', '.join(sorted(self.method))}")
        if len(set(self.finetune.methods)) != len(self.finetune.methods):
            raise ValueError(f"finetune.methods has duplicates: {self.finetune.methods}")
        for name, spec in self.method.items():
            try:
                optim = spec.merged_optim(self.finetune.optim)
            except ValidationError as exc:
                raise ValueError(f"method.{name} (merged with finetune.optim): {format_errors(exc)}") from None
            self._check_batch_size(f"method.{name}.optim", optim.batch_size)
        self._check_batch_size("pretrain.optim", self.pretrain.optim.batch_size)
        test_size = SPECS[self.data.dataset].test_size
        if self.evaluate.n_eval > test_size:
            raise ValueError(f"evaluate.n_eval={self.evaluate.n_eval} exceeds the {test_size} test images "
                             f"of {self.data.dataset}")
        if len(set(self.replicates)) != len(self.replicates) or self.seed in self.replicates \
                or any(r < 0 for r in self.replicates):
            raise ValueError(f"replicates={self.replicates} must be distinct non-negative seeds other than "
                             f"seed={self.seed}")
        trained = ["standard", *self.finetune.methods]
        check_names(self.external, trained)
        for name in self.evaluate.models:
            if name not in trained and name not in self.external:
                raise ValueError(f"evaluate.models lists {name!r}, which is neither 'standard', in "
                                 f"finetune.methods {self.finetune.methods} nor in external {sorted(self.external)}")
            if name in self.external and self.external[name].dataset != self.data.dataset:
                raise ValueError(f"evaluate.models lists {name!r}, imported for external.{name}.dataset="
                                 f"{self.external[name].dataset}, but data.dataset={self.data.dataset}")
        if self.aggregate.reference == "models":
            absent = [m for m in self.aggregate.reference_models if m not in self.evaluate.models]
            if absent:
                raise ValueError(f"aggregate.reference: models needs every reference model evaluated; "
                                 f"{absent} not in evaluate.models {self.evaluate.models}")
        return self

    def _check_batch_size(self, where: str, batch_size: int) -> None:
        # Training drops the last partial batch: a batch larger than the subset means no step at all.
        n = self.data.n_train or SPECS[self.data.dataset].train_size
        if batch_size > n:
            raise ValueError(f"{where}.batch_size={batch_size} exceeds the {n} training images (data.n_train)")


class ParamsError(UserError, ValueError):
    """Raised for an invalid params file; the message names each bad key and value."""


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # our validators' messages name the key already
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a parameter here)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{loc}: {msg}{shown}" if loc else msg)
    return "; ".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"{source}: {format_errors(exc)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist: pass --params FILE, or `arpipe profile` writes "
                          "the default params.yaml")
    if path.is_dir():
        raise ParamsError(f"params file {path} is a directory: pass --params with the YAML file, e.g. "
                          f"{path / 'params.yaml'}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
