"""Experiment configuration: one validated object, loadable from YAML plus dotted overrides.

Every knob of a run lives here, so a run directory's `config.yaml` reproduces the run.
Unknown keys and bad values are rejected with one line naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedhello.errors import UserError
from fedhello.io import cache_root
from fedhello.registry import Registry


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(StrictModel):
    """Which foundation model to fine-tune."""

    name: str = Field(
        "minilm",
        description="'minilm' (offline all-MiniLM-L6-v2), 'mpnet' (offline all-mpnet-base-v2), "
        "a local path, or a Hugging Face hub name.",
    )
    max_length: int = Field(64, ge=8, le=4096, description="Tokens per example (truncation).")
    architecture: dict[str, Any] | None = Field(
        None,
        description="Build the model from this transformers config (a mapping with model_type, e.g. "
        "{model_type: vit, image_size: 28, patch_size: 7}) with random weights instead of loading "
        "`name`; results are then marked 'not pretrained'. Image tasks only.",
    )

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of the frozen base weights (docs/quantization.md): auto is bfloat16 on a "
        "CUDA device that supports it and float32 elsewhere. LoRA adapters, a trained head and the "
        "optimizer state stay float32.",
    )
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field(
        "none",
        description="Quantise the frozen linears of the base with bitsandbytes (QLoRA's nf4, fp4, or "
        "LLM.int8); the head, the LM head and the LoRA adapters stay unquantised.",
    )

    @field_validator("architecture")
    @classmethod
    def _has_model_type(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("model_type"), str):
            raise ValueError("needs a model_type (e.g. vit)")
        return v

    @field_validator("quantization")
    @classmethod
    def _quantises_a_checkpoint(cls, v: str, info: ValidationInfo) -> str:
        if v != "none" and info.data.get("architecture") is not None:
            raise ValueError(
                f"{v} quantises a pretrained checkpoint; model.architecture builds random weights "
                "(use quantization: none, or a checkpoint in model.name)"
            )
        return v


class LoraSettings(StrictModel):
    """LoRA adapters; defaults follow the paper (r=16, alpha=16, dropout 0.1, query+value)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Projection names inside each block; null = discover query and value."
    )


WikiLanguage = Literal["en-us", "fr-fr", "es-es"]
WikiQuestion = Literal["topic", "title"]


def _topic_questions() -> list[WikiQuestion]:
    return ["topic"]


SOURCES_READING_PATH = ("csv", "jsonl", "hf", "image_folder", "domain_folder")  # need data.path


