"""The sweep behind ``evaluate.py``: one model, unpruned and pruned by POMT, ToMe and Top-K,
tested and timed side by side on this device, resumable, under DDP too.

``evaluation`` runs it (:class:`TradeoffEvaluation`), ``plan`` is what rank 0 decides per
batch size, ``configurations`` what is compared and how it is timed, ``rundir`` the records
a rerun reuses, ``report`` the table and files, ``summary`` the W&B runs, and ``entry`` the
console and argument handling that ``train.py`` and ``evaluate.py`` share. The method
(``pomt`` outside the Lightning layer) never imports this package.
"""

from pomt.lightning.sweep.evaluation import TradeoffEvaluation, TradeoffResult

__all__ = ["TradeoffEvaluation", "TradeoffResult"]
