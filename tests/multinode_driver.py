"""Run a tiny training on a 2-node local Ray cluster (two raylets on loopback) and print a JSON summary.

Usage: python tests/multinode_driver.py SHARDS_URL STORAGE_URL RUN_DIR MLFLOW_URI
Runs in its own process (the test suite's session-wide local Ray would fight a second cluster in-process).
The workers are spread with ``train.placement_strategy=STRICT_SPREAD``; each node has 2 logical CPUs so that
Ray Data's read tasks fit beside a 0.5-CPU training worker. Nothing is shared between the nodes through a local
directory: the shards are read from, and the checkpoints written to, the object store at SHARDS_URL / STORAGE_URL
(credentials and endpoint from the standard AWS environment). RUN_DIR only holds the driver's own files.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(shards: str, storage: str, run_dir: str, mlflow_uri: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray._private.state import actors  # the GCS actor table (no dashboard needed)

    from conftest import tiny_train_overrides
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cfg = load_config(TrainJobConfig, "train", tiny_train_overrides(Path("/nonexistent"), Path(run_dir), **{
            "data.shards": f"{shards}/train", "data.val_shards": f"{shards}/val",
            "run_name": "multinode", "train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 5,
            "train.placement_strategy": "STRICT_SPREAD", "train.storage_path": storage,
            "tracking.tracking_uri": mlflow_uri}))
        result = fit(cfg, make_grid=False)
        workers = [a for a in actors().values() if "RayTrainWorker" in a["ActorClassName"]]
        return {"nodes": nodes, "worker_nodes": sorted({a["Address"]["NodeID"] for a in workers}),
                "num_workers": len(workers), "run_id": result.run_id,
                "checkpoint": str(result.checkpoint), "storage": storage}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print("\nMULTINODE " + json.dumps(main(*sys.argv[1:5])), flush=True)