class DataConfig(StrictModel):
    """Where examples come from and how they are split."""

    source: str = Field(
        "wiki_vital",
        description="Texts: wiki_vital, csv, jsonl, hf. Images: hf, image_folder (root/<class>/<image>), "
        "domain_folder (root/<domain>/<class>/<image>, e.g. DomainNet), fashion_mnist (IDX files), "
        "digits (scikit-learn's 8x8 digits). Instructions (causal-lm): jsonl, csv, hf, chatterbot, "
        "wiki_vital (questions about the articles). More are added with register_text_source, "
        "register_image_source or register_instruction_source (fedhello/data/).",
    )
    path: str | None = Field(
        None,
        description="File (csv/jsonl), dataset name or saved dataset dir (hf), image root folder, or the "
        "folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist).",
    )
    language: WikiLanguage | list[WikiLanguage] = Field(
        "en-us",
        description="wiki_vital: one language, or several: each language is then a domain and the topics "
        "are mapped onto one shared label set (docs/data.md).",
    )
    text_column: str = "text"
    image_column: str = Field("image", description="hf images: the column holding the images.")
    label_column: str = "label"
    domain_column: str | None = Field(
        None, description="csv/jsonl/hf: a column naming each example's domain (for partition.scheme=domain)."
    )
    instruction_column: str | None = Field(
        None, description="causal-lm: the instruction column; null = instruction, prompt or question."
    )
    input_column: str | None = Field(
        None, description="causal-lm: the optional input column; null = input (Alpaca) or context (Dolly)."
    )
    response_column: str | None = Field(
        None,
        description="causal-lm: the response column; null = output (Alpaca), response (Dolly) or answer.",
    )
    wiki_questions: list[WikiQuestion] = Field(
        default_factory=lambda: _topic_questions(),
        description="causal-lm on wiki_vital: ask each article's topic (among the listed topics) and/or title.",
    )
    augment: bool = Field(
        False, description="Images: random resized crop and horizontal flip while training (seeded)."
    )
    augment_min_scale: float = Field(
        0.08, gt=0, le=1, description="Images: smallest crop area (fraction of the image) when augmenting."
    )
    hf_config: str | None = Field(
        None, description="hf: the dataset's configuration name (e.g. 'ledgar' for path 'lex_glue')."
    )
    hf_split: str = "train"
    val_size: float | int = Field(300, description="Validation examples (int) or fraction (float).")
    test_size: float | int = Field(1000, description="Test examples (int) or fraction (float).")
    max_examples: int | None = Field(None, ge=10, description="Subsample the source (stratified).")
    proxy_size: int = Field(
        100,
        ge=1,
        description="Proxy examples held out of the training data for every method (Fisher scores); "
        "also `fisher.proxy_size`.",
    )
    proxy_path: str | None = Field(
        None,
        description="A separate labelled CSV/JSONL file as proxy set (same columns as the data); "
        "also `fisher.proxy_path`.",
    )
    cache_dir: str | None = Field(
        None,
        description="Cache of tokenized texts and decoded images (in its tokens/ and images/); "
        "null = the cache folder ($FEDHELLO_CACHE_DIR or ~/.cache/fedhello).",
    )

    @field_validator("val_size", "test_size")
    @classmethod
    def _positive_size(cls, v: float | int) -> float | int:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("a fraction must be between 0 and 1")
        if isinstance(v, int) and v < 1:
            raise ValueError("a count must be at least 1")
        return v

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in SOURCES_READING_PATH and not self.path:
            raise ValueError(f"data.path is required for source '{self.source}'")
        return self

    def cache_folder(self, kind: str) -> Path:
        """Where this data's `kind` ("tokens", "images") is cached: in data.cache_dir, or else in
        fedhello's cache folder."""
        return (Path(self.cache_dir).expanduser() if self.cache_dir else cache_root()) / kind


