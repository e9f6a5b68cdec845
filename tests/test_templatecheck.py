"""`flask mail check-templates`: each kind of broken template fails it, naming file and line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from flask import Flask

from app.mail import render_email

GOOD_SAMPLE = json.dumps({"subject": "Hi", "to": "ann@example.com", "context": {"name": "Ann"}})


def check(
    app: Flask, add: Callable[[Flask, dict[str, str]], None], files: dict[str, str]
) -> Result:
    """Run the command on the project's templates plus `files` (paths under templates/)."""
    add(app, files)
    return app.test_cli_runner().invoke(args=["mail", "check-templates"])


def test_the_projects_own_templates_pass(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["mail", "check-templates"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "3 templates render with their samples\n"  # digest, invoice, test


def test_a_good_template_of_ones_own_passes(app: Flask, extra_templates: Any) -> None:
    result = check(
        app,
        extra_templates,
        {
            "email/hello.txt": (
                "{% extends 'email/_layout.txt' %}{% block content %}Hi {{ name }}{% endblock %}"
            ),
            "email/hello.html": "<p>Hi {{ name }}</p>",
            "email/hello.preview.json": GOOD_SAMPLE,
        },
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "4 templates render with their samples\n"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {
                "email/broken.txt": "Hi\n\n{% if name %}\nno endif\n",
                "email/broken.preview.json": GOOD_SAMPLE,
            },
            ["email/broken.txt:3: syntax error: ", "Unexpected end of template", "'if'"],
            id="syntax error in the text part",
        ),
        pytest.param(
            {
                "email/broken.txt": "Hi {{ name }}\n",
                "email/broken.html": "<p>\n{{ name | nosuchfilter }}\n</p>",
                "email/broken.preview.json": GOOD_SAMPLE,
            },
            ["email/broken.html:2: syntax error: ", "nosuchfilter"],
            id="syntax error in the html part",
        ),
        pytest.param(
            {"email/broken.html": "<p>Hi {{ name }}</p>", "email/broken.preview.json": GOOD_SAMPLE},
            ["email/broken.txt: missing", "a mail needs its text part"],
            id="missing text part",
        ),
        pytest.param(
            {"email/broken.txt": "Hi {{ name }}\n", "email/broken.preview.json": '{"context": {'},
            ["email/broken.preview.json: ", "is not valid JSON"],
            id="sample not JSON",
        ),
        pytest.param(
            {"email/broken.txt": "Hi {{ name }}\n", "email/broken.preview.json": '{"context": []}'},
            ["email/broken.preview.json: ", "context must be a JSON object"],
            id="sample context not an object",
        ),
        pytest.param(
            {
                "email/broken.txt": "Hi {{ name }}\n",
                "email/broken.preview.json": json.dumps({"to": "not an address"}),
            },
            ["email/broken.preview.json: ", "send_email would refuse this sample: to: "],
            id="sample address refused",
        ),
        pytest.param(
            {
                "email/broken.txt": "Hello,\n{{ nmae }}\n",
                "email/broken.preview.json": GOOD_SAMPLE,
            },
            ["email/broken.txt:2: undefined variable: 'nmae' is undefined"],
            id="undefined variable in the text part",
        ),
        pytest.param(
            {
                "email/broken.txt": "Hi {{ name }}\n",
                "email/broken.html": "<p>Hi {{ name }}</p>\n<p>{{ user.plan }}</p>\n",
                "email/broken.preview.json": GOOD_SAMPLE,
            },
            ["email/broken.html:2: undefined variable: 'user' is undefined"],
            id="undefined variable in the html part",
        ),
        pytest.param(
            {"email/broken.txt": "Hi {{ name }}\n"},
            ["email/broken.txt:1: undefined variable: 'name' is undefined"],
            id="no sample, so an empty context",
        ),
    ],
)
def test_each_problem_fails_the_check_and_names_template_and_line(
    app: Flask, tmp_path: Path, extra_templates: Any, files: dict[str, str], expected: list[str]
) -> None:
    result = check(app, extra_templates, files)
    assert result.exit_code == 1
    assert result.stdout == ""
    problem, summary = result.stderr.splitlines()
    # Render errors name the file Jinja read; the others the path under templates/.
    folder = "templates" if expected[0].endswith((".json: ", ": missing")) else str(tmp_path)
    assert problem.startswith(f"{folder}/{expected[0]}")
    assert all(part in problem for part in expected)
    assert summary == "1 of 4 templates have problems"


def test_undefined_variables_are_errors_only_while_checking(
    app: Flask, extra_templates: Any
) -> None:
    check(app, extra_templates, {"email/loose.txt": "Hi {{ name }}!\n"})
    with app.app_context():
        assert render_email("loose").text == "Hi !"  # the app's own rendering is unchanged
