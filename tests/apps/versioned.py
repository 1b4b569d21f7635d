"""A test app that reports which code version served each call: ./VERSION, read at import.

A reload or upgrade starts workers that import this module afresh, so bumping the file and
reloading is exactly a deploy of new handler code.
"""

from pathlib import Path

from reporting_ivr import ivr, subscribe_and_report

VERSION = Path("VERSION").read_text().strip() if Path("VERSION").exists() else "1"


def handle(session):
    subscribe_and_report(session)
    session.execute("set", f"app_version={VERSION}")
    ivr(session)
