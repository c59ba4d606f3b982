"""One config source: frozen dataclasses filled from a YAML preset, then `--set` overrides.

Presets live in `configs/<name>.yaml` (`debug` for tests/CI, `small` for the demo, `full` for a
cluster). Every field is required in the preset, so a value lives in exactly one place; the
dataclasses only say what exists and what is valid. Endpoints are not config: they come from
the environment (or the stack's env file), see `onerec.endpoints`.

    cfg = load_config("debug", overrides=["model.d_model=256"])
    cfg.model.d_model  # 256
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = Path(os.environ.get("ONEREC_CONFIG_DIR", PROJECT_ROOT / "configs"))


class ConfigError(ValueError):
    """A preset or override is wrong; the message names the key and what to do."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass(frozen=True)
class DataConfig:
    root: str                 # folder holding the data sets; relative paths are from the project root
    dataset: str              # ml-100k | amazon-beauty | generic
    path: str                 # generic format only: CSV or parquet file (relative to root); '' otherwise
    live_fraction: float      # share of events (by time) from T0 to T1, replayed as the live stream
    holdout_fraction: float   # share of the latest events (from T1) held out of replay and training
    max_users: int            # 0 = all users; >0 keeps the first N users (debug slices)

    def validate(self, key: str) -> None:
        _check(self.dataset in ("ml-100k", "amazon-beauty", "generic"), f"{key}.dataset",
               f"unknown data set '{self.dataset}' (choose ml-100k, amazon-beauty or generic)")
        _check(self.dataset != "generic" or bool(self.path), f"{key}.path",
               "the generic format needs a CSV or parquet file path")
        _check(0.0 < self.live_fraction < 1.0, f"{key}.live_fraction", "must be between 0 and 1")
        _check(0.0 <= self.holdout_fraction < 1.0 - self.live_fraction, f"{key}.holdout_fraction",
               "must be >= 0 and leave history beside live_fraction")
        _check(self.max_users >= 0, f"{key}.max_users", "must be >= 0 (0 = all users)")

    def root_path(self) -> Path:
        root = Path(os.environ.get("ONEREC_DATA_ROOT", self.root))
        return root if root.is_absolute() else (PROJECT_ROOT / root).resolve()


@dataclass(frozen=True)
class TopicConfig:
    name: str
    partitions: int

    def validate(self, key: str) -> None:
        _check(bool(self.name) and all(c.isalnum() or c in "._-" for c in self.name), f"{key}.name",
               f"'{self.name}' is not a valid Kafka topic name")
        _check(self.partitions >= 1, f"{key}.partitions", "must be >= 1")


@dataclass(frozen=True)
class KafkaConfig:
    user_events: TopicConfig
    dlq: TopicConfig
    exposures: TopicConfig

    def topics(self) -> tuple[TopicConfig, ...]:
        return (self.user_events, self.dlq, self.exposures)


@dataclass(frozen=True)
class StackConfig:
    state_dir: str            # pid files, logs, data of the embedded stack; relative to the cwd
    host: str                 # loopback address every embedded part listens and advertises on
    kafka_port: int
    redis_port: int
    mlflow_port: int
    startup_timeout_s: float  # `stack up` fails if a part is not healthy by then
    stop_timeout_s: float     # SIGTERM grace before SIGKILL on `stack down`

    def validate(self, key: str) -> None:
        for name in ("kafka_port", "redis_port", "mlflow_port"):
            port = getattr(self, name)
            _check(1024 <= port <= 65535, f"{key}.{name}", f"{port} is not a port in 1024..65535")
        ports = [self.kafka_port, self.redis_port, self.mlflow_port]
        _check(len(set(ports)) == 3, f"{key}.*_port", f"ports must differ, got {ports}")
        _check(self.startup_timeout_s > 0, f"{key}.startup_timeout_s", "must be > 0")
        _check(self.stop_timeout_s > 0, f"{key}.stop_timeout_s", "must be > 0")


