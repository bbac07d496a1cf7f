"""The generation model's tensor contract, shared by the Triton model, the gateway and the tests.

The generation model is a python-backend, decoupled model with ``max_batch_size > 0``, so every
tensor below has a leading batch dimension of 1 per request (Triton's dynamic batcher may hand the
model several requests at once; ``input_ids`` allows ragged batching).

One streamed response per decode step carries OUTPUT_IDS (the new token ids of that step, usually
one) with an empty FINISH_REASON; the last response (sent with the final flag) carries
FINISH_REASON in {"stop", "length", "cancelled"} and the token counts. An invalid request gets an
error response with the final flag, never silence.
"""

from __future__ import annotations

# inputs
INPUT_IDS = "input_ids"  # INT64 [-1], required
MAX_TOKENS = "max_tokens"  # INT32 [1]
TEMPERATURE = "temperature"  # FP32 [1]; 0 means greedy
TOP_P = "top_p"  # FP32 [1]
TOP_K = "top_k"  # INT32 [1]; 0 disables
SEED = "seed"  # INT64 [1]
REPETITION_PENALTY = "repetition_penalty"  # FP32 [1]
STOP_TOKEN_IDS = "stop_token_ids"  # INT64 [-1]; added to the manifest's stop ids
IGNORE_EOS = "ignore_eos"  # BOOL [1]; true: only stop_token_ids end the reply, not the manifest's (benchmarks)

OPTIONAL_INPUTS = (MAX_TOKENS, TEMPERATURE, TOP_P, TOP_K, SEED, REPETITION_PENALTY, STOP_TOKEN_IDS, IGNORE_EOS)

# outputs
OUTPUT_IDS = "output_ids"  # INT64 [-1]
FINISH_REASON = "finish_reason"  # BYTES [1]; "" until the final response
PROMPT_TOKENS = "prompt_tokens"  # INT32 [1]
COMPLETION_TOKENS = "completion_tokens"  # INT32 [1]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"

# config.pbtxt `parameters` of the generation model (string values), read by model.py at initialize.
# The manifest is at <model dir>/<version>/manifest.json; the tokenizer beside it.
PARAM_CORE_MODEL = "core_model"  # repository model whose weights run the forward pass, e.g. NAME_onnx_fp32
PARAM_RUNNER = "runner"  # "onnxruntime" (in-process, loads <repo>/<core_model>/<version>/model.onnx) or "bls"
PARAM_MAX_ACTIVE = "max_active_sequences"
PARAM_MAX_QUEUE = "max_queue"
PARAM_MAX_NEW_TOKENS = "max_new_tokens_limit"
PARAM_CONTEXT = "context_length"