class PartitionConfig(StrictModel):
    """How the training split is divided among clients."""

    scheme: Literal["iid", "dirichlet", "pathological", "domain"] = Field(
        "iid", description="'domain': feature skew, each client's data comes from one domain."
    )
    num_clients: int = Field(20, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet label-skew concentration.")
    within_domain: Literal["iid", "dirichlet"] = Field(
        "iid", description="Domain scheme: how a domain's examples are split among its clients."
    )
    domain_clients: dict[str, int] | None = Field(
        None,
        description="Domain scheme: clients per domain by name (summing to num_clients); null = in "
        "proportion to the domains' sizes, at least one each.",
    )
    classes_per_client: int = Field(2, ge=1, description="Pathological: classes each client holds.")
    beta: float = Field(1.0, gt=0, description="Pathological: Dirichlet quantities within a class.")
    min_per_share: int = Field(10, ge=0, description="Pathological: minimum examples per class share.")


class GroupConfig(StrictModel):
    """A resource-capability group: a share of the clients, a layer budget and, optionally, device
    budgets (memory, seconds per round, upload bytes per round) that every layer set sent to the
    group must fit (docs/budgets.md)."""

    name: str
    share: float = Field(gt=0, description="Relative share of clients (e.g. 6, 3, 1).")
    budget: int | float = Field(
        1.0,
        description="Layers this group may train: an int is a count, a float in (0, 1] a fraction of L.",
    )
    rank: int | None = Field(None, ge=1, description="LoRA rank for rank-heterogeneous methods.")
    memory: ByteSize | None = Field(
        None,
        description="Peak memory a client may use, frozen model included (e.g. 1.5GiB, 800MB, or bytes).",
    )
    seconds_per_round: float | None = Field(
        None,
        gt=0,
        description="Local training time a client may spend per round (e.g. 30, 30s, 500ms, 2min).",
    )
    upload: ByteSize | None = Field(None, description="Bytes a client may send per round (e.g. 2MB).")
    speed: float = Field(
        1.0,
        gt=0,
        description="The group's compute speed relative to the machine that calibrated (1.0 = same).",
    )

    @field_validator("budget")
    @classmethod
    def _valid_budget(cls, v: int | float) -> int | float:
        if isinstance(v, bool):
            raise ValueError("must be a number")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a fractional budget must be in (0, 1]; use an int for a layer count")
        if isinstance(v, int) and v < 1:
            raise ValueError("a layer count must be at least 1")
        return v

    @field_validator("memory", "upload")
    @classmethod
    def _positive_bytes(cls, v: ByteSize | None) -> ByteSize | None:
        if v is not None and v <= 0:
            raise ValueError("must be a positive size such as 512MB or 1.5GiB")
        return v

    @field_validator("seconds_per_round", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        return parse_seconds(v) if isinstance(v, str) else v


_SECONDS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str) -> float:
    """'30', '30s', '500ms', '2min', '1h' -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in ("", *_SECONDS):
        raise ValueError(f"'{text}' is not a duration such as 30, 30s, 500ms or 2min")
    return float(match.group(1)) * _SECONDS.get(match.group(2), 1.0)


def _default_groups() -> list[GroupConfig]:
    return [
        GroupConfig(name="low", share=1, budget=0.5),
        GroupConfig(name="mid", share=1, budget=0.75),
        GroupConfig(name="high", share=1, budget=1.0),
    ]


class LoraFairSettings(StrictModel):
    """The settings of `federation.aggregation=lora_fair` (the paper's defaults where it gives them)."""

    lam: float = Field(0.01, ge=0, description="Weight of the ||dB||^2 regulariser (the paper's lambda).")
    similarity: Literal["cosine", "l2"] = Field(
        "cosine",
        description="'cosine': the paper's 1 - cos(dW, (B+dB)A); 'l2': squared distance, closed form.",
    )
    steps: int = Field(100, ge=1, description="Gradient steps of the cosine solver per module and round.")
    step_size: float = Field(
        0.5, gt=0, description="The cosine solver's gradient step, in units of ||B||_F^2 of the averaged B."
    )


class FederationConfig(StrictModel):
    """The server loop."""

    rounds: int = Field(10, ge=1)
    clients_per_round: int = Field(5, ge=1)
    weighting: Literal["samples", "uniform"] = Field(
        "samples", description="Per-tensor mean weighted by sample count, or unweighted (released)."
    )
    head: Literal["aggregate", "frozen"] = Field(
        "aggregate",
        description="Train and average the classification head, or keep it frozen at a seeded init (released).",
    )
    aggregation: Literal["mean", "median", "trimmed_mean", "lora_fair"] = Field(
        "mean",
        description="Per tensor: the weighted mean, or (robust) the coordinate-wise median or trimmed mean of "
        "its contributors (docs/robustness.md); lora_fair: the weighted mean with LoRA-FAIR's correction of "
        "each averaged B (fedhello/method/lora_fair.py).",
    )
    lora_fair: LoraFairSettings = Field(default_factory=LoraFairSettings)
    trim_fraction: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="trimmed_mean: fraction of contributors cut at each end, per coordinate.",
    )
    norm_bound: Literal["none", "clip", "reject"] = Field(
        "none",
        description="Bound each sent tensor's norm: scale it down to the bound, or reject the whole update.",
    )
    norm_bound_factor: float = Field(
        10.0, gt=0, description="The bound is this many times the median norm of the tensor's contributors."
    )
    norm_bound_max: float | None = Field(
        None, gt=0, description="An absolute bound on any sent tensor's norm (also where no median exists)."
    )


class SecureAggregationConfig(StrictModel):
    """Secure aggregation (SecAgg+ per tensor, docs/privacy.md): the server learns only each
    tensor's sum over the clients that trained it. Off changes nothing."""

    enabled: bool = False
    neighbours: int = Field(
        4, ge=1, description="Clients each client masks with (a ring; the whole round when it is smaller)."
    )
    threshold: int = Field(
        2, ge=1, description="Shares that rebuild a client's secrets: its neighbours that must answer."
    )
    clipping_range: float = Field(
        1.0,
        gt=0,
        description="Each coordinate of an update is clipped to [-c, c] before quantisation (AdamW moves a "
        "coordinate by about lr per step: 0.08 in a round of the defaults); the quantisation step is 2c / Q.",
    )
    field_bits: int = Field(
        48, ge=16, le=52, description="Masks and sums live modulo 2^field_bits (exact in float64 up to 52)."
    )
    limbs: int = Field(
        2,
        ge=1,
        le=3,
        description="Quantised limbs per value, each quantising what the ones before left at a Q/2 times "
        "finer step: 1 is SecAgg+'s single quantisation (a mean within 2c/Q, about 2e-9 with the defaults, "
        "which training then amplifies); 2 carries a float32 value exactly (c a power of two), so a run "
        "follows the plain run; each limb is one more masked copy of the update to send.",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_within_neighbours(cls, v: int, info: ValidationInfo) -> int:
        neighbours = info.data.get("neighbours")
        if neighbours is not None and v > neighbours:
            raise ValueError(f"{v} shares cannot come from {neighbours} neighbours (threshold <= neighbours)")
        return v


class PrivacyConfig(StrictModel):
    """Client-level differential privacy (docs/privacy.md). `none` changes nothing."""

    mode: Literal["none", "central", "local"] = Field(
        "none",
        description="central: clients clip, a trusted server sums, adds Gaussian noise and divides by the "
        "planned contributors (DP-FedAvg with fixed clipping); local: each client clips and adds its own noise.",
    )
    clip_norm: float | None = Field(
        None, gt=0, description="C: the L2 bound of a client's whole update (every tensor it sends)."
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="z: the noise's standard deviation is z C per coordinate."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Find z so that the configured rounds spend this epsilon (or refuse a run over it).",
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="delta of (epsilon, delta); null: 1 / num_clients."
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus's accountant: Renyi DP, or privacy random variables (tighter)."
    )

    @model_validator(mode="after")
    def _complete(self) -> PrivacyConfig:
        if self.mode == "none":
            return self
        if self.clip_norm is None:
            raise ValueError(f"clip_norm: privacy.mode={self.mode} needs the clipping bound C (> 0)")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                f"noise_multiplier: privacy.mode={self.mode} needs noise_multiplier or target_epsilon"
            )
        return self


class TrainConfig(StrictModel):
    """Local training on a client."""

    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(
        8, ge=1, description="Stop after this many steps (null: run local_epochs full epochs)."
    )
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0, description="AdamW learning rate (the paper's 0.01).")
    weight_decay: float = Field(0.01, ge=0)
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each trained block's activations in the backward pass instead of "
        "keeping them (torch's non-reentrant checkpointing, docs/quantization.md); blocks below the "
        "lowest trained one still run without autograd.",
    )

    @model_validator(mode="before")
    @classmethod
    def _real_freezing_only(cls, data: Any) -> Any:
        """`freezing` (read from older configs): 'real' is the only way a run trains; the released
        pseudo-freezing (learning rate 0) lives in benchmarks/freezing.py."""
        if isinstance(data, dict) and "freezing" in data:
            if data["freezing"] != "real":
                raise ValueError(
                    f"freezing: '{data['freezing']}' is not a run's mode (runs freeze for real; the "
                    "released pseudo-freezing is measured by benchmarks/freezing.py)"
                )
            data = {k: v for k, v in data.items() if k != "freezing"}
        return data


