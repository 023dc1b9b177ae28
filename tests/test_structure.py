"""The structure the code promises: a Ray-free library, jobs that do not call back into the CLI, and one
spelling per training option across the command line, the dataclass and the sweep files."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines import train
from timerefine.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the code (functions included), as absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((REPO / "timerefine").rglob("*.py")), ids=lambda p: p.name)
def test_the_library_imports_no_ray(path: Path) -> None:
    ray = sorted(name for name in imported_modules(path) if name == "ray" or name.startswith("ray."))
    assert ray == [], f"{path.relative_to(REPO)} imports {ray}: Ray belongs in pipelines/"


@pytest.mark.parametrize(
    "path", sorted([*(REPO / "pipelines").glob("*.py"), *(REPO / "tune").glob("*.py")]), ids=lambda p: p.name
)
def test_no_job_imports_the_cli(path: Path) -> None:
    assert "timerefine.cli" not in imported_modules(path)


def test_no_job_builds_argv_to_call_another_job() -> None:
    """Jobs call each other's ``run`` with configs: no ``parse_args`` of a hand-made list, and ``main`` only
    as a job's own door (``jobs.main(sys.modules[__name__])``)."""
    for path in (REPO / "pipelines").glob("*.py"):
        if path.name in ("jobs.py", "_script.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called = node.func.attr
                assert not (called == "parse_args" and node.args), f"{path.name}: parse_args(argv)"
                own_door = called == "main" and ast.unparse(node) == "jobs.main(sys.modules[__name__])"
                assert called != "main" or own_door, f"{path.name}: {ast.unparse(node)}"


def train_flags() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return {action.dest: action for action in parser._actions}


def test_every_training_option_is_a_flag_of_the_same_name() -> None:
    flags = train_flags()
    for option in dataclasses.fields(TrainConfig):
        assert option.name in flags, f"TrainConfig.{option.name} has no flag"
        spelled = "--" + option.name.replace("_", "-")
        assert spelled in flags[option.name].option_strings, (option.name, flags[option.name].option_strings)
        if option.default is not dataclasses.MISSING:
            assert flags[option.name].default == option.default, option.name


def test_the_shipped_sweep_files_use_the_training_options_names() -> None:
    known = {option.name for option in dataclasses.fields(TrainConfig)}
    for path in (REPO / "tune").glob("*.yaml"):
        document = yaml.safe_load(path.read_text())
        used = (
            set(document.get("search", {})) | set(document.get("train", {})) | set(document.get("data", {}))
        )
        assert used <= known, f"{path.name}: {sorted(used - known)} are not TrainConfig fields"


def test_flags_parse_into_the_config_the_dataclass_describes(tmp_path: Path) -> None:
    argv = ["--features", "f", "--train", "t.jsonl", "--output", str(tmp_path), "--schedule", "rel4"]
    argv += ["--no-contain-gt", "--time-tokens", "--learning-rate", "0.001", "--prompt-layout", "video-first"]
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    config = train.config_from_args(parser.parse_args(argv)).train
    assert config.parsed_schedule().relative and not config.contain_gt and config.time_tokens
    assert config.learning_rate == 0.001 and config.prompt_layout == "video-first"
    assert Path(config.features).is_absolute()
    older = train.config_from_args(
        parser.parse_args([*argv[:6], "--refine-steps", "2", "--lr", "0.01"])
    ).train
    assert older.schedule == "2" and older.learning_rate == 0.01  # the older spellings, kept for a release
