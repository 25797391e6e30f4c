r"""Every Redis key of the service, under one prefix (IMH_REDIS_PREFIX, default "imh").

Work:        {p}:work:online, {p}:work:jobs    streams read by the consumer group "workers"
             {p}:dead                          dead-letter stream
Requests:    {p}:req:{id}                      events of one online request (SSE ids)
             {p}:req:{id}:lease                exists while a client wants the request
Models:      {p}:models                        pub/sub: a model was uploaded or deleted
Workers:     {p}:workers                       set of worker names
             {p}:worker:{name}                 heartbeat (expires), JSON about the worker
Jobs:        {p}:jobs                          sorted set: job id by creation time
             {p}:job-states                    hash: job id -> "type:state" (the gauges)
             {p}:job:{id}                      hash: spec, state, counts, timestamps, error
             {p}:job:{id}:events               stream of state and progress events
             {p}:job:{id}:done                 set of finished shard numbers
             {p}:job:{id}:in:{k}               shard k's input (filter candidates)    \ arrays:
             {p}:job:{id}:out:{k}              shard k's output                        > service/
             {p}:job:{id}:result:{name}        a finished filter job's arrays         / batch/arrays
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
ONLINE, JOBS = "online", "jobs"
STREAMS = (ONLINE, JOBS)


@dataclass(frozen=True)
class Keys:
    prefix: str = "imh"

    def work(self, stream: str) -> str:
        return f"{self.prefix}:work:{stream}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def lease(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}:lease"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def job_states(self) -> str:
        return f"{self.prefix}:job-states"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def job_done(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:done"
