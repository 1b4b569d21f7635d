"""Loading the user's call-control handler, ``module:callable``.

The handler contract: ``handler(session)`` is called once per call in its own greenlet, after the
``connect`` reply has been decoded (``session.uuid``, ``session.channel``). Returning hands the call
back to FreeSWITCH's dialplan; an exception ends that call only and is logged with its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Callable

from workers.base import describe_wait_status


class AppLoadError(Exception):
    """The handler spec is malformed or names something that is not callable."""


def load_app(spec: str) -> Callable:
    """Import ``module:callable`` (dotted attributes allowed after the colon).

    The current directory is importable, as with gunicorn, so ``esl-gateway run myapp:handle``
    works from the project's folder. Import errors propagate with their own traceback.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise AppLoadError(f"app must look like module:callable, not {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    target = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise AppLoadError(f"{module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise AppLoadError(f"{spec!r} is not callable")
    return target


def check_app(spec: str) -> bool:
    """Import the app once in a throwaway child, so a broken app stops ``run`` before it binds.

    The import happens in a child so the master itself never holds the user's modules: every
    worker imports them fresh, which is what lets a reload pick up new code.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            load_app(spec)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        print(f"esl-gateway: the process importing {spec} {describe_wait_status(status)}",
              file=sys.stderr)
    return status == 0
