"""Start-up refusals of `imgrec serve`: one line on stderr naming the setting or file, and an exit
status, instead of a traceback with the message at its bottom.

Exit status 2: the command line or a setting is wrong (a flag, an IMGREC_* value that does not
parse or is out of range, an API-keys file that does not load), as for any usage error. Exit
status 1: the settings are fine but the service cannot start with them (a model directory that
cannot be served, or a failure during start-up itself, e.g. an engine that does not load).
The checks here run before uvicorn starts, so a refusal costs no model load.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.api.auth import KeyFileError, KeyRing
from app.model.directory import ModelDirError, open_model_dir
from app.serving.tracing import TracingError, check_env
from app.settings import Settings

USAGE_ERROR = 2  # the command line or a setting is wrong
CANNOT_SERVE = 1  # the settings parse, but the service cannot start with them


class Refusal(Exception):
    """Why `imgrec serve` will not start: one line, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a Refusal (one line) instead of usage text plus a line."""

    def error(self, message: str) -> NoReturn:
        raise Refusal(f"{message} (imgrec serve --help)", USAGE_ERROR)


def setting_name(field: str, flags: Mapping[str, str]) -> str:
    """How the operator spelled the setting: its --flag if one set it, else IMGREC_<FIELD>."""
    return flags.get(field) or f"IMGREC_{field.upper()}"


def read_settings(overrides: Mapping[str, object], flags: Mapping[str, str]) -> Settings:
    """Settings from the environment and the flags in ``overrides``; ``flags`` maps the fields
    set by a flag to the flag's name, for the message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        raise Refusal(describe_validation(e, flags), USAGE_ERROR) from None
    except SettingsError as e:  # a value pydantic-settings could not even decode
        raise Refusal(str(e), USAGE_ERROR) from None


def describe_validation(error: ValidationError, flags: Mapping[str, str]) -> str:
    """``IMGREC_MAX_BATCH_SIZE='abc': Input should be a valid integer``, one per bad value,
    joined on one line."""
    problems = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        if e["loc"]:
            field = str(e["loc"][0])
            problems.append(f"{setting_name(field, flags)}={e['input']!r}: {message}")
        else:  # a rule across settings: name them as the operator sets them
            problems.append(_env_names(message, flags))
    return "; ".join(problems)


def _env_names(message: str, flags: Mapping[str, str]) -> str:
    fields = sorted(Settings.model_fields, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, fields)) + r")\b")
    return pattern.sub(lambda m: setting_name(m.group(1), flags), message)


def check_api_keys(path: Path | None) -> None:
    """The keys file loads (the app loads it again; this only makes its refusal one line)."""
    if path is None:
        return
    try:
        KeyRing(path)
    except KeyFileError as e:
        raise Refusal(f"IMGREC_API_KEYS_FILE={str(path)!r}: {e}", USAGE_ERROR) from None


def check_tracing(env: Mapping[str, str]) -> None:
    """The OTEL_* variables ask for tracing this process can do (the SDK installed, a known
    exporter and protocol)."""
    try:
        check_env(env)
    except TracingError as e:
        raise Refusal(str(e), USAGE_ERROR) from None


def check_model_dir(path: Path, flags: Mapping[str, str]) -> None:
    """The directory has a valid card and the card's weights (torch-free: JSON and sha256)."""
    try:
        open_model_dir(path)
    except (ModelDirError, OSError, ValueError) as e:  # OSError: unreadable; ValueError: UTF-8
        raise Refusal(f"{setting_name('model_dir', flags)}={str(path)!r}: {e}",
                      CANNOT_SERVE) from None


def describe_failure(error: BaseException) -> str:
    """An exception as one line: our own errors' messages name the file and what to do, so
    they stand alone; anything else keeps its type."""
    text = " ".join(str(error).split())  # one line, whatever the message holds
    if isinstance(error, ModelDirError | KeyFileError | TracingError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
