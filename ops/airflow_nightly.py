"""An Airflow DAG for the nightly sequence (README "Nightly runs"): append the day's dump,
score what changed, curate what is new, each a spark-submit of the project's thin job.

Copy it into the DAGs folder and set the Airflow Variables ``hierarchy_code`` (the project's
checkout, where ``jobs/`` is), ``hierarchy_home`` (the project data root),
``hierarchy_run_id`` (the run that scores the catalog) and ``hierarchy_dumps`` (where a day's
dump lands as ``<date>/test.bson`` with its ``category_names.csv``). A step
that exits non-zero fails its task: 3 means the job refused the data (its one-line error is
in the task log and its JSON summary line's ``error``), 1 a crash; the later steps do not run.
Written for Airflow 2.x (``BashOperator``); the suite checks that every command here is one
the CLI accepts (tests/test_ops.py), not Airflow itself (too heavy for the test machine).
"""

from __future__ import annotations

import datetime as dt

SPARK_SUBMIT = "spark-submit --master ${SPARK_MASTER:-local[2]}"
DUMP = "{{ var.value.hierarchy_dumps }}/{{ ds }}/test.bson"
CATEGORIES = "{{ var.value.hierarchy_dumps }}/{{ ds }}/category_names.csv"

# (task id, the job and its arguments): the suite parses each with the real CLI parser
STEPS = (
    ("append", "jobs/ingest.py", ["--append", "--kind", "test", "--input", DUMP,
                                  "--categories", CATEGORIES, "-q"]),
    ("predict", "jobs/predict.py", ["--run-id", "{{ var.value.hierarchy_run_id }}",
                                    "--split", "test", "-q"]),
    ("curate", "jobs/curate.py", ["-q"]),
)


def command(job: str, args: list) -> str:
    return " ".join([SPARK_SUBMIT, job, *args])


def build():
    from airflow import DAG
    from airflow.operators.bash import BashOperator

    with DAG(dag_id="hierarchy_nightly", schedule="15 2 * * *",
             start_date=dt.datetime(2026, 12, 1), catchup=False, max_active_runs=1,
             default_args={"retries": 0}) as dag:
        previous = None
        for task_id, job, args in STEPS:
            task = BashOperator(task_id=task_id, bash_command=command(job, args),
                                cwd="{{ var.value.hierarchy_code }}",
                                env={"HIERARCHY_HOME": "{{ var.value.hierarchy_home }}"},
                                append_env=True)
            if previous is not None:
                previous >> task
            previous = task
    return dag


try:  # in Airflow's scheduler; elsewhere (the suite) the module only declares its steps
    dag = build()
except ImportError:
    dag = None
