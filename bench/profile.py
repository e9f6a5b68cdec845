"""Where a worker's CPU goes: py-spy's collapsed stacks, summed by what each sample was doing.

`python -m bench --profile` runs every mailqueue worker under
`py-spy record --gil --format raw` (only samples of a thread holding the GIL:
Python running, not waiting on a socket; the kernel's share of a syscall is
not seen); this module reads those files and charges each sample to the first
frame, walking from the leaf towards the root, that belongs to a known part
of the pipeline. A sample in socket.sendall called from smtplib counts as
SMTP, one in redis-py's connection code as Redis, and so on.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# (category, substrings of a frame "function (path:line)"); py-spy writes paths relative
# to sys.path, so "(redis/client.py:...)". Checked per frame, leaf first; first match wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("start-up (imports, app)", ("_find_and_load", "create_app (app/__init__")),
    ("RQ's pub/sub listener thread", ("PubSubWorkerThread",)),
    ("SMTP client (smtplib)", ("(smtplib.py",)),
    ("Redis client (redis-py, hiredis)", ("(redis/",)),
    ("templates (Jinja)", ("(jinja2/", "(markupsafe/", ".html:", ".txt:")),
    ("MIME build (app/mail/mime.py)", ("_compose (", "_encode (", "_header (", "_address (")),
    ("CSS inlining (css_inline)", ("inline_css (", "_inliner (")),
    ("email package", ("(email/",)),
    ("mail record (app/status.py)", ("(app/status.py",)),
    ("digests (app/digests/, jobs/digest.py)", ("(app/digests/", "(jobs/digest.py")),
    ("delivery (jobs/mail.py, app/smtp.py)", ("(jobs/mail.py", "(app/smtp.py")),
    ("message (app/mail/, flask_mail)", ("(app/mail/", "(flask_mail/")),
    (
        "RQ worker and jobs (rq, app/leanworker.py, app/worker.py)",
        ("(rq/", "(app/leanworker.py", "(app/worker.py"),
    ),
    ("Flask (app context, url_for)", ("(flask/", "(werkzeug/")),
    ("logging", ("(logging/",)),
)
OTHER = "other"
# Not per-mail work: start-up happens before the clock starts, and RQ's pub/sub thread
# only polls its socket (an idle worker uses ~1 ms of CPU a second).
EXCLUDED = frozenset({CATEGORIES[0][0], CATEGORIES[1][0]})


def categorize(stack: str) -> str:
    frames = stack.split(";")
    for name, needles in CATEGORIES[:2]:  # whole-stack categories: where it started
        if any(needle in frame for frame in frames for needle in needles):
            return name
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return OTHER


def summarize(paths: list[Path]) -> list[tuple[str, float]]:
    """(category, share of samples) over every collapsed-stack file, largest first."""
    counts: Counter[str] = Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, number = line.rpartition(" ")
            if stack and number.isdigit():
                counts[categorize(stack)] += int(number)
    for name in EXCLUDED:
        counts.pop(name, None)
    total = sum(counts.values())
    if not total:
        return []
    return [(name, count / total) for name, count in counts.most_common()]


def render(title: str, shares: list[tuple[str, float]], cpu_ms: float) -> str:
    lines = [
        f"{title}: share of the workers' Python samples (py-spy --gil), and that share of "
        f"the {cpu_ms:.2f} ms of worker CPU per mail:",
        "",
    ]
    lines += ["| where | share | ms per mail |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {share:.0%} | {share * cpu_ms:.3f} |" for name, share in shares]
    return "\n".join(lines)
