"""The nightly sequence's scheduler files (ops/): the shell script's stop-at-first-failure and
exit codes with a stand-in command, every command of the Airflow DAG and the cron line parsed
by the real CLI parser. Airflow itself is not installed (README "Nightly runs")."""

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from hierarchy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"


def parses(argv):
    """The real parser's verdict: a flag it does not know exits the test (SystemExit)."""
    return build_parser().parse_args(argv)


def fake_bin(tmp_path, fail_on: str = "", code: int = 0) -> Path:
    """A stand-in for the hierarchy command: records its arguments, prints a JSON line, and
    exits ``code`` on the step ``fail_on``."""
    script = tmp_path / "hierarchy"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$@" >> {tmp_path}/calls\n'
        'echo "{\\"job\\": \\"$1\\", \\"exit_code\\": 0}"\n'
        f'[ "$1" = "{fail_on}" ] && exit {code}\n'
        "exit 0\n")
    script.chmod(0o755)
    return script


def run_night(tmp_path, kind="test", fail_on="", code=0):
    env = {**os.environ, "HIERARCHY_RUN_ID": "r1", "HIERARCHY_LOG": str(tmp_path / "log"),
           "HIERARCHY_BIN": str(fake_bin(tmp_path, fail_on, code))}
    dump = tmp_path / "d" / "test.bson"
    dump.parent.mkdir(exist_ok=True)
    proc = subprocess.run([str(OPS / "nightly.sh"), str(dump), kind], env=env,
                          capture_output=True, text=True)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() \
        else []
    return proc, calls


def test_the_night_runs_three_steps_that_the_cli_accepts(tmp_path):
    proc, calls = run_night(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls] == ["ingest", "predict", "curate"]
    for call in calls:
        parses(shlex.split(call))
    assert "--append" in calls[0] and "category_names.csv" in calls[0]
    assert len((tmp_path / "log").read_text().splitlines()) == 3  # a JSON line per step


@pytest.mark.parametrize("step,code", [("ingest", 3), ("predict", 1), ("curate", 2)])
def test_the_first_failing_step_stops_the_night_with_its_exit_code(tmp_path, step, code):
    proc, calls = run_night(tmp_path, fail_on=step, code=code)
    assert proc.returncode == code
    assert calls[-1].split()[0] == step
    assert f"'{step}' exited {code}" in proc.stderr


def test_a_train_dump_is_appended_and_curated_not_scored(tmp_path):
    proc, calls = run_night(tmp_path, kind="train")
    assert proc.returncode == 0 and [c.split()[0] for c in calls] == ["ingest", "curate"]


def test_every_airflow_step_is_a_command_the_cli_accepts():
    spec = importlib.util.spec_from_file_location("airflow_nightly", OPS / "airflow_nightly.py")
    dag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag)  # without Airflow the module only declares its steps
    assert dag.dag is None
    assert [s[0] for s in dag.STEPS] == ["append", "predict", "curate"]
    for _, job, args in dag.STEPS:
        stage = (ROOT / job).stem
        assert (ROOT / job).exists()
        parses([stage, *[a.replace("{{ ds }}", "2026-12-07") for a in args]])
        assert dag.command(job, args).startswith("spark-submit ")


def test_the_cron_line_runs_the_night_script():
    lines = [line for line in (OPS / "nightly.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split()
    minute, hour = int(fields[0]), int(fields[1])
    assert 0 <= minute < 60 and 0 <= hour < 24 and fields[2:5] == ["*", "*", "*"]
    assert any(f.endswith("ops/nightly.sh") for f in fields[5:])
    assert subprocess.run(["bash", "-n", str(OPS / "nightly.sh")]).returncode == 0
