"""A plain vLLM engine (no connector), for parity checks.

``python tests/e2e/reference_engine.py IN.json OUT.json``: IN holds
``{"prompts": [[token ids], ...], "max_tokens": N}``; OUT gets the greedy
completion token ids of each prompt, generated one request at a time (CPU
greedy output depends on batch composition, see ARCHITECTURE.md).
"""

import json
import os
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from baton.model_store import ensure_default_model

    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(ensure_default_model()), enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    outputs = []
    for ids in spec["prompts"]:
        result = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        outputs.append(list(result.outputs[0].token_ids))
    with open(sys.argv[2], "w") as f:
        json.dump(outputs, f)


if __name__ == "__main__":
    main()
