"""From a merged Hugging Face model to the ONNX graphs the repository ships: the export and INT8 quantization."""
