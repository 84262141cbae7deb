"""pytest plugin for running Hugging Face's own MiniMax test file against this package (see tools/run_hf_minimax_suite.sh).

Always: re-enables the tests Hugging Face skips only because its MiniMaxCache cannot ``crop``.
With LIGHTNING_PATCH=1: every MiniMaxForCausalLM and MiniMaxModel built (``__init__`` or ``from_pretrained``) is
patched with ``patch_minimax`` right after construction.
"""

from __future__ import annotations

import os

CROP_SKIPPED = ("test_prompt_lookup_decoding_matches_greedy_search", "test_assisted_decoding_sample",
                "test_assisted_decoding_matches_greedy_search_0_random",
                "test_assisted_decoding_matches_greedy_search_1_same")


def pytest_configure(config):
    if os.environ.get("LIGHTNING_PATCH") != "1":
        return
    from transformers.models.minimax import modeling_minimax as hf

    from torch_lightning_cache.integrations.transformers import patch_minimax

    for cls in (hf.MiniMaxModel, hf.MiniMaxForCausalLM):
        original = cls.__init__

        def patched_init(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            if type(self).__name__ in ("MiniMaxModel", "MiniMaxForCausalLM"):
                patch_minimax(self)

        cls.__init__ = patched_init


def pytest_pycollect_makeitem(collector, name, obj):
    """Drop the subclass's crop skips so that the mixin's own tests are collected."""
    if name == "MiniMaxModelTest" and isinstance(obj, type):
        for test in CROP_SKIPPED:
            if test in vars(obj):
                delattr(obj, test)
    return None
