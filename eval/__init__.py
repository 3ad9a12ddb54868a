"""Referring-expression evaluation of Kosmos-2, scored exactly as the official RefCOCO protocol scores it.

``datasets`` reads the refer toolkit's and MDETR's files, ``tables`` the public Parquet/JSONL exports (lmms-lab,
jxu124, Qwen-VL/InternVL), ``synth`` draws a synthetic set and ``audit`` counts the expressions a tokenizer's
space clean-up would change; ``refexp`` is the protocol (pure); ``predictors`` ask the running service or the
engine, ``references`` compute the grid's ceiling and a floor from the ground truth; ``records`` stores the
answers, ``runner`` writes predictions and the summary, ``report`` and ``examples`` the report and the picture.
Run ``python -m eval --help``; docs/evaluation.md has the recipe for the paper's table and what still differs.
"""
