"""Export a saved bi-encoder to ONNX (+ int8): `python export.py MODEL_DIR [--quantize int8]` (docs/inference.md)."""

from embedlab.models.onnx import main

if __name__ == "__main__":
    main()
