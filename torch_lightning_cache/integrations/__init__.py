"""Integrations with other libraries, each imported on its own (the package works without them).

* :mod:`torch_lightning_cache.integrations.transformers`: Hugging Face transformers' ``MiniMaxForCausalLM`` on this
  package's ops (``patch_minimax``, ``LightningMiniMaxCache``).
"""
