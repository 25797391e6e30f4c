"""Distributed mode's Redis plumbing: API front ends and workers over Redis Streams.

- `keys`: every Redis key the service uses, under one prefix.
- `connection`: clients (a real server, or the in-process store of embedded mode) and
  the health monitor behind /readyz.
- `queue`: the work streams with their consumer group: at-least-once delivery, reclaim
  from dead workers, refresh of long-running work, hand-back, dead letters.
- `codec`: arrays in stream entries, and .npy / .safetensors written piece by piece.
- `worker`: the worker loop: consumes work, hands each message to the handler of its
  kind, heartbeats, drains on shutdown.

What the messages mean lives with their concern: online sampling in service/online/
(remote.py on the API side, worker.py on the worker side), batch jobs in service/batch/.
This package imports neither.
"""
