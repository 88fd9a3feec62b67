"""The monitor: per-step gradient statistics in an on-device buffer, flushed every
``log_every`` steps into interval records and events.

* :mod:`gradguard.monitor.buffer`: the device ring buffer (write a row, read a block);
* :mod:`gradguard.monitor.record`: FIELDS, RECORD_KEYS, the interval record, Interval;
* :mod:`gradguard.monitor.detectors`: spike, nonfinite, skip, vanishing, high_clip_rate;
* :mod:`gradguard.monitor.monitor`: the :class:`Monitor` that ties them together.
"""

from gradguard.monitor.detectors import CLIP_RATE_ADVICE, policy_name
from gradguard.monitor.monitor import Monitor
from gradguard.monitor.record import FIELDS, RECORD_KEYS, Interval

__all__ = ["CLIP_RATE_ADVICE", "FIELDS", "RECORD_KEYS", "Interval", "Monitor", "policy_name"]
