import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import click
from click.testing import CliRunner

from llm_features.config import dataclass_options


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
