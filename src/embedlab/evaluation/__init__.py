"""Evaluation: retrieval metrics equal to pytrec_eval, memory-bounded exact search, STS, compression."""
