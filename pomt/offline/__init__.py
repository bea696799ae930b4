"""POMT's offline step: latency and accuracy per token count (``profiling``, with ``grid``:
which n to time), their records (``profiles``), reading the curves (``curves``), choosing R
(``selection``), checking it (``verify``), and the whole step in one call (``finder``)."""
