"""ray_cluster.yaml autoscales: a run that asks for the training node type's resources makes the
autoscaler add that node type, the run completes on it, and the node goes away after the idle timeout.

The cluster is Ray's fake multi-node provider (the one `ray.cluster_utils.AutoscalingCluster`
drives: every "node" is a raylet on this machine, launched and terminated by the real autoscaler)
with ray_cluster.yaml's node types at laptop size: the same names, the same custom resources
(`train_gpu` standing in for the GPUs this machine lacks, `data_cpu`), a head with CPU 0.

It runs in a child process with its own Ray head (the session's `ray_session` Ray stays untouched).
We start the head ourselves instead of calling `AutoscalingCluster.start()`, which runs
`ray stop --force` - killing every Ray on the machine, the session's included - and whose base
config (fake_multi_node/example.yaml) is not shipped in the Ray wheel. The child is its own process
group, so whatever it leaves behind is killed with the group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import TEST_RAY_TRAIN_ENV

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILE = ROOT / "ray_cluster.yaml"
HEAD = "ray.head.default"  # the fake provider's head node type is hard-wired to this name
IDLE_TIMEOUT_MIN = 0.1  # 6 s: the shortest the autoscaler's 1 s update loop resolves comfortably
_OBJECT_STORE = 300 * 1024**2  # per node; Ray's default (30% of RAM) is far more than a 3-step run needs
_CHILD_DEADLINE_S = 150.0


def fake_cloud(cluster: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """ray_cluster.yaml -> a fake_multinode config: same node types and custom resources, tiny sizes.

    A worker type keeps its custom resources (what a run's `scaling` asks for) at the size of its
    small CPU count (2 for a GPU type: its 2 training workers; 1 otherwise) and drops GPU; every
    type may have at most one node, so two types give at most three nodes on 2 cores.
    """
    types: dict[str, Any] = {}
    for name, spec in cluster["available_node_types"].items():
        res = spec["resources"]
        if name == cluster["head_node_type"]:
            types[name] = {"resources": {"CPU": res.get("CPU", 1)}, "node_config": {}, "max_workers": 0}
            continue
        cpus = 2 if res.get("GPU") else 1
        custom = {k: cpus for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory")}
        types[name] = {"resources": {"CPU": cpus, **custom, "object_store_memory": _OBJECT_STORE}, "node_config": {},
                       "min_workers": spec.get("min_workers", 0), "max_workers": 1}
    return {
        "cluster_name": "mmpt-fake", "max_workers": len(types) - 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types, "head_node_type": cluster["head_node_type"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0), "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        # The fake provider runs no commands; the launcher's schema still wants the keys.
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _node_type(resources: dict[str, float], types: dict[str, Any]) -> str:
    """Which node type a live node is: the one whose custom resources it advertises."""
    for name, spec in types.items():
        custom = set(spec["resources"]) - {"CPU", "object_store_memory"}
        if custom and custom <= set(resources):
            return name
    return HEAD


def _child(data: str, storage: str, out: str) -> None:
    """The scenario, in its own process: fake cloud up, one mmpt run, nodes sampled until idle again."""
    import secrets
    import socket
    import tempfile

    tmp = tempfile.mkdtemp(prefix="mmpt-as-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(tmp, "auth_token")
    token.write_text(secrets.token_hex(16))
    # Set before Ray is imported: token auth as on the real cluster, with a token of our own, and
    # every process (head, fake nodes, driver) on the loopback address.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_FAKE_CLUSTER="1",
                      AUTOSCALER_UPDATE_INTERVAL_S="1")
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        os.environ.pop(var, None)

    import io
    import threading

    import ray
    from rich.console import Console

    from orchestrator.config import load_config
    from orchestrator.run.runner import run
    from tests.integration.conftest import QUICKSTART, tiny

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    config = fake_cloud(yaml.safe_load(CLUSTER_FILE.read_text()), address)
    config_file = Path(tmp, "fake_cluster.json")
    config_file.write_text(json.dumps(config))
    head_cpus = config["available_node_types"][HEAD]["resources"]["CPU"]
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         f"--autoscaling-config={config_file}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
         f"--object-store-memory={_OBJECT_STORE}",
         f"--temp-dir={tmp}/ray", "--disable-usage-stats"],
        stdout=open(Path(tmp, "head.log"), "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    samples: list[tuple[float, list[str]]] = []
    stop = threading.Event()
    result: dict[str, Any] = {"config": config}
    sampler: threading.Thread | None = None
    try:
        for _ in range(120):
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                time.sleep(0.5)
        types = config["available_node_types"]

        def sample() -> None:
            while not stop.is_set():
                alive = sorted(_node_type(n["Resources"], types) for n in ray.nodes() if n["Alive"])
                samples.append((time.time() - t0, alive))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(1.0)
        overrides = tiny(data, storage, **{
            "data.eval": "[]", "train.steps": 3, "train.log_every": 1, "train.checkpoint_every": 0,
            "train.warmup_steps": 1, "name": "autoscale", "moe.num_experts": 0,
            # the run's scaling section, mapped by orchestrator/run/scaling.py like any run's
            "scaling.num_workers": 2, "scaling.cpus_per_worker": 1,
            "scaling.resources_per_worker": "{train_gpu: 1}", "scaling.data_resources": "{data_cpu: 1}",
        })
        result["run_start"] = time.time() - t0
        res = run(load_config(QUICKSTART, overrides), console=Console(file=io.StringIO()))
        result["run_end"] = time.time() - t0
        result["steps"] = res.summary["steps"]
        while time.time() - t0 < _CHILD_DEADLINE_S and (not samples or samples[-1][1] != [HEAD]):
            time.sleep(0.5)
        time.sleep(1.0)
        # What keeps a worker node busy if it never went idle (named in the failure message).
        node_types = {n["NodeID"]: _node_type(n["Resources"], types) for n in ray.nodes()}
        result["lingering_actors"] = sorted(
            f"{a['ActorClassName']} on {node_types.get(a['Address']['NodeID'], '?')}"
            for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and node_types.get(a["Address"]["NodeID"], HEAD) != HEAD)
    finally:
        stop.set()
        if sampler is not None:
            sampler.join(5)
        result["samples"] = samples
        Path(out).write_text(json.dumps(result))
        ray.shutdown()
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        if result.get("steps") == 3 and samples and samples[-1][1] == [HEAD]:
            shutil.rmtree(tmp, ignore_errors=True)  # Ray's session logs; kept for a failed scenario
        else:
            print(f"fake cluster logs: {tmp}", flush=True)


@pytest.mark.slow
@pytest.mark.integration
def test_run_scales_training_node_type_up_then_down(shapes_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "scenario.json"
    log = tmp_path / "child.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | TEST_RAY_TRAIN_ENV
    env["PYTHONPATH"] = str(ROOT)
    with open(log, "w") as f:
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.integration.test_autoscaling import _child; "
             "_child(*sys.argv[1:])", str(shapes_data), str(tmp_path / "store"), str(out)],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=_CHILD_DEADLINE_S + 30)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            child.wait(30)
        finally:
            try:  # anything of the fake cluster still alive: it is all in the child's process group
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    tail = "\n".join(log.read_text().splitlines()[-30:])
    assert out.exists(), f"the scenario wrote no result; child output:\n{tail}"
    res = json.loads(out.read_text())
    samples: list[tuple[float, list[str]]] = res["samples"]
    assert child.returncode == 0 and res.get("steps") == 3, f"the run did not complete 3 steps:\n{tail}"

    before = [types for t, types in samples if t < res["run_start"]]
    during = [types for t, types in samples if res["run_start"] <= t <= res["run_end"]]
    after = [(t, types) for t, types in samples if t > res["run_end"]]
    # Only the head before the run; the run's resources brought exactly one node of each asked-for type.
    assert before and all(types == [HEAD] for types in before), before
    peak = max(during, key=len)
    assert peak == sorted([HEAD, "gpu_train", "cpu_data"]), f"node types at the peak of the run: {peak}"
    assert max(types.count("gpu_train") for types in during) == 1
    # After the run: the added nodes stay for the idle timeout, then the autoscaler removes them.
    assert after and after[-1][1] == [HEAD], (f"nodes still alive at the end: {after[-1:]}; actors on them: "
                                              f"{res.get('lingering_actors')}")
    assert "gpu_train" in after[0][1], f"the training node went away before the run ended: {after[0]}"
    back = next(t for t, types in after if types == [HEAD])
    assert back - res["run_end"] <= IDLE_TIMEOUT_MIN * 60 + 30, (back, res["run_end"])
    up = {name: next(t for t, types in samples if name in types) for name in ("gpu_train", "cpu_data")}
    counts = [len(types) for _, types in samples]
    print(f"alive nodes: {counts[0]} -> {max(counts)} -> {counts[-1]}; run {res['run_start']:.0f}-{res['run_end']:.0f} s, "
          f"gpu_train up at {up['gpu_train']:.0f} s, cpu_data up at {up['cpu_data']:.0f} s, back to the head "
          f"{back - res['run_end']:.0f} s after the run")


def test_ray_train_takes_the_cluster_example_scaling() -> None:
    """The 2x8-GPU example's mapped scaling is what Ray Train reserves per worker (no Ray started)."""
    import ray.train

    from orchestrator.config import load_config
    from orchestrator.run.scaling import train_scaling

    cfg = load_config(ROOT / "jobs" / "configs" / "cluster_2x8gpu.yaml")
    sc = ray.train.ScalingConfig(**train_scaling(cfg.scaling))
    assert sc.num_workers == 16
    assert sc._resources_per_worker_not_none == {"CPU": 8.0, "GPU": 1, "train_gpu": 1.0, "accelerator_type:A100": 0.001}


if __name__ == "__main__":
    _child(*sys.argv[1:])
