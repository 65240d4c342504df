"""The topology schema: every field a YAML may set, with its type and default.

Loss-, combiner- and virtual-teacher-specific parameters are not listed here: those
sections allow extra keys, and the registered class validates them with its own
``Params`` model (so adding a method never touches this file).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import re

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from ..finite import FiniteModel


class Strict(FiniteModel):
    """A section whose keys are all known: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Open(FiniteModel):
    """A section that carries extra, class-specific parameters (validated later)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


#: most replicas of one peer (a worker each on the ray engine)
MAX_REPLICAS = 1024

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_./-]{0,250}[A-Za-z0-9])?")


def _plain_label(text: str) -> str:
    if not _LABEL.fullmatch(text):
        raise ValueError(f"{text!r} is not a plain Ray node label (letters, digits, '-', '_', '.', '/'; "
                         "no selector operators such as '!' or 'in(...)')")
    return text


#: a Ray node label key or value, matched exactly
LabelText = Annotated[str, AfterValidator(_plain_label)]


class SyntheticSpec(Strict):
    num_train: int = Field(512, ge=1)
    num_test: int = Field(128, ge=1)
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (3, 32, 32)
    num_classes: int = Field(100, ge=2)


class DataConfig(Strict):
    dataset: Literal["cifar10", "cifar100", "digits", "imagefolder", "synthetic"]
    root: str = "~/data"
    download: bool = False
    batch_size: int = Field(64, ge=1)
    test_batch_size: int | None = Field(None, ge=1)
    augment: Literal["standard", "none"] = "standard"
    # options of the standard crop + flip (digits, CIFAR): how the crop pads, and a random rotation after it
    padding_mode: Literal["constant", "reflect"] = "constant"  # reflect: OFD's Pad(4, padding_mode='reflect')
    rotation: float = Field(0.0, ge=0, le=180)  # degrees: RandomRotation(rotation), as Tf-KD's loader (15)
    holdout: float = Field(0.0, ge=0.0, lt=1.0)
    synthetic: SyntheticSpec = SyntheticSpec()
    image_size: int | None = Field(None, ge=8)
    # extra samples per batch (online_kd.data.samplers): class_paired gives each sample a same-class partner (CS-KD)
    sampler: Literal["random", "class_paired"] = "random"
    # each training sample becomes several rows before the forward (online_kd.data.expand): rotation4 (HSAKD)
    expand: str = "none"
    # background loader processes (0: load in the training thread) and batches each loads ahead (online_kd.data.prefetch)
    workers: int = Field(0, ge=0)
    prefetch: int = Field(2, ge=1)


class TrainConfig(Strict):
    epochs: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int = Field(1, ge=1)
    device: str = "auto"
    max_steps_per_epoch: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    channels_last: bool = False  # peers' weights and inputs in NHWC (tensor cores on GPUs)
    # torch.compile each peer's forward: true (inductor) or a backend name (online_kd.engine.accel)
    compile: bool | Literal["inductor", "aot_eager", "eager", "cudagraphs"] = False


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(5.0e-4, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)


class ScheduleConfig(Strict):
    name: Literal["constant", "multistep", "step", "cosine"] = "constant"
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0)
    step_size: int = Field(30, ge=1)
    warmup_epochs: int = Field(0, ge=0)
    # epoch: lr·(e+1)/W in epoch e < W; step: lr·(k+1)/(W·S) at the peer's k-th step (S steps per epoch), as
    # WarmUpLR stepped each iteration (Tf-KD): the per-epoch form of `warmup_epochs: 1` is no warm-up at all
    warmup_per: Literal["epoch", "step"] = "epoch"
    eta_min: float = Field(0.0, ge=0)


class DeepSpeedSpec(Strict):
    """ZeRO-1/2 over a peer's replicas on the ray engine (its replica group is DeepSpeed's data-parallel group)."""

    config: str


class PeerConfig(Strict):
    """A network node."""

    model: str
    model_args: dict[str, Any] = {}
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    frozen: bool = False
    # BatchNorm of the peer while it answers untrained (frozen, or in another peer's stage): eval uses its
    # running statistics; train uses each batch's and updates the running ones, as the official OFD and
    # ReviewKD scripts leave their teacher in train mode (evaluation is always in eval mode)
    bn_mode: Literal["eval", "train"] = "eval"
    init: str | None = None
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    deepspeed: DeepSpeedSpec | None = None
    view: int = Field(0, ge=0)  # augmentation view: peers with different views see differently augmented copies
    task_weight: float = Field(1.0, ge=0)
    # only its probabilities leave it: edges from it read only its 'probs' tap, nothing reads its network
    blackbox: bool = False
    # ray engine: run this peer's workers only on nodes carrying these Ray node labels (ray start --labels)
    node_labels: dict[LabelText, LabelText] = {}


class EnsembleConfig(Open):
    """A virtual node combining members' logits (KDCL); combiner params are extra keys."""

    members: list[str] = Field(min_length=1)
    combine: str = "mean"


class VirtualConfig(Open):
    """A teacher with no network (label smoothing, Tf-KD); kind params are extra keys."""

    kind: str


class WeightSchedule(Strict):
    name: Literal["constant", "linear_warmup", "step", "exponential"] = "constant"
    epochs: int = Field(0, ge=0)
    milestones: list[int] = []
    gamma: float = Field(0.1, ge=0)


