import subprocess
import sys

import pytest

from hierarchy.cli import main
from hierarchy.contracts.config import ConfigError, load_config


def test_default_is_the_embedded_local_config():
    cfg = load_config()
    assert cfg.spark.master == "local[*]"
    assert cfg.ingest.val_fraction == 0.1


def test_overrides_are_typed_and_applied_last(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  val_fraction: 0.3\n  split_mb: 8\n")
    cfg = load_config(f, ["ingest.val_fraction=0.25", "spark.conf.spark.sql.shuffle.partitions=3",
                          "ingest.progress=false"])
    assert cfg.ingest.val_fraction == 0.25
    assert cfg.ingest.split_mb == 8
    assert cfg.ingest.progress is False
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == "3"
    assert cfg.spark.conf["spark.ui.enabled"] == "false"  # merged, not replaced


@pytest.mark.parametrize("override, message", [
    ("ingest.val_fracton=0.2", "unknown config key 'ingest.val_fracton'"),
    ("ingets.split_mb=2", "unknown config key 'ingets'"),
    ("ingest.val_fraction=1.5", "'ingest.val_fraction': 1.5 is not allowed; expected a number "
                                "in [0.0, 1.0)"),
    ("ingest.split_mb=lots", "'ingest.split_mb': 'lots' is not a number"),
    ("ingest.verify_jpeg=maybe", "expected one of markers, decode"),
    ("ingest.progress=3", "'ingest.progress': 3 is not true/false"),
    ("ingest", "not of the form section.key=value"),
    ("decide.target_precision=1", "'decide.target_precision': 1.0 is not allowed; expected a "
                                  "number in (0.0, 1.0)"),
    ("decide.target_precision=0", "'decide.target_precision': 0.0 is not allowed"),
    ("decide.levels=[3,4]", "'decide.levels': [3, 4] is not allowed; expected a non-empty "
                            "list of distinct levels among 1, 2, 3"),
    ("decide.levels=[]", "'decide.levels'"),
    ("decide.confidence=1.2", "'decide.confidence': 1.2 is not allowed"),
    ("decide.levels=3", "'decide.levels': 3 is not a list (default [3, 2, 1])"),
    ("ingest=3", "config key 'ingest' is a section; got 3"),
    ("synth.plant.nope=1", "unknown config key 'synth.plant.nope' in command line; known keys "
                           "under 'synth.plant': blank, duplicates, near_duplicates"),
    ("spark.conf=3", "config key 'spark.conf' is a mapping; got 3"),
    ("ingest.verify_jpeg=true", "'ingest.verify_jpeg': True is not a string (default 'markers')"),
    ("train.epochs=2.5", "'train.epochs': 2.5 is not an integer (default 4)"),
    ("train.weights=", "'train.weights': '' is not allowed; expected null or the path"),
    ("train.xla=maybe", "'train.xla': 'maybe' is not allowed; expected one of auto, on, off"),
    ("tune.learning_rate=[0.1,0.01]", "expected [low, high], low <= high, each a number in "
                                      "(0.0, 10.0]"),
    ("catalog.database=a-b", "expected a SQL identifier"),
    ("train.exclude=[blank,foo]", "expected a list of curation flags: blank, placeholder"),
])
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_settings_are_typed_frozen_and_travel_to_workers():
    import pickle

    from pydantic import ValidationError

    from hierarchy.contracts.settings import Decide, Settings, Train

    cfg = load_config(overrides=["train.xla=on", "spark.driver_memory=4",
                                 "spark.conf.spark.speculation=true"])
    assert isinstance(cfg, Settings) and isinstance(cfg.train, Train)
    assert isinstance(cfg.decide, Decide) and cfg.decide.levels == (3, 2, 1)
    assert cfg.train.xla == "on"                        # YAML's boolean on, as the switch means
    assert cfg.spark.driver_memory == "4"               # a number where a string is expected
    assert cfg.spark.conf["spark.speculation"] == "true"  # SparkConf takes strings
    assert isinstance(cfg.ingest.split_mb, float) and isinstance(cfg.train.epochs, int)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = 9
    changed = cfg.train.model_copy(update={"epochs": 9})
    assert changed.epochs == 9 and cfg.train.epochs == 4
    assert pickle.loads(pickle.dumps(cfg)) == cfg       # horovod.spark.run and Spark closures


def test_the_models_and_the_default_file_name_the_same_keys():
    """The YAML holds every default and nothing else; a model field without a default in the
    file, or a key the models do not know, fails here rather than at a user's command."""
    import yaml

    from hierarchy.contracts.config import default_config_text
    from hierarchy.contracts.settings import Section, Settings

    def walk(model, doc, prefix=""):
        assert set(model.model_fields) == set(doc), prefix or "top level"
        for name, info in model.model_fields.items():
            key = prefix + name
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
                walk(info.annotation, doc[name], key + ".")
            elif key not in ("spark.conf", "variants"):  # free-form mappings of their own
                assert not isinstance(doc[name], dict), key

    walk(Settings, yaml.safe_load(default_config_text()))


def test_the_example_cluster_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "cluster.yaml")
    assert cfg.train.backbone == "efficientnet_b0" and cfg.paths.data.startswith("hdfs://")


