"""The fixed golden prompt set every fidelity gate runs: merge, ONNX, INT8, Triton.

Conversations in OpenAI message form; each gate renders them with the model's own chat template.
"""

from __future__ import annotations

Messages = list[dict[str, str]]

# Questions about the demo dataset's fictional company (Bluepeak Electronics / 蓝峰电子).
# Kept in step with toolkit/datasets/demo_customer_service.json.
DEMO_QUESTIONS: list[str] = [
    "What are Bluepeak's customer service hours?",
    "How long is the warranty on Bluepeak headphones?",
    "蓝峰电子的退货期限是多少天？",
]

GENERAL_QUESTIONS: list[str] = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
]

CHINESE_QUESTIONS: list[str] = ["请用一句话介绍一下长城。"]

EMOJI_QUESTIONS: list[str] = ["Reply with a short happy message and a 🎉 emoji for my birthday 🎂!"]

LONG_QUESTION = (
    "I am writing a short guide for new employees. "
    + " ".join(
        f"Point {i}: be kind to customers, answer clearly, and check facts before replying."
        for i in range(1, 25)
    )
    + " Summarise these points in one sentence."
)


def golden_conversations() -> list[Messages]:
    """Every golden prompt as a one-turn conversation, in a fixed order."""
    questions = DEMO_QUESTIONS + GENERAL_QUESTIONS + CHINESE_QUESTIONS + EMOJI_QUESTIONS + [LONG_QUESTION]
    return [[{"role": "user", "content": q}] for q in questions]
