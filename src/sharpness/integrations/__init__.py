"""Integrations with the frameworks researchers train in (docs/integrations.md).

Each submodule imports its framework, installed as an optional extra (``pip install "sharpness[transformers]"``,
``[lightning]``, ``[accelerate]``, ``[tensorboard]``, or ``[integrations]`` for all): importing
``sharpness.integrations`` itself imports none of them.
"""
