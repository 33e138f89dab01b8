"""Run a notebook headless with papermill, in a kernel of this interpreter.

The analyst notebook imports ``hierarchy`` and starts Spark, so its kernel must be the
interpreter that has them (the venv): a ``python3`` kernelspec found elsewhere on the Jupyter
path (a user-wide or system install) would run another Python and fail on the first import.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

KERNEL = "python3"
# kernelspec commands jupyter_client itself replaces by sys.executable at launch
_PLAIN_PYTHON = {"python", "python{}".format(*sys.version_info),
                 "python{}.{}".format(*sys.version_info)}


def kernel_python(kernel_name: str = KERNEL) -> str:
    """The interpreter a kernel started from this process would run."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec(kernel_name).argv[0]
    return sys.executable if argv0 in _PLAIN_PYTHON else argv0


def _same_interpreter(a: str, b: str) -> bool:
    # a venv's bin/python, python3 and python3.11 are one interpreter; the base Python they
    # all link to is another (its site-packages lack the project), so the folder must match too
    a, b = os.path.abspath(a), os.path.abspath(b)
    return a == b or (os.path.dirname(a) == os.path.dirname(b)
                      and os.path.realpath(a) == os.path.realpath(b))


def execute(notebook: str, output: str, parameters: dict, cwd: Optional[str] = None,
            timeout: int = 600) -> str:
    """Execute ``notebook`` with papermill ``parameters`` into ``output``; return ``output``.

    ``timeout`` is seconds per cell. ``cwd`` is the kernel's working directory (relative config
    paths resolve against it); None keeps the current one. A failing cell raises papermill's
    ``PapermillExecutionError`` after the executed notebook, traceback included, is written.
    """
    import papermill

    python = kernel_python()
    if not _same_interpreter(python, sys.executable):
        raise RuntimeError(
            f"the '{KERNEL}' kernelspec runs {python}, not this interpreter {sys.executable}: "
            f"install ipykernel here ({sys.executable} -m pip install ipykernel) and remove "
            "the other spec, or put this one first (JUPYTER_PATH)")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    papermill.execute_notebook(
        notebook, output, parameters=parameters, kernel_name=KERNEL, cwd=cwd,
        execution_timeout=timeout, progress_bar=False, log_output=False,
    )
    return output
