"""Typed settings of a Kubernetes (KubeRay) deployment: what ``moeyard render-k8s`` renders from.

They sit in the same config file as the cluster itself (key ``kubernetes:``), so the
``serveConfigV2`` inside the rendered ``RayService`` is the very :class:`ClusterConfig`
that ``moeyard up --config`` would run, with the in-cluster addresses filled in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME = r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$"
_SERVICE_NAME = r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$"  # a Service name starts with a letter
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"


class PodSize(BaseModel):
    """Container requests = limits (Guaranteed QoS: Ray's resource accounting matches the pod's)."""

    model_config = ConfigDict(extra="forbid")

    cpu: str = Field("2", pattern=_QUANTITY)
    memory: str = Field("8Gi", pattern=_QUANTITY)
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod")


class WorkerGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    ray_cpus: int = Field(2, ge=0, description="rayStartParams num-cpus (logical CPUs Ray schedules on)")
    size: PodSize = PodSize()
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str | int]] = []
    """Kubernetes tolerations as plain objects
    (e.g. ``{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}``)."""

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerGroup":
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas}, "
                             f"{self.replicas}, {self.max_replicas}")
        return self


class RedisDeployment(BaseModel):
    """Redis for load statistics, the placement and events: our own Deployment, or an external URL."""

    model_config = ConfigDict(extra="forbid")

    deploy: bool = Field(True, description="deploy a redis Deployment + Service; false = use cluster.redis.url")
    image: str = "redis:7.4-alpine"
    password_secret: str = Field("moeyard-redis", pattern=_NAME, description="Secret with key `password`")
    size: PodSize = PodSize(cpu="500m", memory="1Gi")


class KubernetesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("moeyard", pattern=_SERVICE_NAME, description="RayService name; prefixes every object")
    namespace: str = Field("moeyard", pattern=_NAME)
    profile: Literal["cpu", "gpu"] = "cpu"
    image: str = "moeyard:0.1.0-cpu"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = "2.60.0"
    head: PodSize = PodSize(cpu="2", memory="8Gi")
    attention: WorkerGroup = WorkerGroup()
    experts: WorkerGroup = WorkerGroup(replicas=2, min_replicas=2, max_replicas=8)
    idle_timeout_s: int = Field(120, ge=0, description="the Ray autoscaler removes a worker idle this long")
    models_claim: str = Field("moeyard-models", pattern=_NAME, description="PVC holding the checkpoints")
    models_mount: str = Field("/models", pattern=r"^/")
    api_token_secret: str = Field("moeyard-api-token", pattern=_NAME, description="Secret with key `token`")
    redis: RedisDeployment = RedisDeployment()
    api_port: int = Field(9000, ge=1, le=65535)
    dashboard_port: int = Field(8090, ge=1, le=65535)
    serve_http_port: int = Field(8000, ge=1, le=65535)
    pod_monitor: bool = Field(True, description="a prometheus-operator PodMonitor for /metrics and Ray's metrics")
    shm_size: str = Field("2Gi", pattern=_QUANTITY, description="/dev/shm for Ray's object store")
