"""`flask mail check-templates`: every mail template rendered with its sample, for CI.

Each template under `templates/email/` (not the `_` partials) is rendered through
`render_email`, both parts, with its `<name>.preview.json` sample (the one /dev/mail
uses), and with undefined variables as errors: a template that renders here renders
for a caller who passes what the sample has. A problem names the template and, when
Jinja knows it, the line.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from flask import current_app
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError

from app import PROJECT_ROOT
from app.devpreviews import PREVIEW_SUFFIX, email_templates, load_sample
from app.errors import InvalidMailError
from app.mail import render_email


@dataclass(frozen=True)
class Problem:
    """What is wrong with one template: where (`templates/email/x.html:3`) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def check_templates() -> tuple[list[str], list[Problem]]:
    """(every template name checked, the problems found); needs an app context."""
    names = email_templates()
    problems: list[Problem] = []
    with _strict_undefined():
        for name in names:
            problems.extend(check_template(name))
    return names, problems


def check_template(name: str) -> list[Problem]:
    """The problems of `email/<name>`: a missing text part, a broken or refused sample, a
    syntax error or an undefined variable in either part (or a template they use)."""
    txt = f"templates/email/{name}.txt"
    if not _exists(f"email/{name}.txt"):
        return [Problem(txt, "missing: a mail needs its text part")]
    sample = load_sample(name)
    sample_path = f"templates/email/{name}{PREVIEW_SUFFIX}"
    if not sample.usable:
        # The note (written for /dev/mail) starts with the sample's path: said once here.
        note = sample.note.removeprefix(sample_path).removeprefix(":").strip()
        return [Problem(sample_path, note)]
    try:
        # As send_email validates (which loads, so compiles, the text part), then renders.
        record = sample.record(name)
        render_email(name, record.locale, **sample.context)
    except InvalidMailError as err:
        return [Problem(sample_path, f"send_email would refuse this sample: {err}")]
    except TemplateSyntaxError as err:
        return [Problem(_where(err.filename or err.name, err.lineno), f"syntax error: {err}")]
    except UndefinedError as err:
        return [Problem(_failing_line(err, txt), f"undefined variable: {err}")]
    except Exception as err:  # any template bug is what this check is for
        return [Problem(_failing_line(err, txt), f"{type(err).__name__}: {err}")]
    return []


@contextmanager
def _strict_undefined() -> Iterator[None]:
    """Undefined variables raise while inside (the app's environment is shared, so the
    setting is put back after)."""
    env = current_app.jinja_env
    before = env.undefined
    env.undefined = StrictUndefined
    try:
        yield
    finally:
        env.undefined = before


def _exists(path: str) -> bool:
    return path in current_app.jinja_env.list_templates()


def _failing_line(err: BaseException, fallback: str) -> str:
    """The template file and line a render error came from: Jinja rewrites the traceback
    so that its frames are the templates' own lines."""
    folders = [Path(folder).resolve() for folder in _template_folders()]
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = Path(frame.filename).resolve()
        if any(path.is_relative_to(folder) for folder in folders):
            return _where(frame.filename, frame.lineno)
    return fallback


def _template_folders() -> list[str]:
    loader = current_app.jinja_env.loader
    folders: list[str] = []
    stack = [loader]
    while stack:  # the app's loader, and any loaders it chooses between
        item = stack.pop()
        folders.extend(getattr(item, "searchpath", []))
        stack.extend(getattr(item, "loaders", []))
    if current_app.template_folder:
        folders.append(str(Path(current_app.root_path) / current_app.template_folder))
    return folders


def _where(filename: str | None, lineno: int | None) -> str:
    """`templates/email/x.html:3`: relative to the project when inside it."""
    path = filename or "?"
    with suppress(ValueError):
        path = str(Path(path).resolve().relative_to(PROJECT_ROOT))
    return f"{path}:{lineno}" if lineno else path
