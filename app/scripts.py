"""The worker's Lua scripts: each moves a job between RQ's lists in one atomic step.

Kept apart from the worker classes that send them (app/leanworker.py,
app/inflight.py, app/worker.py's maintenance), so that what runs inside Redis
reads in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.client import Pipeline
from rq.job import Job
from rq.queue import Queue

# KEYS: intermediate list, queue, the id's first-seen mark. ARGV: a job id. Moves it
# back to the head of the queue only if it is still in the list (whoever moves it first).
PUT_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: pairs of (queue, its intermediate list), in the worker's order. ARGV: how many,
# the job hash's key prefix. Pops up to that many ids, from the first queue until it
# is empty, then the next: a free slot always goes to the first queue that has work.
# Returns [index, id, job hash as a flat list, ...]; an id whose hash is gone is dropped
# from the intermediate list (as AppQueue does), not returned.
CLAIM = """
local out, left = {}, tonumber(ARGV[1])
for k = 1, #KEYS, 2 do
  while left > 0 do
    local id = redis.call('LMOVE', KEYS[k], KEYS[k + 1], 'LEFT', 'RIGHT')
    if not id then break end
    local data = redis.call('HGETALL', ARGV[2] .. id)
    if #data == 0 then
      redis.call('LREM', KEYS[k + 1], 1, id)
    else
      out[#out + 1] = (k + 1) / 2
      out[#out + 1] = id
      out[#out + 1] = data
      left = left - 1
    end
  end
  if left == 0 then break end
end
return out
"""

# KEYS: queues, highest lane first. The 1-based index of the first that has a job
# waiting, 0 if none: sent in the round trip that starts jobs, so a worker learns that
# a higher lane got work before it starts the lower-lane jobs it claimed ahead.
HIGHER_WAITING = """
for i = 1, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return i end
end
return 0
"""


def claim(
    connection: Any, queues: Sequence[Queue], count: int, job_class: type[Job], serializer: Any
) -> list[tuple[Job, Queue]]:
    """Up to `count` jobs from the first of `queues` that has work (then the next), each
    moved to its queue's intermediate list (where maintenance finds it if the worker
    dies before starting it), with its hash: one round trip (CLAIM). The one claim of
    both worker modes and of the idle worker's pop (AppQueue.dequeue_any), so every
    pop across lanes is an LMOVE, never RQ's BLPOP."""
    keys: list[str] = []
    for queue in queues:
        keys += [queue.key, queue.intermediate_queue_key]
    prefix = job_class.redis_job_namespace_prefix
    raw: Any = connection.eval(CLAIM, len(keys), *keys, str(count), prefix)
    claimed: list[tuple[Job, Queue]] = []
    for start in range(0, len(raw or ()), 3):
        index, job_id, flat = raw[start : start + 3]
        # What Job.fetch_many builds from the hash it reads.
        job = job_class(job_id.decode(), connection, serializer=serializer)
        job.restore(dict(zip(flat[0::2], flat[1::2], strict=True)))
        claimed.append((job, queues[int(index) - 1]))
    return claimed


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

# A fragment of app.status's attempt claim (KEYS[1]: the mail record, its to and, in
# its extras, cc and bcc; KEYS[3]: the
# suppression list): sets `held` to the record's suppressed recipients, as given and with
# their entries. Each address is keyed as app.suppression.normalize keys it: the bare
# address (inside the last <>), trimmed, lowercased (addresses are ASCII: no SMTPUTF8).
HELD_RECIPIENTS = """
local held = {}
local lists = {}
local ok, to = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'to') or '[]')
if ok then lists[1] = to end
local extras = redis.call('HGET', KEYS[1], 'extras')
if extras and extras ~= '' then
  local fine, shape = pcall(cjson.decode, extras)
  if fine and type(shape) == 'table' then
    lists[2] = shape['cc']
    lists[3] = shape['bcc']
  end
end
for i = 1, 3 do
  local list = lists[i]
  if type(list) == 'table' then
    for _, given in ipairs(list) do
      if type(given) == 'string' then
        local bare = string.match(given, '<([^<>]*)>%s*$') or given
        local entry = redis.call('HGET', KEYS[3], string.lower(string.match(bare, '^%s*(.-)%s*$')))
        if entry then
          held[#held + 1] = given
          held[#held + 1] = entry
        end
      end
    end
  end
end
"""
