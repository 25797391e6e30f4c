"""Distributed mode: API front ends and workers over Redis Streams (DESIGN.md section 7).

- `keys`: every Redis key the service uses, under one prefix.
- `connection`: clients (a real server, or the in-process store of embedded mode) and
  the health monitor behind /readyz.
- `queue`: the work streams with their consumer group: at-least-once delivery, reclaim
  from dead workers, refresh of long-running work, dead letters.
- `codec`: arrays in stream entries, and .npy / .safetensors written piece by piece.
- `remote`: the API side of online sampling (submit, relay, resume).
- `worker`: the `imh worker` process: consumes work, runs the engine, heartbeats.
"""
