"""The README's flow: `moeyard up --detach` (the default model), `moeyard generate` (chat, --addr),
`moeyard status`, `moeyard down`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moeyard.cluster.infra.redis_server import LocalRedis, LocalRedisInfo

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent / "moeyard"


def _run(args, env, timeout=300):
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=timeout)


CHAT = {"What is the capital of France?": "paris", "What is 2 + 2?": "4",
        "What color is the sky on a clear day?": "blue"}


def test_up_generate_status_down(tmp_path, smollm2_gguf):
    """``up`` with no model: SmolLM2-135M-Instruct upcycled into an MoE (the GGUF placed where ``up`` caches
    its download, so the session fetches it once), answering chat questions with the dense model's tokens."""
    import ray

    if ray.is_initialized():  # this session's own test cluster; `down` would stop it anyway
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home))
    downloads = home / ".moeyard" / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(smollm2_gguf, downloads / smollm2_gguf.name)
    up = _run(["up", "--detach", "--attention-replicas", "1", "--dtype", "float32"], env, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    first = up.stdout.splitlines()[0]
    assert first.startswith("API 127.0.0.1:"), up.stdout
    addr = first.split()[1]
    second = up.stdout.splitlines()[1]
    assert re.fullmatch(r"Dashboard http://127\.0\.0\.1:\d+/", second), up.stdout
    dashboard = second.split()[1]
    token_file = home / ".moeyard" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(dashboard, timeout=10)
        assert denied.value.code == 401
        assert urllib.request.urlopen(dashboard + "metrics", timeout=10).status == 200
        top = _run(["top", "--once"], env)  # URL from the state file, token from ~/.moeyard/token
        assert top.returncode == 0 and "epoch" in top.stdout, top.stdout + top.stderr
        assert "upcycling it into an MoE (8 experts, top-2" in up.stderr
        gen = _run(["generate", "--addr", addr, "--token-ids", "5,6,7,8", "--max-new-tokens", "6",
                    "--ignore-eos", "--json"], env)
        assert gen.returncode == 0, gen.stderr
        for question, needle in CHAT.items():  # no --addr: the cluster `up` started (the state file)
            chat = _run(["generate", "--chat", "--prompt", question, "--max-new-tokens", "24", "--json"], env)
            assert chat.returncode == 0, chat.stderr
            got = json.loads(chat.stdout.strip().splitlines()[-1])
            dense = _run(["generate", "--model", str(smollm2_gguf), "--chat", "--prompt", question,
                          "--max-new-tokens", "24", "--dtype", "float32", "--json"], env)
            assert dense.returncode == 0, dense.stderr
            assert got["token_ids"] == json.loads(dense.stdout.strip().splitlines()[-1])["token_ids"], question
            assert needle in got["text"].lower(), got["text"]
        no_token = _run(["generate", "--addr", addr, "--token", "nope", "--token-ids", "5", "--json"], env)
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        status = _run(["status", "--json"], env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout.strip().splitlines()[-1])
        assert report["api_health"] == "SERVING"
        assert [s["healthy"] for s in report["shards"]] == [True, True]
        assert report["redis"].startswith("redis://127.0.0.1:")
        # real text skews the k-means router's load: the autoscaler may already have moved experts, one MoE
        # layer (one epoch) at a time, and the status reports the epoch in force
        assert isinstance(report["placement_epoch"], int) and report["placement_epoch"] >= 0
        state = json.loads((home / ".moeyard" / "state.json").read_text())
        redis_info = LocalRedisInfo.from_dict(state["local_redis"])
        assert LocalRedis.is_alive(redis_info)  # our own redis-server runs
        reb = _run(["rebalance", "--json"], env)
        assert reb.returncode == 0, reb.stderr
        decision = json.loads(reb.stdout.strip().splitlines()[-1])
        assert set(decision) >= {"acted", "decision", "epoch"}
        token = token_file.read_text().strip()
        for text in (up.stdout, up.stderr, gen.stdout, gen.stderr, status.stdout):
            assert token not in text
        # Ray's token authentication is on: a process without the token cannot join the cluster
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        env2 = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env2["HOME"] = str(stranger)
        join = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=%r, log_to_driver=False); "
                               "print('joined')" % state["ray_address"]], env=env2, capture_output=True,
                              text=True, timeout=180)
        assert join.returncode != 0 and "joined" not in join.stdout, join.stdout + join.stderr[-2000:]
        assert re.search(r"auth|token", join.stderr, re.I), join.stderr[-2000:]
        # no token or password in any log of the run (Ray's session logs: every actor and replica; ours)
        urllib.request.urlopen(dashboard + f"?token={token}", timeout=10).read()  # a token in a query string
        secrets = {"API token": token, "Redis password": Path(redis_info.password_file).read_text().strip()}
        logs = [f for d in (Path("/tmp/ray/session_latest/logs"), home / ".moeyard" / "logs") if d.is_dir()
                for f in d.rglob("*") if f.is_file()]
        assert len(logs) > 10, logs
        for f in logs:
            data = f.read_bytes()
            for what, secret in secrets.items():
                assert secret.encode() not in data, f"the {what} is in {f}"
    finally:
        down = _run(["down"], env)
        assert down.returncode == 0, down.stderr
    assert not (home / ".moeyard" / "state.json").exists()
    assert not LocalRedis.is_alive(redis_info)  # `down` stopped it


def test_up_with_a_redis_that_does_not_answer(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home))
    r = _run(["up", "--detach", "--redis", "redis://:hunter2secret@127.0.0.1:1/0"], env, timeout=120)
    assert r.returncode == 2
    assert "Redis at redis://" in r.stderr and "127.0.0.1:1" in r.stderr and "does not answer" in r.stderr
    assert "hunter2secret" not in r.stdout + r.stderr
    assert not (home / ".moeyard" / "state.json").exists()
