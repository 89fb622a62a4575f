import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import click
from click.testing import CliRunner

import pytest

from llm_features.config import dataclass_options, validate_config


@dataclass
class DemoConfig:
    name: str = field(default="x", metadata={"help": "a name"})
    size: int = 3
    mode: Literal["a", "b"] = "a"
    out: Path | None = None
    flag: bool = False
    tags: tuple[str, ...] = ()


@click.command()
@dataclass_options(DemoConfig)
def cmd(cfg: DemoConfig) -> None:
    click.echo(json.dumps({"name": cfg.name, "size": cfg.size, "mode": cfg.mode, "out": str(cfg.out),
                           "flag": cfg.flag, "tags": list(cfg.tags)}))


def test_defaults_options_and_config_file(tmp_path):
    r = CliRunner().invoke(cmd, [])
    assert json.loads(r.output) == {"name": "x", "size": 3, "mode": "a", "out": "None", "flag": False, "tags": []}
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"size": 7, "mode": "b", "tags": ["p", "q"]}))
    r = CliRunner().invoke(cmd, ["--config", str(conf), "--size", "9", "--flag"])
    got = json.loads(r.output)
    assert got["size"] == 9 and got["mode"] == "b" and got["flag"] is True and got["tags"] == ["p", "q"]


def test_bad_choice_and_unknown_config_key(tmp_path):
    r = CliRunner().invoke(cmd, ["--mode", "z"])
    assert r.exit_code != 0 and "mode" in r.output
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"sizes": 1}))
    r = CliRunner().invoke(cmd, ["--config", str(conf)])
    assert r.exit_code != 0 and "unknown option(s) sizes" in r.output


@dataclass
class BoundedConfig:
    size: int = field(default=3, metadata={"help": "a size", "min": 1})
    rate: float = field(default=0.5, metadata={"help": "a rate", "min_open": 0.0, "max": 1.0})
    mode: Literal["a", "b"] = "a"
    out: Path | None = None


@click.command()
@dataclass_options(BoundedConfig)
def bounded(cfg: BoundedConfig) -> None:
    click.echo(f"{cfg.size} {cfg.rate} {cfg.mode} {cfg.out}")


def test_config_file_values_checked_like_options(tmp_path):
    conf = tmp_path / "c.json"
    for body, expect in [({"mode": "max"}, "--mode: 'max' is not one of 'a', 'b'"),
                         ({"size": 0}, "--size: 0 must be at least 1"),
                         ({"size": "7"}, "--size: expected an integer"),
                         ({"rate": 0}, "--rate: 0.0 must be greater than 0.0"),
                         ({"rate": 2}, "--rate: 2.0 must be at most 1.0"),
                         ({"out": 5}, "--out: expected a path")]:
        conf.write_text(json.dumps(body))
        r = CliRunner().invoke(bounded, ["--config", str(conf)])
        assert r.exit_code == 1 and f"{conf}, {expect}" in r.output, (body, r.output)
    r = CliRunner().invoke(bounded, ["--size", "0"])
    assert r.exit_code == 2 and "--size" in r.output  # click's own range check on the command line
    conf.write_text(json.dumps({"size": 0}))
    r = CliRunner().invoke(bounded, ["--config", str(conf), "--size", "4"])
    assert r.exit_code == 0 and r.output.split()[0] == "4"  # the command line wins, and is valid
    conf.write_text("{not json")
    r = CliRunner().invoke(bounded, ["--config", str(conf)])
    assert r.exit_code == 1 and "not valid JSON" in r.output


def test_validate_config_for_the_python_api():
    validate_config(BoundedConfig())
    with pytest.raises(ValueError, match="--mode: 'max' is not one of"):
        validate_config(BoundedConfig(mode="max"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--size: -1 must be at least 1"):
        validate_config(BoundedConfig(size=-1))


def test_llmfeat_usage_errors_exit_1():
    from llm_features.cli import main

    r = CliRunner().invoke(main, ["encode", "--no-such-option"])
    assert r.exit_code == 1 and "No such option" in r.output


@dataclass
class NeedsIdConfig:
    user_id: int
    size: int = 3


@click.command()
@dataclass_options(NeedsIdConfig)
def needs_id(cfg: NeedsIdConfig) -> None:
    click.echo(json.dumps({"user_id": cfg.user_id, "size": cfg.size}))


def test_a_field_without_default_is_required_from_the_command_line_or_the_file(tmp_path):
    r = CliRunner().invoke(needs_id, ["--size", "4"])
    assert r.exit_code == 1 and "--user-id: is required" in r.output and "--config" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # a clean error, no traceback
    conf = tmp_path / "c.yaml"
    conf.write_text("user_id: 42\n")
    assert json.loads(CliRunner().invoke(needs_id, ["--config", str(conf)]).output) == {"user_id": 42, "size": 3}
    assert json.loads(CliRunner().invoke(needs_id, ["--user-id", "7"]).output) == {"user_id": 7, "size": 3}


@dataclass
class ThreadsConfig:
    threads: int | None = field(default=None, metadata={"min": 1, "aliases": ("--num-threads",)})


@click.command()
@dataclass_options(ThreadsConfig)
def threads_cmd(cfg: ThreadsConfig) -> None:
    click.echo(json.dumps({"threads": cfg.threads}))


def test_an_option_answers_to_its_aliases():
    assert json.loads(CliRunner().invoke(threads_cmd, ["--threads", "3"]).output) == {"threads": 3}
    assert json.loads(CliRunner().invoke(threads_cmd, ["--num-threads", "4"]).output) == {"threads": 4}
    r = CliRunner().invoke(threads_cmd, ["--num-threads", "0"])
    assert r.exit_code == 2 and "0" in r.output  # the alias is checked like the option