@dataclass(frozen=True)
class FeaturesConfig:
    sequence_length: int       # N: the user's last N events kept as list features
    popularity_window_s: int   # item popularity counts events this close to the item's latest one
    dedup_ttl_s: int           # how long an event id is remembered to drop redeliveries

    def validate(self, key: str) -> None:
        for name in ("sequence_length", "popularity_window_s", "dedup_ttl_s"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")


@dataclass(frozen=True)
class IngestConfig:
    group_id: str              # Kafka consumer group shared by all ingestor instances
    max_poll_records: int      # upper bound of one batch
    poll_timeout_ms: int       # how long a poll waits for records: bounds the added latency
    online_push_interval_s: float  # changed entities are pushed to Feast online this often
    catchup_push_interval_s: float  # ... and this often while draining a backlog (full polls)
    offline_flush_s: float     # offline rows are written (and offsets committed) this often
    metrics_port: int          # Prometheus /metrics; 0 = off
    max_backoff_s: float       # retry back-off cap while Redis or Kafka is unavailable

    def validate(self, key: str) -> None:
        _check(bool(self.group_id), f"{key}.group_id", "must not be empty")
        _check(self.max_poll_records >= 1, f"{key}.max_poll_records", "must be >= 1")
        _check(self.poll_timeout_ms >= 1, f"{key}.poll_timeout_ms", "must be >= 1")
        _check(self.online_push_interval_s >= 0, f"{key}.online_push_interval_s", "must be >= 0")
        _check(self.catchup_push_interval_s >= self.online_push_interval_s, f"{key}.catchup_push_interval_s",
               "must be >= online_push_interval_s")
        _check(self.offline_flush_s >= self.online_push_interval_s, f"{key}.offline_flush_s",
               "must be >= online_push_interval_s (offsets are committed after both writes)")
        _check(self.metrics_port == 0 or 1024 <= self.metrics_port <= 65535, f"{key}.metrics_port",
               "must be 0 (off) or a port in 1024..65535")
        _check(self.max_backoff_s > 0, f"{key}.max_backoff_s", "must be > 0")


@dataclass(frozen=True)
class TokenizerConfig:
    levels: int               # semantic-ID tokens per item
    codebook_size: int        # upper bound per level; scaled down to the item count
    codebook_scale: float     # K = min(codebook_size, even_ceil(scale * N ** (1/levels))); 2 -> K**L ~= 8N
    kmeans_iters: int         # Lloyd iterations per level of the balanced RQ-KMeans
    embedding_dim: int        # item embedding width the tokenizer clusters
    cooc_window: int          # co-occurrence window (sequence positions) of the collaborative part
    side_dim: int             # embedding columns given to item side features (genres / attributes)
    side_weight: float        # the side part's share of the squared norm, in [0, 1]
    ppmi_smoothing: float     # context-distribution smoothing exponent of PPMI (1 = plain PMI)

    def validate(self, key: str) -> None:
        _check(self.levels >= 1, f"{key}.levels", "must be >= 1")
        _check(self.codebook_size >= 2, f"{key}.codebook_size", "must be >= 2")
        _check(self.codebook_scale > 0, f"{key}.codebook_scale", "must be > 0")
        for name in ("kmeans_iters", "embedding_dim", "cooc_window"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(0 <= self.side_dim < self.embedding_dim, f"{key}.side_dim",
               f"must be in 0..embedding_dim-1 = {self.embedding_dim - 1} (the rest is collaborative)")
        _check(0.0 <= self.side_weight <= 1.0, f"{key}.side_weight", "must be in [0, 1]")
        _check(0.0 < self.ppmi_smoothing <= 1.0, f"{key}.ppmi_smoothing", "must be in (0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["v1", "v2"]
    d_model: int
    n_heads: int
    n_layers: int
    n_experts: int            # 0 = dense FFN
    top_k_experts: int
    max_seq_len: int          # behaviour-sequence length fed to the model
    session_len: int          # items generated per request (M)
    dropout: float
    # Knobs below are required in every preset like the rest; the defaults exist only so code
    # can build a ModelConfig by hand, and equal GenerativeRecommender's keyword defaults
    # (tests/unit/test_train.py checks that they agree).
    n_kv_heads: int = 0       # key/value heads (GQA); 0 = n_heads (plain multi-head attention)
    ffn_mult: int = 4         # FFN (and each expert's) hidden width = ffn_mult * d_model
    activation: Literal["swiglu", "gelu"] = "swiglu"
    moe_aux_coef: float = 0.01  # weight of the MoE load-balance loss
    n_encoder_layers: int = 0   # arch v1 only, 0 = n_layers (v2 has no encoder and ignores it)
    item_embedding: bool = False  # context events also get a learned vector per item (needs n_items)
    item_attributes: bool = False  # + the mean of the item's attribute vectors (needs item_embedding)
    dense_loss_weight: float = 0.0  # > 0: a dense next-item head over all N items, trained with this
                                    # weight beside the token loss (needs item_embedding)
    dense_score_weight: float = 0.0  # next-item ranking of the beam's and the head's top items:
                                     # decoder log-prob + this x the head's log-prob
    repeat_gate: bool = False  # the head learns a logit offset for items already in the context
                               # (from the user's state: re-consumption, RepeatNet-style)

    def validate(self, key: str) -> None:
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "session_len", "ffn_mult"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.n_encoder_layers >= 0, f"{key}.n_encoder_layers", "must be >= 0 (0 = n_layers)")
        _check(self.d_model % self.n_heads == 0, f"{key}.d_model",
               f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        _check(self.n_experts >= 0, f"{key}.n_experts", "must be >= 0")
        _check(self.n_experts == 0 or 1 <= self.top_k_experts <= self.n_experts,
               f"{key}.top_k_experts", f"must be in 1..n_experts={self.n_experts}")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")
        _check(self.n_kv_heads >= 0 and (self.n_kv_heads == 0 or self.n_heads % self.n_kv_heads == 0),
               f"{key}.n_kv_heads", f"must divide n_heads={self.n_heads} (0 = n_heads)")
        _check(self.moe_aux_coef >= 0, f"{key}.moe_aux_coef", "must be >= 0")
        _check(not self.item_attributes or self.item_embedding, f"{key}.item_attributes",
               "needs item_embedding (attribute vectors are added to the per-item vector)")
        _check(self.dense_loss_weight >= 0, f"{key}.dense_loss_weight", "must be >= 0 (0 = no dense head)")
        _check(self.dense_loss_weight == 0 or self.item_embedding, f"{key}.dense_loss_weight",
               "needs item_embedding (the head scores items by their per-item vectors)")
        _check(self.dense_score_weight >= 0, f"{key}.dense_score_weight", "must be >= 0")
        _check(self.dense_score_weight == 0 or self.dense_loss_weight > 0, f"{key}.dense_score_weight",
               "needs dense_loss_weight > 0 (an untrained head would only add noise)")
        _check(not self.repeat_gate or self.dense_loss_weight > 0, f"{key}.repeat_gate",
               "needs dense_loss_weight > 0 (the gate shifts the dense head's logits)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int           # training examples per step (one example = context -> next session);
                              # also users per batch in validation (x beam_size beams)
    lr: float                 # peak AdamW learning rate, after warmup
    weight_decay: float       # AdamW; not applied to norms, biases and embeddings
    betas: tuple[float, float]
    warmup_steps: int         # linear warmup from lr/warmup_steps to lr, then cosine decay to 0
    epochs: int               # at most this many passes over the examples (the cosine spans them)
    grad_clip: float          # max global gradient norm; 0 = no clipping
    eval_every: int           # validate every this many steps; 0 = at the end of every epoch
    patience: int             # stop after this many validations without a better valid NDCG@10; 0 = never
    beam_size: int            # beams of the constrained search in validation and test (>= 10: top 10 ranked)
    valid_users: int          # validate on a seeded sample of this many users; 0 = all (Beauty: 22k
                              # users cost ~60 s a validation on 2 cores, a third of a 9-min budget)
    time_budget_s: float      # stop (with a checkpoint to resume from) after this many seconds; 0 = none
    num_threads: int          # torch CPU threads while training; 0 = torch's default
    checkpoint_every: int     # write a resumable checkpoint every this many steps; 0 = only at the end

    def validate(self, key: str) -> None:
        for name in ("batch_size", "epochs", "beam_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.beam_size >= 10, f"{key}.beam_size", "must be >= 10: validation ranks the top 10 items")
        _check(self.lr > 0, f"{key}.lr", "must be > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"{key}.betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("warmup_steps", "eval_every", "patience", "num_threads", "checkpoint_every", "valid_users"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 = no clipping)")
        _check(self.time_budget_s >= 0, f"{key}.time_budget_s", "must be >= 0 (0 = no budget)")


@dataclass(frozen=True)
class SASRecConfig:
    """The SASRec baseline (onerec.eval.baselines). Defaults exist so tests can build one by hand;
    the presets give every key."""
    # model
    hidden: int = 64                 # item / position embedding and model width
    n_blocks: int = 2
    n_heads: int = 1
    ffn_mult: int = 4                # FFN inner width = ffn_mult * hidden
    max_len: int = 50                # newest items of a history the model reads
    dropout: float = 0.5             # embeddings, attention, residuals; Beauty is sparse, so high
    use_attributes: bool = False     # add the mean attribute embedding to each item embedding
    # training
    lr: float = 1e-3                 # Adam
    weight_decay: float = 0.0
    batch_size: int = 128            # sequences per step; batches hold sequences of similar length
    max_epochs: int = 200
    patience: int = 10               # stop after this many epochs without a better valid NDCG@10
    time_budget_s: float = 0.0       # stop training (between steps) after this many seconds; 0 = none
    eval_batch_size: int = 256       # users per scoring batch in validation (256 beat 1024 on CPU)

    def __post_init__(self):
        self.validate("eval.sasrec")

    def validate(self, key: str) -> None:
        for name in ("hidden", "n_blocks", "n_heads", "ffn_mult", "max_len", "batch_size", "max_epochs",
                     "eval_batch_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.hidden % self.n_heads == 0, f"{key}.hidden",
               f"{self.hidden} must be divisible by n_heads={self.n_heads}")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"{self.dropout} must be in [0, 1)")
        _check(self.lr > 0 and self.weight_decay >= 0, f"{key}.lr", "lr must be > 0, weight_decay >= 0")
        _check(self.patience >= 0 and self.time_budget_s >= 0, f"{key}.patience",
               "patience and time_budget_s must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """`onerec eval`: the leave-last-out comparison of OneRec with the baselines. The protocol is
    the published one (history items stay in the ranking), so it is not a knob."""
    batch_size: int           # users per scoring batch
    sasrec: SASRecConfig

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")


@dataclass(frozen=True)
class RegistryConfig:
    """The MLflow model registry (onerec.registry) and the retrain pipeline's promotion rule."""
    model_name: str           # the registered model
    select_metric: str        # test metric the challenger is judged on, e.g. ndcg@10
    margin: float             # alias `challenger` only if metric > champion's x (1 + margin)

    def validate(self, key: str) -> None:
        _check(bool(self.model_name.strip()), f"{key}.model_name", "must not be empty")
        _check(self.select_metric.split("@")[0] in ("recall", "ndcg") and self.select_metric.count("@") == 1,
               f"{key}.select_metric", f"'{self.select_metric}' must be recall@K or ndcg@K")
        _check(self.margin >= 0, f"{key}.margin", "must be >= 0 (a relative improvement)")


@dataclass(frozen=True)
class PipelinesConfig:
    """Kubeflow pipelines (pipelines/, onerec.pipelines). The KFP host is an endpoint (KFP_HOST)."""
    image: str                # the one base image of every component (built from infra/docker)
    experiment: str           # KFP experiment that submitted and recurring runs go to
    namespace: str            # Kubernetes namespace of the KFP user
    schedule_cron: str        # default of `onerec pipelines schedule` (KFP's 6-field cron)
    local_root: str           # kfp.local's pipeline root, relative to stack.state_dir

    def validate(self, key: str) -> None:
        _check(bool(self.image.strip()), f"{key}.image", "must name a container image")
        _check(len(self.schedule_cron.split()) == 6, f"{key}.schedule_cron",
               f"'{self.schedule_cron}' must have 6 fields (seconds first), e.g. '0 0 3 * * *'")


@dataclass(frozen=True)
class ServingConfig:
    """The online predictor (onerec/serve.py, serving/). A/B variants live in their own file
    (`ab_config`), reread when it changes, so a split changes without a restart."""
    default_k: int            # items per response when the request names no k
    max_k: int                # the largest k a request may ask for
    beam_size: int            # beams of the constrained search per batch (widened to k without a dense head)
    head_candidates: int      # the hybrid's dense-head items scored beside the beams (widened to a request's k)
    ab_config: str            # YAML/JSON file of the A/B experiment; '' = everyone gets the champion
    popular_refresh_s: float  # how often the cold-start list is reread from Feast item stats
    reload_poll_s: float      # how often the registry aliases are polled; a moved alias is swapped in
    max_batch_size: int       # requests batched into one feature lookup + beam search; 1 = no batching
    max_batch_wait_ms: float  # with concurrent callers, how long a batch waits for them all to be back
    max_pending: int          # requests waiting beyond this are refused with 503 (load shedding)
    max_queue_ms: float       # shed (503) a request that waited longer while the queue stands; 0 = never
    standing_queue_ms: float  # the queue stands when no request started within max_queue_ms for this long
    model_process: bool       # beam search in a child process with its own GIL (onerec/model_process.py)
    pipeline: bool            # batch k+1's feature lookup runs while batch k's beam search does (batching.py)
    model_threads: int        # torch threads for the beam search; 0 = torch's default
    gil_switch_ms: float      # the server's sys.setswitchinterval: how long a thread may hold the GIL while another waits
    pin_cpus: bool            # the model process on its own model_threads CPUs, the server's threads on the others (no model process: no pinning)

    def validate(self, key: str) -> None:
        _check(1 <= self.default_k <= self.max_k, f"{key}.default_k", "must be in 1..max_k")
        _check(self.beam_size >= 1, f"{key}.beam_size", "must be >= 1")
        _check(self.head_candidates >= self.default_k, f"{key}.head_candidates",
               "must be >= default_k (the hybrid's k best items may all be the head's)")
        _check(self.popular_refresh_s > 0, f"{key}.popular_refresh_s", "must be > 0")
        _check(self.reload_poll_s > 0, f"{key}.reload_poll_s", "must be > 0")
        _check(self.max_batch_size >= 1, f"{key}.max_batch_size", "must be >= 1 (1 = no batching)")
        _check(self.max_batch_wait_ms >= 0, f"{key}.max_batch_wait_ms", "must be >= 0")
        _check(self.max_pending >= 1, f"{key}.max_pending", "must be >= 1")
        _check(self.max_queue_ms >= 0, f"{key}.max_queue_ms", "must be >= 0 (0 = never shed)")
        _check(self.standing_queue_ms >= 0, f"{key}.standing_queue_ms", "must be >= 0")
        _check(self.model_threads >= 0, f"{key}.model_threads", "must be >= 0 (0 = torch's default)")
        _check(self.gil_switch_ms > 0, f"{key}.gil_switch_ms", "must be > 0 (Python's default is 5)")
        _check(not (self.pin_cpus and self.model_process) or self.model_threads >= 1, f"{key}.pin_cpus",
               "needs serving.model_threads >= 1 (the CPUs the model process gets)")


@dataclass(frozen=True)
class SimulateConfig:
    """`onerec simulate`: users who request recommendations and react to them (onerec/simulate.py),
    and the response model their modelled reactions come from (onerec/rl/response.py)."""
    users: int                # simulated users, drawn (seeded) from those with online features
    sessions_per_user: int    # requests each simulated user makes
    k: int                    # items per request (<= serving.max_k)
    max_rate_per_s: float     # requests per second at most (all users together)
    response_dim: int         # latent factors of the response model (biased matrix factorization)
    response_l2: float        # L2 on factors and biases, per rating
    response_lr: float        # Adam learning rate (full batch)
    response_epochs: int      # at most; early stop on a random 5 % of the ratings

    def validate(self, key: str) -> None:
        for name in ("users", "sessions_per_user", "k", "response_dim", "response_epochs"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.max_rate_per_s > 0, f"{key}.max_rate_per_s", "must be > 0")
        _check(self.response_l2 >= 0 and self.response_lr > 0, f"{key}.response_l2",
               "response_l2 must be >= 0 and response_lr > 0")


@dataclass(frozen=True)
class RewardsConfig:
    """The reward joiner (onerec/stream/rewards.py): exposures x reactions -> per-exposure rows."""
    group_id: str             # its Kafka consumer group (run several: they share partitions)
    window_s: float           # how long after it was served an exposure collects reactions
    flush_s: float            # how often closed rows are written and offsets committed

    def validate(self, key: str) -> None:
        _check(bool(self.group_id), f"{key}.group_id", "must be a non-empty string")
        _check(self.window_s > 0 and self.flush_s > 0, f"{key}.window_s", "window_s and flush_s must be > 0")


@dataclass(frozen=True)
class RewardModelConfig:
    """The reward model (onerec/rl/reward_model.py): P-Score-style towers on (user, item)."""
    dim: int
    buckets: int              # hashed id rows per tower (new ids share rows instead of failing)
    epochs: int               # at most: early stop on the latest valid_share of the training rows
    patience: int             # epochs without a better validation AUC before stopping
    valid_share: float
    batch_size: int
    lr: float
    weight_decay: float

    def validate(self, key: str) -> None:
        for name in ("dim", "buckets", "epochs", "patience", "batch_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(0 < self.valid_share < 1 and self.lr > 0 and self.weight_decay >= 0, f"{key}.valid_share",
               "valid_share must be in (0, 1), lr > 0, weight_decay >= 0")


@dataclass(frozen=True)
class AlignConfig:
    """Preference alignment (onerec/rl/align.py): groups sampled from the policy, scored, updated."""
    method: Literal["ecpo", "gbpo", "dpo"]
    group_size: int           # G samples per user (advantages are relative within the group)
    steps: int                # sampling rounds
    batch_users: int
    inner_steps: int          # policy updates per sampled batch
    lr: float
    clip_eps: float
    clip_delta: float         # ECPO's early clip: the ratio of a negative sample is at most 1 + eps + delta
    kl_coef: float            # weight of KL(policy || the starting champion)
    dpo_beta: float
    temperature: float        # sampling temperature
    sampler: Literal["tokens", "served"]   # tokens: the decoder's; served: the hybrid's serving score (align.py)
    candidates: int           # "served": draw among the dense head's top this many items

    def validate(self, key: str) -> None:
        _check(self.group_size >= 2, f"{key}.group_size", "must be >= 2 (advantages are relative within a group)")
        for name in ("steps", "batch_users", "inner_steps"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.lr > 0 and self.temperature > 0 and self.kl_coef >= 0, f"{key}.lr",
               "lr and temperature must be > 0, kl_coef >= 0")
        _check(self.candidates >= self.group_size, f"{key}.candidates", "must be >= group_size (distinct samples)")


@dataclass(frozen=True)
class ABTestConfig:
    """A/B tests (onerec/abtest/): the SQL store, the scorecard's statistics, the dashboard and the
    guardrail watcher. The store's URL is an endpoint: AB_STORE_URL, else SQLite under stack.state_dir."""
    primary_metric: Literal["reward_per_user", "watch_time_per_user", "reward_per_exposure"]
    alpha: float              # two-sided; the CIs are (1 - alpha)
    min_users: int            # per variant, before the scorecard gives a verdict
    pre_period_days: float    # CUPED: each user's activity this long before the experiment's first exposure
    cuped: bool
    msprt_tau: float          # the always-valid p-value's mixture scale, in units of the primary metric
    max_p99_latency_ms: float # guardrails, per variant
    max_error_rate: float     # the predictor's refused / failed requests (from its metrics), overall
    max_fallback_rate: float  # recommendations that fell back to the popular items, per variant
    dashboard_host: str
    dashboard_port: int
    refresh_s: int            # the dashboard page reloads itself this often
    action_token: str         # promote / rollback from the dashboard need it; "" = read-only
    watch: bool               # the automatic guardrail: roll a newly promoted champion back on a breach
    watch_interval_s: float
    watch_min_requests: int   # requests served by the new champion before the watcher judges it
    watch_for_s: float        # how long after a promotion the watcher keeps judging the new champion

    def validate(self, key: str) -> None:
        _check(0 < self.alpha < 1, f"{key}.alpha", "must be in (0, 1)")
        for name in ("min_users", "watch_min_requests"):
            _check(getattr(self, name) >= 2, f"{key}.{name}", "must be >= 2")
        for name in ("pre_period_days", "msprt_tau", "max_p99_latency_ms", "watch_interval_s", "watch_for_s"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        for name in ("max_error_rate", "max_fallback_rate"):
            _check(0 <= getattr(self, name) <= 1, f"{key}.{name}", "must be in [0, 1]")
        _check(1 <= self.dashboard_port < 65536 and self.refresh_s >= 1, f"{key}.dashboard_port",
               "dashboard_port must be a TCP port and refresh_s >= 1")


@dataclass(frozen=True)
class Config:
    preset: str
    seed: int
    data: DataConfig
    kafka: KafkaConfig
    stack: StackConfig
    features: FeaturesConfig
    ingest: IngestConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    registry: RegistryConfig
    pipelines: PipelinesConfig
    serving: ServingConfig
    simulate: SimulateConfig
    rewards: RewardsConfig
    reward_model: RewardModelConfig
    align: AlignConfig
    abtest: ABTestConfig


# --------------------------------------------------------------------------- building

def _parse_type(tp: Any, value: Any, key: str) -> Any:
    """Check (and gently coerce int -> float) one value against its annotation."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        _check(value in typing.get_args(tp), key,
               f"{value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parse_type(inner[0], value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)) and len(value) == len(args), key,
               f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_parse_type(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug in this module, not user error


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "<top level>"
    _check(isinstance(data, dict), where, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            raise ConfigError(f"config key '{_join(prefix, key)}': unknown key{hint}")
    missing = [n for n in names if n not in data]
    _check(not missing, _join(prefix, missing[0]) if missing else where, "missing from the preset")
    obj = cls(**{n: _parse_type(hints[n], data[n], _join(prefix, n)) for n in names})
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _apply_override(tree: dict, override: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML so numbers, booleans and null work."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected KEY=VALUE, e.g. model.d_model=256")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}': unknown section in override '{override}'")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"config key '{dotted.strip()}': unknown key in override '{override}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        node[parts[-1]] = _yaml11_float(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config key '{dotted.strip()}': cannot parse value {raw!r}: {exc}") from None


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-7` (no dot) as a string; take it as the number it is meant to be."""
    if isinstance(value, str):
        try:
            return float(value) if any(c.isdigit() for c in value) and "e" in value.lower() else value
        except ValueError:
            return value
    return value


def preset_path(preset: str) -> Path:
    """A preset name (`debug`) or a path to a YAML file."""
    if preset.endswith((".yaml", ".yml")) or os.sep in preset:
        return Path(preset)
    return PRESET_DIR / f"{preset}.yaml"


def load_config(preset: str = "debug", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = preset_path(preset)
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"config preset '{preset}': no file {path} (presets: {', '.join(known)})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config preset {path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config preset {path}: expected a mapping at the top level")
    tree.setdefault("preset", path.stem)
    for override in overrides:
        _apply_override(tree, override)
    try:
        return _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{exc} [in {path}]") from None


def to_dict(cfg: Config) -> dict:
    """Plain nested dict, e.g. to log the resolved config to MLflow."""
    return dataclasses.asdict(cfg)
