from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kdedge.train.config import apply_override, dump_yaml, load_config, read_yaml, resolve
from kdedge.train.fields import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_defaults_resolve() -> None:
    cfg = resolve({})
    assert cfg.method == "baseline"
    assert cfg.train.epochs == 10
    assert cfg.data.name == "mnist5k"


def test_recipe_and_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "method: baseline\nseed: 3\noptim: {lr: 0.2, milestones: [5, 8], schedule: step}\ntrain: {epochs: 9}\n")
    cfg = load_config(p, ["optim.lr=0.05", "train.epochs=2", "model.args.width=8", "optim.milestones=[1]"])
    assert cfg.seed == 3
    assert cfg.optim.lr == 0.05
    assert cfg.optim.milestones == [1]
    assert cfg.train.epochs == 2
    assert cfg.model.args == {"width": 8}


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.grad_clip=1.5", "data.per_class=20"])
    p = write(tmp_path, dump_yaml(cfg))
    again = resolve(read_yaml(p))
    assert again == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "did you mean 'lr'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("data.batchsize=3", "did you mean 'batch_size'"),
        ("train.epochs=-1", "train.epochs must be an integer in [1, 1000000], got -1"),
        ("train.epochs=10000000", "train.epochs must be an integer in [1, 1000000], got 10000000"),  # a run that never ends
        ("train.epochs=two", "expected an integer"),
        ("optim.nesterov=3", "expected true or false"),
        ("method=hnee", "did you mean 'hne'"),
        ("optim.schedule=step", "needs optim.milestones"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_fix(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [override])


def test_malformed_yaml_says_where(tmp_path: Path) -> None:
    p = write(tmp_path, "train: {epochs: 3\nseed: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(p)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    p = write(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_non_mapping_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/recipe.yaml")


def test_override_into_non_section() -> None:
    raw: dict = {"seed": 1}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(raw, "seed.x=1")


def test_every_shipped_recipe_resolves() -> None:
    recipes = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    for r in recipes:
        load_config(r)  # raises on any unknown key or bad value


def test_labelled_per_batch_reaches_the_data_config() -> None:
    cfg = load_config(None, ["data.name=digits", "data.per_class=10", "data.unlabelled=true", "data.batch_size=64",
                             "data.labelled_per_batch=16"])
    assert cfg.data.labelled_per_batch == 16
    assert load_config(None, []).data.labelled_per_batch is None  # off by default
    assert resolve(yaml.safe_load(dump_yaml(cfg))) == cfg  # the run's config.yaml keeps it


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.per_class=10", "data.labelled_per_batch=8"], "labelled_per_batch needs data.unlabelled: true"),
        (["data.per_class=10", "data.unlabelled=true", "data.labelled_per_batch=0"], "must be an integer >= 1"),
        (["data.per_class=10", "data.unlabelled=true", "data.batch_size=32", "data.labelled_per_batch=32"],
         "must be smaller than data.batch_size=32"),
        (["data.per_class=10", "data.unlabelled=true", "data.labelled_per_batch=half"], "expected an integer"),
        (["data.labeled_per_batch=8"], "did you mean 'labelled_per_batch'"),
    ],
)
def test_bad_labelled_per_batch_is_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_bad_labelled_per_batch_exits_the_cli_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdedge.cli.main import app

    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--set", "data.name=digits",
                                   "--set", "data.per_class=10", "--set", "data.labelled_per_batch=8"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "labelled_per_batch needs data.unlabelled" in lines[0], res.output
    assert not (tmp_path / "r").exists()  # refused before the run directory is made


# --- where the configuration lives --------------------------------------------------------------


def test_the_old_import_path_re_exports_the_same_objects() -> None:
    import kdedge.config as old
    from kdedge.train import config as home
    from kdedge.train import fields

    for name in old.__all__:
        assert getattr(old, name) is getattr(home, name, None) or getattr(old, name) is getattr(fields, name), name
    assert {"load_config", "resolve", "RunConfig", "ConfigError", "number", "check_ranges"} <= set(old.__all__)


def test_reading_a_config_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; import kdedge.config, kdedge.train.config, kdedge.train.fields, kdedge.train.labels; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def _import_graph():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_side_has_no_import_circle() -> None:
    graph = _import_graph()
    edges = graph.graph()
    ours = [c for c in graph.cycles(edges) if any(m == "kdedge.config" or m.startswith("kdedge.train") for m in c)]
    assert ours == []
    # the field helpers and the label sit below everything else in training: they import no training module
    for module in ("kdedge.train.fields", "kdedge.train.labels", "kdedge.train.distributed"):
        assert not [m for m in edges[module] if m.startswith("kdedge.train") or m == "kdedge.config"], module


def test_ignore_index_is_defined_once() -> None:
    import ast

    root = Path(__file__).resolve().parents[1] / "kdedge"
    homes = []
    for path in [root / "config.py", *sorted((root / "train").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "IGNORE_INDEX" for t in targets):
                homes.append(path.relative_to(root).as_posix())
    assert homes == ["train/labels.py"]
