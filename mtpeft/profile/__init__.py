"""Predict and measure memory and compute of a frozen-base (QLoRA-style) fine-tune.

``architecture`` counts parameters exactly from a config on the meta device, ``planner`` predicts
per-GPU bytes under ZeRO-3 (``plan``, ``search``, ``plan_model_states``), ``flops`` counts the
matmul FLOPs of one step with a frozen base, and ``plan_cli`` is ``mtpeft plan``. Nothing here is
imported eagerly: transformers is only loaded when an architecture is built.
"""
