"""The FastAPI gateway: OpenAI-compatible chat in front of Triton's generation model.

Run it with ``python -m gateway`` or ``uvicorn gateway.app:create_app --factory``; settings come
from ``GATEWAY_*`` environment variables (see :mod:`gateway.settings`). Set ``USE_TORCH=0`` in the
gateway's environment (``python -m gateway`` does) so transformers, used only for its tokenizer,
does not import torch where torch happens to be installed.
"""
