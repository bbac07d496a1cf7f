"""What runs inside Triton: the generation model (scheduler, runners, KV cache, sampling, grammar, logprobs).

The build's checks share the onnxruntime decoding (onnx_lm) with it. Nothing here imports the build.
"""