def test_bad_config_file_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ingest:\n  val_fraction: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_config(f)
    f.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n")  # the last won
    with pytest.raises(ConfigError, match=r"bad.yaml:4:3: not valid YAML \(duplicate key "
                                          r"'epochs' \(first on line 2\)\)"):
        load_config(f)
    f.write_text("train:\n  epochs: 3\npredict:\n  top_n: 3\ntrain:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5:1: .*duplicate key 'train'"):
        load_config(f)
    f.write_text("ingest:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'ingest.nope' in .*bad.yaml"):
        load_config(f)
    f.write_text("train:\n  dropout: 2\n")
    with pytest.raises(ConfigError, match=r"'train.dropout': 2.0 is not allowed; expected a "
                                          r"number in \[0.0, 1.0\)"):
        load_config(f)


def test_cli_refuses_bad_config_before_any_work(tmp_path, capsys):
    rc = main(["ingest", "--input", str(tmp_path / "missing.bson"), "--categories", "x.csv",
               "--output", str(tmp_path / "out"), "ingest.max_bad_fraction=2"])
    assert rc == 2
    assert "ingest.max_bad_fraction" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_the_stages():
    out = subprocess.run([sys.executable, "-m", "hierarchy.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "synth" in out and "ingest" in out and "section.key=value" in out


def test_relative_config_paths_resolve_against_the_data_root_not_the_shell(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("HIERARCHY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    home = str(tmp_path / "home")
    assert cfg.paths.root == home and cfg.paths.data == f"{home}/dataset"
    assert cfg.catalog.warehouse == f"{home}/warehouse"
    assert cfg.catalog.metastore == f"{home}/warehouse/metastore_db"
    assert cfg.catalog.location == ""          # empty: the catalog decides
    # the same from another folder: nothing depends on where a command started
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_config() == cfg
    # paths.root wins over the variable; absolute paths, URLs and JDBC URLs stay as given
    cfg = load_config(overrides=[f"paths.root={tmp_path / 'r'}", "paths.models=/abs/models",
                                 "paths.output=hdfs:///out",
                                 "catalog.metastore=jdbc:postgresql://db:5432/metastore",
                                 "catalog.location=tables/predictions"])
    assert cfg.paths.data == f"{tmp_path / 'r'}/dataset"
    assert cfg.paths.models == "/abs/models" and cfg.paths.output == "hdfs:///out"
    assert cfg.catalog.metastore == "jdbc:postgresql://db:5432/metastore"
    assert cfg.catalog.location == f"{tmp_path / 'r'}/tables/predictions"
    monkeypatch.delenv("HIERARCHY_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert load_config().paths.root == str(tmp_path / "user" / "hierarchy")


def test_the_default_config_is_read_from_the_package_even_zipped(tmp_path):
    """A --py-files zip has no folders: the default is a package resource."""
    import zipfile
    from pathlib import Path

    import hierarchy

    pkg = Path(hierarchy.__file__).parent
    zipped = tmp_path / "hierarchy.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for f in pkg.rglob("*"):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                z.write(f, Path("hierarchy") / f.relative_to(pkg))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import hierarchy.contracts.config as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "print(c.load_config().ingest.split_mb)")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(zipped)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    from hierarchy.contracts.config import load_config

    assert out.stdout.strip() == str(load_config().ingest.split_mb)


def test_the_names_a_setting_allows_are_the_names_the_code_knows():
    """settings.py spells these lists out because their homes import TensorFlow or pyarrow,
    which loading a config must not; this keeps the copies equal."""
    from hierarchy.contracts import curation, model
    from hierarchy.contracts import settings as s

    assert s.FLAGS == curation.FLAGS
    assert s.BACKBONES == model.BACKBONE_NAMES
