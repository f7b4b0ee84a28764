"""Fixed prompts for parity: short chats and long (> 600 tokens) documents."""

# A question whose greedy answer ("The capital of France is Paris.") is
# clear on every CPU we have seen: to "What is the capital of France?" the
# model's first token is a near tie ("L" -1.83, "The" -1.96 on an AMX CPU,
# the other way round elsewhere), so on some machines vLLM itself answers
# "L'Étoile, ...". Tests that check what the answer says ask this one.
CAPITAL_QUESTION = "Name the capital of France."

SHORT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
]

_FACTS = [
    "The river flows north through the valley before turning east toward the coast.",
    "Farmers in the region grow wheat, barley and a little rye on the terraced hills.",
    "In winter the passes close and the villages rely on stores gathered in autumn.",
    "The old library holds maps drawn by travellers who crossed the mountains on foot.",
    "Every spring a market fills the square with cloth, spices, tools and livestock.",
    "The bridge was rebuilt three times after floods carried away its wooden spans.",
]


def long_document(seed: int, sentences: int = 60) -> str:
    """Deterministic text of roughly 15 tokens per sentence."""
    lines = [f"Report {seed}."]
    for i in range(sentences):
        lines.append(f"Item {i}: {_FACTS[(i * (seed + 1)) % len(_FACTS)]}")
    return " ".join(lines)


LONG_TASKS = [
    (long_document(1), "Summarize the report in one sentence."),
    (long_document(2), "What do the farmers grow?"),
    (long_document(3, 80), "What happened to the bridge?"),
    (long_document(4, 70), "When do the passes close?"),
]
