"""Evaluation: retrieval metrics equal to pytrec_eval, STS correlations, memory-bounded top-k search and the
compression grid.

Modules, one concern each:

- :mod:`~embedlab.evaluation.evaluators`: retrieval / STS evaluators and ``build_evaluator`` (the ``eval`` options);
- :mod:`~embedlab.evaluation.metrics`: nDCG / MAP / MRR / recall / precision as trec_eval computes them;
- :mod:`~embedlab.evaluation.search`: the one chunked top-k engine, exact and FAISS float search, runs;
- :mod:`~embedlab.evaluation.quantize`: int8 / uint8 / binary quantizers;
- :mod:`~embedlab.evaluation.quantized_search`: int8, Hamming and binary-with-rescoring search on the engine;
- :mod:`~embedlab.evaluation.reduction`: Matryoshka truncation and PCA;
- :mod:`~embedlab.evaluation.storage`: bytes stored per vector (index and rescoring copy);
- :mod:`~embedlab.evaluation.grid`: the compression grid (space x precision cells), its table and plot.
"""
