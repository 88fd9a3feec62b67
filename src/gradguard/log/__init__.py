"""gradguard's log: events, the sinks that carry them (and the interval records) out of the
training loop, and reading a log back.

* :mod:`gradguard.log.events`: :class:`Event`, its kinds and severities;
* :mod:`gradguard.log.sinks`: the sinks, :func:`make_sink` (the one spec parser), per-rank
  naming for distributed runs;
* :mod:`gradguard.log.jsonvalues`: non-finite floats in JSON, both ways;
* :mod:`gradguard.log.readback`: :func:`read_jsonl` and :class:`RunLog`.
"""

from gradguard.log.events import EVENT_KINDS, EVENT_SEVERITY, Event
from gradguard.log.jsonvalues import decode_json_value, encode_json_value
from gradguard.log.readback import RunLog, read_jsonl
from gradguard.log.sinks import (
    LOG_RANKS,
    CallbackSink,
    ConsoleSink,
    CSVSink,
    JSONLSink,
    Sink,
    SinkSpec,
    TensorBoardSink,
    make_sink,
    parse_sink_spec,
    rank_path,
    sinks_for_rank,
)

__all__ = [
    "EVENT_KINDS",
    "EVENT_SEVERITY",
    "LOG_RANKS",
    "CSVSink",
    "CallbackSink",
    "ConsoleSink",
    "Event",
    "JSONLSink",
    "RunLog",
    "Sink",
    "SinkSpec",
    "TensorBoardSink",
    "decode_json_value",
    "encode_json_value",
    "make_sink",
    "parse_sink_spec",
    "rank_path",
    "read_jsonl",
    "sinks_for_rank",
]
