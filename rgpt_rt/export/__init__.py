"""Checkpoint -> bundle: ONNX vision graph, TensorRT engine where present, INT4 LLM.
Run it with `python export/build_engine.py`; the pieces live here so tests can call them."""
