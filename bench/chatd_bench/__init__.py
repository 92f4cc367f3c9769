"""chatd_bench: the load-test harness of chatd (see bench/README.md).

Modules: ``hist`` (mergeable log-bucket latency histogram), ``tally`` (what was
sent, acked, expected and delivered; the verdict), ``plan`` (who sends to whom,
and the checks a receiver makes), ``setup`` (users, groups and tokens through
chatd's own ``Store`` and ``auth``), ``servers`` (chatd and the peer relays as
child processes, and their CPU/RSS through psutil), ``worker`` (one load
process: picows + msgspec + uvloop), ``run`` (one measured run), ``report``
(table, JSON lines, PNG plot) and ``cli``.
"""

__version__ = "0.1.0"