class EvalConfig(StrictModel):
    """Evaluation of the global model."""

    every: int = Field(2, ge=1, description="Evaluate every N rounds (the last round always).")
    batch_size: int = Field(128, ge=1)
    before_training: bool = Field(
        False, description="Also evaluate the model before round 1 (summary: before_training)."
    )


class LMConfig(StrictModel):
    """Instruction tuning (task causal-lm): prompts, generation and the metric that leads."""

    primary_metric: Literal["exact_match", "rouge_l", "loss", "perplexity"] = Field(
        "exact_match", description="What model selection and reports lead with."
    )
    chat_template: bool = Field(
        True, description="Build prompts with the tokenizer's chat template when it has one."
    )
    system_prompt: str | None = Field(
        None, description="A system message for the chat template; null = the template's default."
    )
    max_new_tokens: int = Field(16, ge=1, le=1024, description="Greedy generation: new tokens at most.")
    generate_examples: int = Field(
        200,
        ge=1,
        description="Generation is scored on this many examples per split (a fixed, seeded subset).",
    )


class FlowerConfig(StrictModel):
    """The Flower engine (engine: flower): how long to wait, and how many replies a round needs."""

    round_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for a round's replies; clients silent by then are missing."
    )
    min_replies: int = Field(
        1, ge=1, description="A round with fewer replies stops the run (resume it from the checkpoint)."
    )
    connect_timeout: float = Field(
        120.0,
        gt=0,
        description="Deployment: the most seconds discovery waits for SuperNodes to connect (first round) "
        "and answer; the simulation engine waits for all its nodes, whatever this says.",
    )
    cpus_per_client: float = Field(1.0, gt=0, description="Simulation only: CPUs each ClientApp reserves.")
    gpus_per_client: float = Field(
        0.0,
        ge=0,
        description="Simulation only: the share of a GPU each ClientApp reserves (Ray's num_gpus; "
        "0: none, 0.5: two ClientApps per GPU).",
    )
    partition_keys: str | None = Field(
        None,
        description="Deployment: the operator's file mapping each SuperNode's OpenSSH public key to the "
        "partition id it may serve (YAML, written by `fedhello deploy keys`); a node must sign a challenge "
        "with that key to serve the partition (docs/flower.md, 'Identity').",
    )


