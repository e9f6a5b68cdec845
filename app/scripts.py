"""The worker's Redis scripts: claiming jobs, putting them back, the lane check, and
RQ's writes for a job sent as one script (run_as_script).

A claimed job is in its queue's intermediate list (RQ's), where maintenance finds it
if the worker dies (AppWorker.requeue_stranded); it goes back to the head of its
queue if the worker does not start it. Every move is one LMOVE or one script, so a
job id is always in exactly one place.

Lanes (app.queues.PRIORITIES): a worker serves its queues strictly in listen order.
The round trip that starts a mail also asks whether a queue listed before the mail's
has work (HIGHER_WAITING); if one has, the worker starts no more jobs of the lower
lane it claimed ahead, puts them back, and claims again from the top.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from redis.client import Pipeline
from rq.queue import Queue

# KEYS: intermediate list, queue, the id's first-seen mark. ARGV: a job id. Moves it
# back to the head of the queue only if it is still in the list (whoever moves it first).
PUT_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: queue, its intermediate list. ARGV: how many. Pops like AppQueue.dequeue_any.
CLAIM = """
local ids = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  ids[#ids + 1] = id
end
return ids
"""

# KEYS: pairs of (queue, its intermediate list), in the worker's order. ARGV: how many.
# Pops up to that many ids, from the first queue until it is empty, then the next:
# a free slot always goes to the first queue that has work. Returns [index, id, ...].
CLAIM_ANY = """
local out, left = {}, tonumber(ARGV[1])
for k = 1, #KEYS, 2 do
  while left > 0 do
    local id = redis.call('LMOVE', KEYS[k], KEYS[k + 1], 'LEFT', 'RIGHT')
    if not id then break end
    out[#out + 1] = (k + 1) / 2
    out[#out + 1] = id
    left = left - 1
  end
  if left == 0 then break end
end
return out
"""


# KEYS: queues. Whether any has a job waiting (claimed ones, in intermediate lists,
# are some worker's already).
HIGHER_WAITING = """
for i = 1, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return 1 end
end
return 0
"""


def put_back(pipeline: Any, claimed: Iterable[tuple[Any, Queue]]) -> None:
    """Queue on `pipeline` the return of claimed, never started jobs to the head of
    their queues, keeping their order; one maintenance already put back is not
    pushed a second time."""
    for job, queue in reversed(list(claimed)):
        seen_key = queue.intermediate_queue.get_first_seen_key(job.id)
        keys = (queue.intermediate_queue_key, queue.key, seen_key)
        pipeline.eval(PUT_BACK, 3, *keys, job.id)


class Lanes:
    """For each of a worker's queues, the keys of the queues it listens to before it."""

    def __init__(self, queues: Sequence[Queue]) -> None:
        self._higher: dict[str, list[str]] = {}
        for index, queue in enumerate(queues):
            self._higher[queue.name] = [q.key for q in queues[:index]]

    def check(self, pipeline: Any, queue: Queue) -> bool:
        """Queue the lane check for a job of `queue` on `pipeline`; False if there is
        nothing to check (its queue comes first), and no reply to read."""
        higher = self._higher.get(queue.name)
        if not higher:
            return False
        pipeline.eval(HIGHER_WAITING, len(higher), *higher)
        return True


def run_as_script(pipeline: Any, writes: Pipeline) -> None:
    """Queue the commands collected on `writes` on `pipeline` as one _RUN_WRITES script.

    Atomic like the MULTI/EXEC they would make, but one command for redis-py to pack and
    one reply to parse instead of twenty: redis-py's per-command work (argument
    encoding, reply callbacks) was most of a worker's Redis time.
    """
    flat: list[Any] = []
    for args, _options in writes.command_stack:
        flat.append(len(args))
        flat.extend(args)
    pipeline.eval(_RUN_WRITES, 0, *flat)


# ARGV: for each command, its length n, then its n words. Like EXEC, every command runs
# even if one fails, and the first failure is the reply (redis-py raises it).
_RUN_WRITES = """
local i, failed = 1, nil
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local reply = redis.pcall(unpack(ARGV, i + 1, i + n))
  if type(reply) == 'table' and reply.err and not failed then failed = reply end
  i = i + n + 1
end
if failed then return failed end
return 1
"""
