"""Typed configuration of a moeyard cluster (``moeyard up`` and the Serve app).

One :class:`ClusterConfig` describes the whole application: the model, the
expert shards and their placement, the attention replicas, the API. It is read
from a YAML/JSON file plus command-line overrides, validated by pydantic, and
handed to the Serve application as a plain dict (so it also renders into a
KubeRay ``serveConfigV2``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.cluster.settings.kubernetes import KubernetesSettings
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.cluster.settings.tls import TLSSettings

MOEYARD_HOME = Path.home() / ".moeyard"
DEMO_MODEL_DIR = MOEYARD_HOME / "models" / "demo-mixtral"
DEFAULT_TOKEN_FILE = MOEYARD_HOME / "token"


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    kv_cache_mib: int = Field(512, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    max_waiting: int = Field(256, ge=0, description="admission queue bound; beyond it RESOURCE_EXHAUSTED")
    max_new_tokens_limit: int = Field(4096, ge=1)
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "paged", "triton", "gather"] = Field(
        "auto", description="paged-attention kernel (attention/paged.py): 'auto' = Triton on CUDA where it is "
                            "installed, else 'paged' (torch, tile by tile through the block tables); 'gather' is "
                            "the reference (whole contexts gathered, MLA expanded)")


class RayResources(BaseModel):
    """Custom Ray resources that pin each kind of process to its node group (on Kubernetes, every
    group's pods advertise theirs: see ``moeyard.cluster.k8s``). ``None`` = anywhere (one machine)."""

    model_config = ConfigDict(extra="forbid")

    control: str | None = Field(None, description="shard manager, autoscaler, dashboard, API ingress")
    attention: str | None = Field(None, description="attention replicas")
    experts: str | None = Field(None, description="expert shard actors")


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint directory; None (moeyard up): SmolLM2-135M-Instruct "
                                                "upcycled into an MoE, fetched once (offline: a random demo model)")
    dtype: Literal["bfloat16", "float32"] | None = None
    namespace: str = Field("moeyard", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")

    expert_shards: int = Field(2, ge=1)
    redundant_slots_per_shard: int = Field(1, ge=0)
    placement: list[list[int]] | None = Field(
        None, description="explicit phy2log [L, P]; default: experts dealt in order, copies in the redundant slots")
    shard_num_cpus: float = Field(1.0, gt=0)
    use_gpu: bool = Field(False, description="reserve one GPU per expert shard actor")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where replicas and shards compute: 'auto' = CUDA where the process has a GPU "
                            "(one it reserved with use_gpu / attention_use_gpu), else the CPU")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on `moeyard down` or a redeploy, requests in flight get this long to finish")
    shard_restart_wait_s: float = Field(
        30.0, ge=0, description="a step waits this long for a dead shard to restart when an expert it held has "
                                "no other copy; past it, only the requests routed to that expert fail (UNAVAILABLE)")
    shard_host: str = Field("127.0.0.1", description="bind address of the internal gRPC servers (the shards' and "
                                                     "the ingress's output sink); a wildcard (0.0.0.0) advertises "
                                                     "the node's IP (multi-node clusters)")
    ray_resources: RayResources = RayResources()

    attention_replicas: int = Field(2, ge=1)
    replica_num_cpus: float = Field(1.0, gt=0)
    attention_use_gpu: bool = Field(False, description="reserve one GPU per attention replica")
    overlap: bool = False
    """Ping-pong micro-batches. Off by default: on small CPU hosts where shards and replicas share
    cores splitting measured slower (docs/benchmarks.md); turn it on where shards have their own devices."""
    overlap_mode: Literal["adaptive", "always"] = Field(
        "adaptive", description="with overlap: 'adaptive' splits a step only where the replica measured split "
                                "steps of that shape to run faster (attention/overlap.py); 'always' splits every "
                                "step of two sequences or more")
    output_sink: bool = Field(
        True, description="replicas send per-step token deltas to the API ingress batched on one gRPC stream "
                          "per replica (cluster/serving/output_sink.py) instead of one Ray stream item per request "
                          "per step")
    wire_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    torch_threads: int = Field(1, ge=1, description="torch threads per process (shards and replicas)")
    deterministic: bool = Field(
        False, description="batch-invariant math in replicas and shards (model/batch_invariant.py): a request's "
                           "tokens do not depend on what else shares its batch, which replica serves it, the "
                           "placement or a shard restart; costs throughput (docs/benchmarks.md)")
    moe_top_k: int | None = Field(
        None, ge=1, description="experts per token the router chooses, instead of the checkpoint's top_k "
                                "(DS-MoE: dense-trained, sparse at inference); at most the model's experts")
    capacity_factor: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Switch-style expert capacity: each expert takes at most ceil(factor * T * A / E) "
                    "(token, expert) assignments of an engine step of T tokens (counted over the whole step, "
                    "before any micro-batch split); None: no limit")
    overflow: Literal["drop", "reroute"] = Field(
        "drop", description="an assignment past its expert's capacity: 'drop' (the token keeps its residual "
                            "for it) or 'reroute' (to the token's next-best expert with room)")
    cpu_matmul: Literal["auto", "amx", "packed", "plain"] = Field(
        "auto", description="CPU matmul kernel of replicas and shards (model/cpu_matmul.py): 'amx' runs bf16 "
                            "weights on our AMX kernel (model/amx.py, CPUs with AMX-BF16), 'packed' keeps bf16 "
                            "weights in oneDNN's blocked layout (AVX-512 and up), 'plain' uses torch's matmul, "
                            "'auto' the first that runs here")
    engine: EngineSettings = EngineSettings()

    api_host: str = "127.0.0.1"
    api_port: int = Field(0, ge=0, le=65535, description="0 = any free port")
    require_auth: bool = True
    api_token_file: str | None = Field(None, description="file holding the API token; default ~/.moeyard/token")

    tls: TLSSettings = TLSSettings()
    """PEM files: TLS for the public API and mutual TLS between routers and shards (unset: plaintext,
    for loopback; set them whenever anything binds beyond it)."""
    redis: RedisSettings = RedisSettings()
    """Load statistics, the placement and autoscaler events; ``moeyard up`` fills ``url`` with its own
    ``redis-server`` unless ``--redis URL`` is given. Without a URL: static placement, no autoscaler."""
    autoscaler: AutoscalerSettings = AutoscalerSettings()
    dashboard: DashboardSettings = DashboardSettings()
    """The operator dashboard and ``/metrics`` (own port, loopback, behind the API token by default)."""
    kubernetes: KubernetesSettings | None = None
    """How ``moeyard render-k8s`` deploys this config on KubeRay (ignored by ``moeyard up``)."""

    @model_validator(mode="after")
    def _capacity_not_deterministic(self):
        if self.deterministic and self.capacity_factor is not None:
            raise ValueError("deterministic cannot be combined with capacity_factor: which tokens overflow an "
                             "expert depends on the rest of the batch")
        return self

    @field_validator("placement")
    @classmethod
    def _rect(cls, v):
        if v is not None and (not v or len({len(r) for r in v}) != 1):
            raise ValueError("placement must be a non-empty rectangular [L, P] list")
        return v

    def model_dir(self) -> Path:
        return Path(self.model) if self.model else DEMO_MODEL_DIR

    def token_file(self) -> Path:
        return Path(self.api_token_file) if self.api_token_file else DEFAULT_TOKEN_FILE

    def dashboard_token_file(self) -> Path:
        return Path(self.dashboard.token_file) if self.dashboard.token_file else self.token_file()


def check_moe_options(cfg: ClusterConfig, spec) -> None:
    """ValueError naming the option when ``cfg``'s MoE serving options do not fit the model ``spec``
    (a :class:`~moeyard.model.spec.ModelSpec`): a dense model, or a ``moe_top_k`` the router cannot pick."""
    from moeyard.router_service.gate import GateConfig

    if spec.moe is None:
        for name in ("moe_top_k", "capacity_factor"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"{name} applies to MoE models; {spec.family} at {cfg.model_dir()} is dense")
        return
    if cfg.moe_top_k is not None:
        try:
            GateConfig.from_spec(spec.moe, cfg.moe_top_k, family=spec.family)
        except ValueError as e:
            raise ValueError(f"moe_top_k {cfg.moe_top_k} does not fit {spec.family} "
                             f"({spec.moe.num_experts} experts): {e}") from None


def load_config(path: str | Path | None, **overrides) -> ClusterConfig:
    """Config from a YAML or JSON file (optional) with non-None ``overrides`` on top."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        text = p.read_text()
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterConfig.model_validate(data)