class ExperimentConfig(StrictModel):
    """A whole experiment. `fedhello run` and `fedhello.run_experiment` take one of these."""

    seed: int = Field(
        0, ge=0, description="Fixes every random stream (partitions, sampling, init, data order)."
    )
    task: str = Field(
        "text-classification",
        description="What is learned and measured (fedhello/tasks/); the model's head follows from it.",
    )
    method: str = Field(
        "fedhello",
        description="fedhello | fim | gd-<pattern> | rgd-<pattern> | full | fedit | straggler | exclusive | "
        "fedra | hetlora | flexlora | fed-pilot; pattern: triangle, inverted_triangle, bottleneck or uniform "
        "(see fedhello/method/registry.py)",
    )
    engine: str = Field(
        "local",
        description="'local': every client in this process; 'flower': Flower's simulation engine "
        "(deployment: `flwr run`, see docs/flower.md). Same results for the same seed.",
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch default.")
    quiet: bool = False
    tracking: Literal["none", "tensorboard"] = Field(
        "none", description="'tensorboard': every round's metrics and costs as TensorBoard scalars."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    groups: list[GroupConfig] = Field(default_factory=_default_groups)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        description="The chosen method's own options, validated by the model it registered "
        "(fedhello/method/registry.py); `fisher:` (fedhello, fim) and `hetlora:` (hetlora) are read too.",
    )
    lm: LMConfig = Field(default_factory=LMConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_sections(cls, data: Any) -> Any:
        """The sections that held method options before `method_options` (`fisher:`, `hetlora:`)
        keep working: the chosen method's section becomes its `method_options`; another method's
        section is still checked, then unused (as it always was); `fisher.proxy_size` and
        `fisher.proxy_path` set `data.proxy_size` and `data.proxy_path`, for every method."""
        if not isinstance(data, dict):
            return data
        from fedhello.method.registry import DEFAULT_METHOD, method_entries, parse_method_options

        data = dict(data)
        entries = method_entries()
        method = data.get("method", DEFAULT_METHOD)
        owned = entries[method].legacy_section if method in entries else None
        for section in sorted({e.legacy_section for e in entries.values() if e.legacy_section}):
            given = data.pop(section, None)
            if given is None:
                continue
            if isinstance(given, BaseModel):
                given = given.model_dump()
            if not isinstance(given, dict):
                raise ValueError(f"{section}: expected a section of keys")
            given = dict(given)
            if section == "fisher":
                moved = {k: given.pop(k) for k in ("proxy_size", "proxy_path") if k in given}
                if moved:
                    section_data = data.get("data") or {}
                    if isinstance(section_data, BaseModel):
                        section_data = section_data.model_dump()
                    data["data"] = {**moved, **section_data}
            if section == owned:
                if data.get("method_options"):
                    raise ValueError(
                        f"method_options and {section}: give the options of method '{method}' once"
                    )
                data["method_options"] = given
            else:
                owner = next(e.name for e in entries.values() if e.legacy_section == section)
                parse_method_options(owner, given, section)
        return data

    @field_validator("method", "task", "engine")
    @classmethod
    def _registered(cls, v: str, info: ValidationInfo) -> str:
        """Methods, tasks and engines are chosen by their registered names."""
        from fedhello.engine.engines import ENGINES
        from fedhello.method.registry import METHODS
        from fedhello.tasks import TASKS

        registries: dict[str, Registry[Any]] = {"method": METHODS, "task": TASKS, "engine": ENGINES}
        registry = registries[str(info.field_name)]
        if v not in registry:
            raise ValueError(registry.unknown(v))
        return v

    @field_validator("groups")
    @classmethod
    def _some_groups(cls, v: list[GroupConfig]) -> list[GroupConfig]:
        if not v:
            raise ValueError("at least one group is needed")
        names = [g.name for g in v]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        return v

    @model_validator(mode="after")
    def _method_options(self) -> ExperimentConfig:
        from fedhello.method.registry import parse_method_options

        parse_method_options(self.method, self.method_options)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.federation.clients_per_round > self.partition.num_clients:
            raise ValueError(
                "federation.clients_per_round must not exceed partition.num_clients "
                f"({self.federation.clients_per_round} > {self.partition.num_clients})"
            )
        return self

    @model_validator(mode="after")
    def _secure(self) -> ExperimentConfig:
        """What secure aggregation cannot be combined with: rules that read individual updates."""
        if not self.secure_aggregation.enabled:
            return self
        fed = self.federation
        if fed.aggregation != "mean":
            raise ValueError(
                f"federation.aggregation: {fed.aggregation} reads individual updates, which secure "
                "aggregation hides from the server; use mean"
            )
        if fed.norm_bound != "none":
            raise ValueError(
                "federation.norm_bound: the server cannot see an update's norm under secure aggregation; "
                "set norm_bound: none (privacy.clip_norm has clients bound their own updates)"
            )
        return self

    @model_validator(mode="after")
    def _private(self) -> ExperimentConfig:
        """What differential privacy cannot be combined with (docs/privacy.md, "Interactions")."""
        mode, fed = self.privacy.mode, self.federation
        if mode == "none":
            return self
        if fed.aggregation != "mean":
            raise ValueError(
                f"federation.aggregation: {fed.aggregation} reads individual updates, so its sensitivity is not "
                f"privacy.clip_norm; privacy.mode={mode} needs mean"
            )
        if fed.norm_bound != "none":
            raise ValueError(
                f"federation.norm_bound: privacy.clip_norm bounds every update under privacy.mode={mode}; "
                "set norm_bound: none"
            )
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f"{source}: " if source else ""
    return f"{where}{loc}: {msg}" if loc else f"{where}{msg}"


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override {key}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.lr=0.01', 'groups=[...]'] into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Build a validated config from an optional YAML file and dotted overrides."""
    tree: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{p}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UserError(f"{p}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: top level must be a mapping of keys")
        tree = loaded
    if overrides:
        tree = _deep_merge(tree, parse_overrides(overrides))
        source = source or "override"
    return config_from_dict(tree, source)


def config_from_dict(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e, source)) from None


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
