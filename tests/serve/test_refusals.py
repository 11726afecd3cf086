"""`imgrec serve` refuses to start in one line on stderr, naming the setting or file, with exit
status 2 (a flag or setting is wrong) or 1 (the service cannot start with them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from helpers.daemons import free_port, venv_binary

KEY = "0123456789abcdef-test-key"


def refusal(tmp_path: Path, env: Mapping[str, str], args: Sequence[str] = (),
            timeout_s: float = 120) -> tuple[int, list[str]]:
    """Run `imgrec serve` until it exits; (exit status, its stderr lines)."""
    full_env = {**os.environ, "IMGREC_DEVICE": "cpu", "IMGREC_EMBED_STORE": "memory",
                "IMGREC_HOST": "127.0.0.1", "IMGREC_PORT": str(free_port()),
                "IMGREC_GRPC_PORT": "0", **env}
    done = subprocess.run([venv_binary("imgrec"), "serve", *args], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    return done.returncode, done.stderr.splitlines()


def assert_one_line(lines: list[str], *names: str) -> None:
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith("imgrec serve: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture()
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.mark.parametrize(("env", "args", "names"), [
    pytest.param({"IMGREC_MAX_BATCH_SIZE": "abc"}, [], ["IMGREC_MAX_BATCH_SIZE='abc'",
                                                        "valid integer"], id="not-a-number"),
    pytest.param({"IMGREC_DTYPE": "float16"}, [], ["IMGREC_DTYPE='float16'", "bfloat16"],
                 id="not-a-choice"),
    pytest.param({"IMGREC_MAX_CONNECTIONS": "-1"}, [], ["IMGREC_MAX_CONNECTIONS='-1'"],
                 id="out-of-range"),
    pytest.param({"IMGREC_MAX_FILES": "64", "IMGREC_MAX_QUEUE": "8"}, [],
                 ["IMGREC_MAX_FILES", "IMGREC_MAX_QUEUE"], id="across-settings"),
    pytest.param({}, ["--port", "eighty"], ["--port", "'eighty'"], id="bad-flag"),
    pytest.param({}, ["--no-such-flag"], ["--no-such-flag"], id="unknown-flag"),
    pytest.param({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
                 [], ["OTEL_EXPORTER_OTLP_PROTOCOL='http/json'", "grpc"], id="otel-protocol"),
])
def test_a_setting_that_does_not_parse_is_one_line_and_status_2(
        tmp_path: Path, env: dict[str, str], args: list[str], names: list[str]) -> None:
    status, lines = refusal(tmp_path, env, args)
    assert status == 2
    assert_one_line(lines, *names)


def test_two_bad_settings_are_named_on_the_same_line(tmp_path: Path) -> None:
    status, lines = refusal(tmp_path, {"IMGREC_MAX_BATCH_SIZE": "abc", "IMGREC_PORT": "-5"})
    assert status == 2
    assert_one_line(lines, "IMGREC_MAX_BATCH_SIZE='abc'", "IMGREC_PORT='-5'")


@pytest.mark.parametrize(("content", "names"), [
    pytest.param(f"{KEY}\nshort\n", ["line 2", "16 characters"], id="malformed-line"),
    pytest.param("# only a comment\n", ["no keys"], id="empty"),
    pytest.param(None, ["cannot read it"], id="missing"),
])
def test_an_api_keys_file_that_does_not_load_is_one_line_and_status_2(
        tmp_path: Path, keys_file: Path, content: str | None, names: list[str],
        tiny_model_dir: Path) -> None:
    if content is not None:
        keys_file.write_text(content)
    status, lines = refusal(tmp_path, {"IMGREC_API_KEYS_FILE": str(keys_file),
                                       "IMGREC_MODEL_DIR": str(tiny_model_dir)})
    assert status == 2
    assert_one_line(lines, f"IMGREC_API_KEYS_FILE='{keys_file}'", *names)
    assert KEY not in lines[0]  # a key is never echoed


def broken_model_dir(kind: str, tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the tiny model directory broken one way; (its path, what the line says)."""
    root = tmp_path / "model"
    if kind == "missing":
        return root, "does not exist"
    shutil.copytree(tiny_model_dir, root)
    if kind == "no-card":
        (root / "card.json").unlink()
        return root, "no card.json"
    if kind == "bad-card":
        (root / "card.json").write_text("{not json")
        return root, "card.json is not valid JSON"
    if kind == "no-weights":
        (root / "weights.safetensors").unlink()
        return root, "weights file is missing"
    weights = root / "weights.safetensors"  # "sha256": one byte changed
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return root, "sha256 mismatch"


@pytest.mark.parametrize("kind", ["missing", "no-card", "bad-card", "no-weights", "sha256"])
def test_a_model_directory_that_cannot_be_served_is_one_line_and_status_1(
        tmp_path: Path, tiny_model_dir: Path, kind: str) -> None:
    root, problem = broken_model_dir(kind, tiny_model_dir, tmp_path)
    status, lines = refusal(tmp_path, {"IMGREC_MODEL_DIR": str(root)})
    assert status == 1
    assert_one_line(lines, f"IMGREC_MODEL_DIR='{root}'", problem)


def test_the_model_directory_from_the_flag_is_named_by_the_flag(tmp_path: Path) -> None:
    status, lines = refusal(tmp_path, {}, ["--model-dir", str(tmp_path)])
    assert status == 1
    assert_one_line(lines, f"--model-dir='{tmp_path}'", "no card.json")


def test_a_failure_inside_the_start_up_is_one_line_and_status_1(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The engine fails to load inside the lifespan (the card records no int8 graph): uvicorn's
    traceback and "Application startup failed" become one line (at warning level nothing else
    is logged before it), and the traceback is still there at debug level."""
    env = {"IMGREC_MODEL_DIR": str(tiny_model_dir), "IMGREC_PRECISION": "int8"}
    status, lines = refusal(tmp_path, {**env, "IMGREC_LOG_LEVEL": "warning"})
    assert status == 1
    assert_one_line(lines, "start-up failed", "IMGREC_PRECISION=int8", "no int8 graph",
                    str(tiny_model_dir))
    status, lines = refusal(tmp_path, {**env, "IMGREC_LOG_LEVEL": "debug"})
    assert status == 1
    assert lines[-1].startswith("imgrec serve: start-up failed:")
    assert any(line.startswith("Traceback (most recent call last)") for line in lines)
    assert not any("Application startup failed" in line and "DEBUG" not in line
                   for line in lines)
