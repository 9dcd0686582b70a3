"""A small, real multi-task merging experiment on scikit-learn's digits (no downloads).

A Flax nnx MLP is pre-trained on upright digits; each task is the digits under one image
transformation (rotation, flip, inversion, pixel permutation, ...) with its own frozen
few-shot prototype head, and the body is fine-tuned per task. The fine-tuned bodies are
merged with every method, hyperparameters are searched on validation splits of the first
few tasks, and every merged model is scored on the test split of every merged task.
`run.run(config, out)` is the whole pipeline; `breadcrumbs-jax demo` its command.
"""
