"""atheris target for the sans-IO parser, for runs longer than CI's hypothesis budget.

    pip install atheris
    python tests/fuzz/fuzz_protocol.py -max_total_time=3600 tests/fuzz/corpus

The first bytes choose the parser and its limits and where the input is cut into reads; the rest
is the stream FreeSWITCH's side sends. Every item that comes out is used as the session and a
handler would use it (tests/test_fuzz.py's ``exercise``); any exception but ProtocolError is a
crash atheris reports with the input that caused it. pytest does not collect this file (its
name does not start with ``test_``), so atheris is never a dependency of the suite.
"""

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from gateway import protocol
    from gateway.protocol import ProtocolError
    from tests.test_fuzz import chunks, exercise

PARSERS = (protocol.SessionParser, protocol.Parser, protocol.CommandParser)
LIMITS = ({}, {"max_header_block": 64}, {"max_headers": 4}, {"max_line_length": 32})


def fuzz_one(data: bytes) -> None:
    given = atheris.FuzzedDataProvider(data)
    parser = PARSERS[given.ConsumeIntInRange(0, 2)](
        given.ConsumeIntInRange(16, protocol.DEFAULT_MAX_FRAME_SIZE),
        **LIMITS[given.ConsumeIntInRange(0, len(LIMITS) - 1)])
    cuts = sorted(given.ConsumeIntListInRange(given.ConsumeIntInRange(0, 8), 0, 4096))
    stream = given.ConsumeBytes(given.remaining_bytes())
    try:
        for chunk in chunks(stream, cuts):
            for item in parser.feed(chunk):
                exercise(item, parser.check_block)
    except ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()