class EdgeConfig(Open):
    """One distillation loss from a source node to one or more target peers.

    A pattern entry (``pattern: all_pairs|ring|star|chain`` with ``over``) expands into
    plain edges at load time; loss parameters are the extra keys.
    """

    name: str | None = None
    source: str | None = Field(None, alias="from")
    to: str | list[str] | None = None
    loss: str
    weight: float = Field(1.0, ge=0)
    schedule: WeightSchedule = WeightSchedule()
    until_epoch: int | None = Field(None, ge=0)
    pattern: Literal["all_pairs", "ring", "star", "chain"] | None = None
    over: list[str] | None = None
    center: str | None = None
    # a chain's links in order (over[k] → over[k+1]): each entry's keys (loss parameters, weight) replace the
    # shared ones on that link, e.g. TAKD's λ and T per teacher → assistant → student link
    links: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _endpoints(self) -> "EdgeConfig":
        if self.pattern is None:
            if self.source is None or self.to is None:
                raise ValueError("an edge needs 'from' and 'to' (or a 'pattern' with 'over')")
        else:
            if self.source is not None or self.to is not None:
                raise ValueError(f"a '{self.pattern}' pattern takes 'over', not 'from'/'to'")
            least = 1 if self.pattern == "star" else 2
            if not self.over or len(self.over) < least:
                raise ValueError(f"pattern '{self.pattern}' needs 'over' with at least {least} node{'s' * (least > 1)}")
            if self.pattern == "star" and self.center is None:
                raise ValueError("pattern 'star' needs 'center' (the node that teaches every node in 'over')")
        if self.links is not None:
            if self.pattern != "chain":
                raise ValueError("'links' (per-link parameters) needs 'pattern: chain'")
            if len(self.links) != len(self.over) - 1:
                raise ValueError(f"'links' has {len(self.links)} entries for the {len(self.over) - 1} links of "
                                 f"'over' ({' → '.join(self.over)})")
            for k, link in enumerate(self.links):
                bad = sorted(set(link) & {"from", "to", "loss", "pattern", "over", "center", "links", "name",
                                          "schedule", "until_epoch"})
                if bad:
                    raise ValueError(f"links[{k}]: '{bad[0]}' is the whole entry's; a link sets loss parameters "
                                     "and weight only")
                w = link.get("weight", 0.0)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
                    raise ValueError(f"links[{k}].weight: must be a finite number ≥ 0 (got {w!r})")
        return self


class StageConfig(Open):
    """A phase of the run, in order.

    ``kind: train`` (the default) trains the peers in ``train`` for ``epochs``; the others are
    frozen but still answer. Any other kind is a registered stage kind (``online_kd.stages``)
    that *produces a data set* (a synthetic set, an actively labelled set) from the peers as they
    are at that point; its parameters are the extra keys, validated by the kind. A later training
    stage names it in ``data`` to train on it instead of the topology's data set.
    """

    name: str | None = None
    kind: str = "train"
    train: list[str] = []
    epochs: int | None = Field(None, ge=1)  # None: train.epochs
    after: list[str] = []
    edges: list[str] | None = None  # names of the edges active in this stage (None: all into trained peers)
    task_weight: float | None = Field(None, ge=0)  # CE weight of the trained peers in this stage
    data: str | None = None  # a producing stage whose data set this stage trains on
    freeze_bn: list[str] = []  # trained peers whose BatchNorm statistics stay fixed (e.g. data-free KD)
    # the weights its trained peers leave the stage with: the last epoch's, or those of the epoch with the best
    # test top-1 among the evaluated epochs (ties: the later), as a teacher loaded from an official best checkpoint
    hand_over: Literal["last", "best"] = "last"


class EngineConfig(Strict):
    name: str = "local"  # a registered engine (online_kd.registry.ENGINES)
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] = {}
    colocate: list[list[str]] = []
    max_failures: int = Field(2, ge=-1)  # ray engine: restarts of the worker group from its last checkpoint
    # ray engine: where Ray Train keeps checkpoints, a path every node sees or a pyarrow URI (s3://, gs://, file://);
    # None: <run directory>/ray, which only works on one machine
    storage: str | None = Field(None, min_length=1)
    storage_endpoint: str | None = Field(None, min_length=1)  # an S3-compatible store's endpoint (MinIO, Ceph)
    placement: Literal["pack", "spread"] = "pack"  # the workers' placement group strategy (PACK or SPREAD)

    @field_validator("storage_endpoint")
    @classmethod
    def _endpoint_needs_s3(cls, endpoint, info):
        if endpoint is not None and not (info.data.get("storage") or "").startswith("s3://"):
            raise ValueError("an endpoint is for an S3-compatible store: set engine.storage to an s3:// URI too")
        return endpoint


class TrackingConfig(Strict):
    enabled: bool = True
    experiment: str | None = None
    uri: str | None = None
    run_name: str | None = None


class TopologyConfig(Strict):
    """The whole YAML."""

    name: str
    description: str | None = None
    data: DataConfig
    train: TrainConfig = TrainConfig()
    peers: dict[str, PeerConfig] = Field(min_length=1)
    ensembles: dict[str, EnsembleConfig] = {}
    virtual: dict[str, VirtualConfig] = {}
    edges: list[EdgeConfig] = []
    stages: list[StageConfig] = []
    engine: EngineConfig = EngineConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _file_safe(cls, name: str) -> str:
        # the name makes run directories (runs/<name>-<time>) and experiment runs
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name) or len(name) > 100:
            raise ValueError(f"{name!r} is not usable as a run name (letters, digits, '_', '-' and '.', "
                             "not starting with '.' or '-', at most 100)")
        return name
