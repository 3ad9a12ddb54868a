"""Referring-expression evaluation of Kosmos-2, scored exactly as the official RefCOCO protocol scores it.

``datasets`` reads RefCOCO-style data (refer toolkit, MDETR, Parquet/JSONL) and ``synth`` draws a synthetic set;
``refexp`` is the protocol (pure); ``predictors`` ask the running service, the engine, or geometric references;
``runner`` writes predictions and the summary, ``report`` and ``examples`` the report and the picture.
Run ``python -m eval --help``.
"""
