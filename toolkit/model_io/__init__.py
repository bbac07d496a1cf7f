"""Model directories on disk: a Hugging Face model and its tokenizer files, ONNX files, families, the embedded base."""
