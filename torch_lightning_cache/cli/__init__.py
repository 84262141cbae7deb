"""The programs built on the library: ``demo`` (with ``--serve`` and ``--tp``), ``bench``, and the
pure-PyTorch peers (``baselines``) the benchmark and the tests compare the ops with."""
