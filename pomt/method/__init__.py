"""The method: POMT's score and selection, Top-K's and ToMe's, as tensor functions
(``functional``), the pruning blocks (``blocks``), the public pruning calls (``pruning``), and
which implementation runs POMT's block (``ops``, with the Triton kernels in ``_triton`` and
``auto``'s check in ``dispatch``)."""
