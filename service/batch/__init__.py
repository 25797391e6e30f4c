"""Batch jobs (POST /v1/jobs): generate n filtered samples, or filter an uploaded set.

- `schemas`: the request and answer bodies.
- `store`: a job's life in Redis: creation with its shards, state changes, idempotent
  shard results, events, and the result streamed as .npy or .safetensors.
- `service`: the API side (checks, uploads, submission).
- `shards`: the worker side (running one shard, finishing a filter job).

Jobs use the same Redis code in both modes: a real server in distributed mode, the
in-process store in embedded mode (service/distributed/connection.py).
"""
