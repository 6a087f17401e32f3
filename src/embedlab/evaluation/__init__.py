"""Evaluation: retrieval metrics equal to pytrec_eval, STS correlations, memory-bounded top-k search, the
compression grid, first stages and reranking.

Modules, one concern each:

- :mod:`~embedlab.evaluation.evaluators`: retrieval / STS evaluators and ``build_evaluator`` (the ``eval`` options);
- :mod:`~embedlab.evaluation.metrics`: nDCG / MAP / MRR / recall / precision as trec_eval computes them;
- :mod:`~embedlab.evaluation.search`: the one chunked top-k engine, exact and FAISS float search, runs;
- :mod:`~embedlab.evaluation.quantize`: int8 / uint8 / binary quantizers;
- :mod:`~embedlab.evaluation.quantized_search`: int8, Hamming and binary-with-rescoring search on the engine;
- :mod:`~embedlab.evaluation.reduction`: Matryoshka truncation and PCA;
- :mod:`~embedlab.evaluation.storage`: bytes stored per vector (index and rescoring copy);
- :mod:`~embedlab.evaluation.grid`: the compression grid (space x precision cells), its table and plot;
- :mod:`~embedlab.evaluation.first_stage`: first-stage retrievers (dense, BM25, hybrid reciprocal-rank fusion, run file);
- :mod:`~embedlab.evaluation.runs`: TREC / JSON run files (read with exact errors, written atomically);
- :mod:`~embedlab.evaluation.rerank`: cross-encoder evaluators (rerank a first stage's candidates; STS pairs).
"""
