"""Session lifecycle helpers of hierarchy/spark.py, in a process of their own (the suite's
shared session must not be stopped)."""

import subprocess
import sys
import textwrap


def test_stop_spark_keeps_accumulators_and_lets_a_new_session_start(tmp_path):
    script = textwrap.dedent("""
        from pyspark import SparkContext
        from hierarchy.contracts.config import load_config
        from hierarchy.spark import get_spark, stop_spark

        cfg = load_config(None, ["spark.master=local[2]"])
        spark = get_spark(cfg, "stop-1", catalog=False)
        acc = spark.sparkContext.accumulator(0)

        def add(i):
            acc.add(i)
            return i

        spark.sparkContext.parallelize(range(100), 4).map(add).count()
        print("acc", acc.value)
        stop_spark(spark)
        print("active", SparkContext._active_spark_context is not None)
        spark = get_spark(cfg, "stop-2", catalog=False)
        print("sum", spark.sparkContext.parallelize(range(10), 2).sum())
        stop_spark(spark)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == ["acc 4950", "active False", "sum 45"], done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
