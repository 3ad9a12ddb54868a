"""Batch mode: a file of OpenAI batch requests, or a folder, glob or table of images, through the engine on Ray Data
(``python -m serve batch``; docs/batch.md). Answers equal the service's: the same functions prepare and finish."""
