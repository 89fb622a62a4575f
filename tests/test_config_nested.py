"""Nested configs (litgpt style): a config dataclass as a field of another is declared once, its
fields are options under their own flat names, and a --config file gives them in a section or at
the top level."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from llm_features.config import (
    build_config,
    config_dict,
    config_from_options,
    dataclass_options,
    leaf_fields,
    validate_config,
)


@dataclass
class PartConfig:
    model: Path | None = field(default=None, metadata={"help": "a model"})
    split: int = field(default=3, metadata={"help": "a split", "min": 0})
    mode: Literal["a", "b"] = "a"
    remote: bool = field(default=False, metadata={"help": "cli only", "cli_only": True})
    threads: int | None = field(default=None, metadata={"min": 1, "aliases": ("--num-threads",)})


@dataclass
class JobConfig:
    part: PartConfig = field(default_factory=PartConfig)
    epochs: int = field(default=2, metadata={"min": 1})
    tags: tuple[str, ...] = ()


@dataclass
class RequiredPart:
    user_id: int


@dataclass
class NeedsPartConfig:
    part: RequiredPart = field(default_factory=lambda: RequiredPart(user_id=0))
    size: int = 1


@click.command()
@dataclass_options(JobConfig)
def job(cfg: JobConfig) -> None:
    click.echo(json.dumps(config_dict(cfg)))


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(job, [str(a) for a in args])
    return r.exit_code, r.output


def test_nested_fields_are_flat_options():
    names = [f.name for f, _ in leaf_fields(JobConfig)]
    assert names == ["model", "split", "mode", "remote", "threads", "epochs", "tags"]
    code, out = run("--split", 1, "--mode", "b", "--num-threads", 2, "--epochs", 5, "--remote")
    assert code == 0, out
    assert json.loads(out) == {"part": {"model": None, "split": 1, "mode": "b", "remote": True, "threads": 2},
                               "epochs": 5, "tags": []}
    assert "--part" not in CliRunner().invoke(job, ["--help"]).output


@pytest.mark.parametrize("body", [{"part": {"split": 0, "mode": "b"}, "epochs": 4},
                                  {"split": 0, "mode": "b", "epochs": 4},
                                  {"part": {"split": 0}, "mode": "b", "epochs": 4}])
def test_a_file_gives_nested_fields_in_a_section_or_flat(tmp_path, body):
    conf = tmp_path / "c.yaml"
    conf.write_text(json.dumps(body))  # JSON is YAML
    code, out = run("--config", conf)
    assert code == 0, out
    got = json.loads(out)
    assert (got["part"]["split"], got["part"]["mode"], got["epochs"]) == (0, "b", 4)
    code, out = run("--config", conf, "--split", 2)  # the command line wins over the section
    assert json.loads(out)["part"]["split"] == 2 and json.loads(out)["part"]["mode"] == "b"


@pytest.mark.parametrize("body, expect", [
    ({"part": {"split": -1}}, "--split: -1 must be at least 0"),
    ({"part": {"mode": "z"}}, "--mode: 'z' is not one of 'a', 'b'"),
    ({"part": {"remote": True}}, "--remote: is taken from the command line only"),
    ({"remote": True}, "--remote: is taken from the command line only"),
    ({"part": {"nope": 1}}, "unknown option(s) nope in section 'part' (PartConfig)"),
    ({"part": {"split": 1}, "split": 2}, "split given both in section 'part' and at the top level"),
    ({"part": 5}, "section 'part' must be a mapping"),
    ({"epochs": 0}, "--epochs: 0 must be at least 1"),
])
def test_bad_values_in_a_section_name_the_file_and_the_option(tmp_path, body, expect):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps(body))
    code, out = run("--config", conf)
    assert code == 1 and str(conf) in out and expect in out, (body, out)
    assert "Traceback" not in out


def test_required_fields_of_a_nested_config():
    @click.command()
    @dataclass_options(NeedsPartConfig)
    def cmd(cfg: NeedsPartConfig) -> None:
        click.echo(cfg.part.user_id)

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 1 and "--user-id: is required" in r.output
    r = CliRunner().invoke(cmd, ["--user-id", "7"])
    assert r.exit_code == 0 and r.output.strip() == "7"


def test_build_config_and_config_dict_round_trip():
    cfg = JobConfig(part=PartConfig(model=Path("m"), split=1, threads=2), epochs=3, tags=("x",))
    nested, flat = config_dict(cfg), config_dict(cfg, nested=False)
    assert nested["part"]["model"] == "m" and flat["model"] == "m" and "part" not in flat
    assert build_config(JobConfig, nested) == cfg == build_config(JobConfig, flat)
    assert config_from_options(JobConfig, model=Path("m"), split=1, threads=2, epochs=3, tags=("x",)) == cfg
    with pytest.raises(TypeError, match="no option"):
        config_from_options(JobConfig, nope=1)


def test_validate_config_checks_nested_fields():
    validate_config(JobConfig())
    with pytest.raises(ValueError, match="--split: -1 must be at least 0"):
        validate_config(JobConfig(part=PartConfig(split=-1)))


def test_option_names_must_not_clash():
    @dataclass
    class Clash:
        part: PartConfig = field(default_factory=PartConfig)
        split: int = 1

    with pytest.raises(TypeError, match="declared twice"):
        leaf_fields(Clash)


# ------------------------------------------------------------------------------------------------
# the real commands: the backbone and the ranker's network are nested, their options unchanged


def test_the_commands_keep_their_flat_options(tmp_path):
    from llm_features.backbone import BackboneConfig
    from llm_features.config import RuntimeArgs
    from llm_features.embed_users import EmbedUsersConfig
    from llm_features.encode import EncodeConfig
    from llm_features.finetune import FinetuneConfig
    from ranker.config import ModelConfig, TrainConfig

    nesting = ((FinetuneConfig, BackboneConfig), (EncodeConfig, BackboneConfig), (TrainConfig, ModelConfig))
    for cls, inner in nesting:
        names, first = [f.name for f, _ in leaf_fields(cls)], list(inner.__dataclass_fields__)
        assert names[:len(first)] == first  # the nested options first, as when the config inherited them
    ft = build_config(FinetuneConfig, {"backbone": {"split_layer": 2, "pooling": "last"}, "epochs": 1,
                                       "out": str(tmp_path)})
    assert (ft.backbone.split_layer, ft.backbone.pooling, ft.epochs) == (2, "last", 1)
    assert build_config(FinetuneConfig, {"split_layer": 2, "pooling": "last", "epochs": 1,
                                         "out": str(tmp_path)}) == ft
    tr = build_config(TrainConfig, {"model": {"llm_features": False}, "epochs": 1, "out": str(tmp_path)})
    assert tr.model.llm_features is False and tr.model == ModelConfig(llm_features=False)
    with pytest.raises(ValueError, match="--trust-remote-code: is taken from the command line only"):
        build_config(EncodeConfig, {"backbone": {"trust_remote_code": True}}, where="x.yaml")
    # --device and --num-threads: one RuntimeArgs in each model stage
    enc = build_config(EncodeConfig, {"runtime": {"device": "cpu"}, "num_threads": 2})
    assert enc.runtime == RuntimeArgs(device="cpu", num_threads=2)
    for cls in (EncodeConfig, FinetuneConfig, EmbedUsersConfig):
        names = [f.name for f, _ in leaf_fields(cls)]
        assert names[names.index("device") + 1] == "num_threads"


def test_the_finetune_command_reads_a_backbone_section(tmp_path, monkeypatch):
    """docs/cli.md's example: `llmfeat finetune --config` with a backbone: section, and the command
    line still winning over it (the training itself stubbed out)."""
    import llm_features.finetune.train as train_mod
    from llm_features.cli import main

    seen = {}

    def fake_finetune(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(train_mod, "finetune", fake_finetune)
    conf = tmp_path / "ft.yaml"
    conf.write_text("epochs: 1\nbackbone: {model: /models/Qwen2-0.5B, split_layer: 12, pooling: last}\n")
    r = CliRunner().invoke(main, ["finetune", "--config", str(conf), "--split-layer", "6",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    bb = seen["cfg"].backbone
    assert (str(bb.model), bb.split_layer, bb.pooling) == ("/models/Qwen2-0.5B", 6, "last")
    assert seen["cfg"].epochs == 1
    conf.write_text("backbone: {trust_remote_code: true}\n")
    r = CliRunner().invoke(main, ["finetune", "--config", str(conf), "--out", str(tmp_path)])
    assert r.exit_code == 1 and "--trust-remote-code: is taken from the command line only" in r.output
